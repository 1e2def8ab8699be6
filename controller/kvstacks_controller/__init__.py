"""kvstacks-controller: the operator API over a fleet of kvstacks workers."""

from kvstacks_controller.command import Command, CommandError

__all__ = ["Command", "CommandError", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from kvstacks_controller.app import create_app

        return create_app
    raise AttributeError(name)
