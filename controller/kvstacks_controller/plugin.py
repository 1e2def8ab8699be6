"""The controller's own plugin: its builtin commands and the ``kvstacks controller`` subcommand."""

from __future__ import annotations

from typing import Any

from kvstacks import hookimpl


@hookimpl
def register_commands(register) -> None:
    from kvstacks_controller import operator_commands, routing, worker_commands

    for cls in operator_commands.COMMANDS + routing.COMMANDS + worker_commands.COMMANDS:
        register(cls)


@hookimpl
def register_cli_commands(cli: Any) -> None:
    from kvstacks_controller.server import controller_command

    cli.add_command(controller_command)
