"""Starts a worker agent for every engine whose stack YAML has a ``controller:`` section."""

from __future__ import annotations

import logging
import weakref
from typing import Any

from kvstacks.hookspecs import hookimpl

log = logging.getLogger("kvstacks.agent")

_agents: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@hookimpl
def kvstacks_startup(engine: Any) -> None:
    section = engine.config.controller
    from kvstacks.agent import Agent, parse_options
    from kvstacks.errors import ConfigError

    if not section:
        peers = [t for t in engine.tiers if t.config.backend == "p2p"]
        if peers:
            engine.close()
            raise ConfigError(peers[0].config.path, "backend p2p asks the controller for peers: add a controller: section")
        return

    try:
        agent = Agent(engine, parse_options(section))
        agent.start()
    except (ConfigError, OSError) as exc:
        # The engine is half built: close it so its threads do not outlive the error.
        engine.close()
        if isinstance(exc, OSError):
            raise ConfigError(
                "controller.listen_port", f"cannot listen for controller commands: {exc}"
            ) from None
        raise
    _agents[engine] = agent
    engine.agent = agent


@hookimpl
def chunks_admitted(engine: Any, tier: str, keys: list) -> None:
    agent = _agents.get(engine)
    if agent is not None:
        agent.report("admit", tier, keys)


@hookimpl
def chunks_evicted(engine: Any, tier: str, keys: list) -> None:
    agent = _agents.get(engine)
    if agent is not None:
        agent.report("evict", tier, keys)


@hookimpl
def kvstacks_shutdown(engine: Any) -> None:
    agent = _agents.pop(engine, None)
    if agent is not None:
        agent.close()
