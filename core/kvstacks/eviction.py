"""The eviction policy interface."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar


class EvictionPolicy:
    """Orders a tier's evictable keys. Register with ``register_eviction_policies``.

    The tier calls ``insert`` when a key is admitted, ``access`` on each hit,
    ``remove`` when a key leaves for any reason other than ``pop_victim`` (and
    when it is pinned: pinned keys are not in the policy), and ``pop_victim``
    when it needs room: return the next key to evict, already forgotten by the
    policy, or ``None`` when the policy holds no key. Every call must be O(1)
    (amortised). ``size`` is the key's stored bytes, for size-aware policies.
    """

    name: ClassVar[str]

    @dataclass
    class Options:
        pass

    def __init__(self, options: EvictionPolicy.Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def insert(self, key: Hashable, size: int) -> None:
        raise NotImplementedError

    def access(self, key: Hashable) -> None:
        raise NotImplementedError

    def remove(self, key: Hashable) -> None:
        """Forget ``key``; a key the policy does not hold is ignored."""
        raise NotImplementedError

    def pop_victim(self) -> Hashable | None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __contains__(self, key: Hashable) -> bool:
        raise NotImplementedError
