"""Registrations are checked when they happen: a bad class skips its plugin, with the fix named."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from kvstacks import hookimpl
from kvstacks.backend import Backend
from kvstacks.builtin.eviction import LRU
from kvstacks.eviction import EvictionPolicy
from kvstacks.plugins import failures, pm, registry


class GoodBackend(Backend):
    name = "good-backend"

    async def put(self, key, obj): ...
    async def get(self, key): ...
    async def contains(self, key): ...
    async def remove(self, key): ...


class NotADataclass(GoodBackend):
    name = "bad-options"

    class Options:
        path: str = ""


class SyncGet(GoodBackend):
    name = "sync-get"

    def get(self, key):
        return None


class HalfBackend(Backend):
    name = "half"

    async def put(self, key, obj): ...
    async def get(self, key): ...


class NoRemovePolicy(EvictionPolicy):
    name = "forgetful"

    def insert(self, key, size): ...
    def access(self, key): ...
    def __len__(self): return 0
    def __contains__(self, key): return False


@dataclass
class Unnamed(GoodBackend):
    name = ""


CASES = {
    "policy as backend": ("register_backends", [LRU],
                          "registered a bad backend: LRU is registered as one of the backends but does not subclass "
                          "kvstacks.backend.Backend (it is a kvstacks.eviction.EvictionPolicy)"),
    "options": ("register_backends", [NotADataclass],
                "NotADataclass.Options is not a dataclass; decorate it with @dataclasses.dataclass"),
    "twice": ("register_backends", [GoodBackend, GoodBackend],
              "registered GoodBackend twice as a backend; call register once per class"),
    "abstract": ("register_backends", [HalfBackend], "HalfBackend does not implement contains, remove"),
    "policy abstract": ("register_eviction_policies", [NoRemovePolicy],
                        "NoRemovePolicy does not implement remove, pop_victim"),
    "sync": ("register_backends", [SyncGet], "SyncGet.get must be 'async def': the engine awaits it"),
    "no name": ("register_backends", [Unnamed], "Unnamed has no 'name'"),
    "instance": ("register_backends", [GoodBackend()], "register() takes a class"),
}


def plugin_registering(hook_name: str, classes: list) -> object:
    def register_all(self, register):
        for cls in classes:
            register(cls)

    register_all.__name__ = hook_name
    return type("Plugin", (), {hook_name: hookimpl(register_all)})()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_registration_skips_the_plugin_and_names_the_fix(case, caplog):
    hook_name, classes, message = CASES[case]
    plugin = plugin_registering(hook_name, classes)
    pm.register(plugin, name="kvstacks-bad-test")
    try:
        reg = registry()
        failure = next(f for f in failures if f.entry_point == "kvstacks-bad-test")
        assert message in failure.error
        assert not pm.is_registered(plugin)
        assert "lru" in reg.names("eviction_policies")  # the rest still loads
        assert "good-backend" not in reg.names("backends")
        assert "kvstacks-bad-test" in caplog.text
    finally:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        failures[:] = [f for f in failures if f.entry_point != "kvstacks-bad-test"]


def test_a_good_registration_passes():
    plugin = plugin_registering("register_backends", [GoodBackend])
    pm.register(plugin, name="kvstacks-good-test")
    try:
        assert registry().entries["backends"]["good-backend"].cls is GoodBackend
    finally:
        pm.unregister(plugin)
