"""Transfer channels: how chunks travel from one instance to another.

A channel plugin registers a :class:`TransferChannel` subclass with
``register_transfer_channels``. A worker opens the receiving side on its own
address (``listen``) and advertises the address it returns; another worker
calls ``send(address, objs, meta)`` with chunks it exported. The receiver hands
the chunks to its engine and answers with what it stored, so the sender knows
what the destination confirmed before removing anything (a move with
``copy=false``).

Chunks cross the wire in the one chunk format of :mod:`kvstacks.frame`; a channel
never unpickles anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from kvstacks.errors import KVStacksError
from kvstacks.memory import MemoryObj

#: The receiving side's handler: ``(objs, meta) -> answer``; raises to refuse. A channel may call
#: it several times for one transfer, each time with the next chunks in order; the ``num_tokens``
#: of the answers add up, and a batch stored only in part ends the transfer.
Receiver = Callable[[list[MemoryObj], dict[str, Any]], dict[str, Any]]


class TransferError(KVStacksError):
    """A transfer failed: unreachable peer, refused token, corrupt data or a refusal by the receiver."""


class TransferChannel:
    """Base class of transfer channels. Methods are called from plain threads."""

    name: ClassVar[str]
    #: Workers advertise their channels highest first; the controller picks the first both have.
    preference: ClassVar[int] = 0

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def listen(self, host: str, port: int, receive: Receiver, token: str | None = None) -> str:
        """Start receiving on ``host:port`` (0: any free port); return the address peers send to.

        ``token``, when set, must accompany every incoming transfer. The chunks handed
        to ``receive`` may live in the channel's buffers: they are valid until it
        returns, so ``receive`` copies what it keeps.
        """
        raise NotImplementedError

    def send(
        self,
        address: str,
        objs: list[MemoryObj],
        meta: dict[str, Any],
        timeout: float = 60.0,
        token: str | None = None,
    ) -> dict[str, Any]:
        """Ship ``objs`` to the receiver at ``address``; return its answer or raise TransferError."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop receiving; idempotent."""
