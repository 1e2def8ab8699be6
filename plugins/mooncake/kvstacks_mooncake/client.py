"""Making the Mooncake client: environment, import, setup; and what its return codes mean."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from kvstacks.breaker import CircuitBreaker, StoreUnavailable

from kvstacks_mooncake import process_exit
from kvstacks_mooncake.options import MooncakeOptions

# Mooncake's return codes (mooncake-store/include/types.h) that this tier acts on
NO_SPACE = -200  # NO_AVAILABLE_HANDLE: no segment has room
BUFFER_TOO_SMALL = -600  # INVALID_PARAMS, which get_into returns for a short buffer
NOT_FOUND = -704
ALREADY_EXISTS = -705
HAS_LEASE = -706
TRANSFER_FAIL = -800  # e.g. the segment holding the replica belongs to a dead process
RPC_FAIL = -900
RPC_TIMEOUT = -901
UNREACHABLE = (RPC_FAIL, RPC_TIMEOUT)

INSTALL_HINT = ("pip install mooncake-transfer-engine-non-cuda==0.3.13.post1, and apt-get install -y libibverbs1 "
                "(the wheel links it even for TCP)")


class MooncakeUnavailable(StoreUnavailable):
    """The Mooncake master cannot be reached (or the breaker is open because it could not be recently)."""


class MooncakeError(RuntimeError):
    """Mooncake refused a call for a reason other than being unreachable."""


class MooncakeBreaker(CircuitBreaker):
    service = "Mooncake"
    error = MooncakeUnavailable


def prepare_environment(o: MooncakeOptions) -> None:
    """Environment the client reads when it starts; an operator's own settings win."""
    # the address the transfer engine advertises to the other processes
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", o.local_hostname)
    # setup() retries 20 times, ~4.5 s each, when the master is down; this tier retries on its own
    os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", "1")
    # Mooncake logs every step at INFO through glog; warnings and errors are enough
    os.environ.setdefault("GLOG_minloglevel", "1")


def connect(o: MooncakeOptions) -> Any:
    """A set-up ``MooncakeDistributedStore`` (blocking); raises MooncakeUnavailable or ImportError."""
    prepare_environment(o)
    # setup() holds the GIL while it tries the master (~4.5 s when nobody answers), freezing every
    # thread of the process: ask the kernel first, which refuses at once when no master listens
    try:
        socket.create_connection(o.master_address, timeout=o.connect_timeout).close()
    except OSError as exc:
        raise MooncakeUnavailable(f"no Mooncake master at {o.master} ({exc.strerror or exc})") from None
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        raise ImportError(f"the mooncake tier cannot load Mooncake ({exc}); {INSTALL_HINT}") from exc
    store = MooncakeDistributedStore()
    rc = store.setup(o.local_hostname, o.metadata_server, int(o.segment_bytes), int(o.local_buffer_bytes),
                     o.protocol, o.device, o.master)
    if rc != 0:
        raise MooncakeUnavailable(f"Mooncake client setup failed (code {rc}) against master {o.master}")
    process_exit.track(store, o.master_address)
    return store


# Clients a closed tier left for the next one with the same settings. Mooncake's close()
# holds the GIL for about 2 s (it joins its own threads), which would freeze every thread
# of the process; kept clients are torn down at exit instead (process_exit).
_idle: dict[tuple, list[Any]] = {}
_idle_lock = threading.Lock()


def _setup_key(o: MooncakeOptions) -> tuple:
    return (o.master, o.metadata_server, o.protocol, o.device, o.local_hostname, int(o.segment_bytes),
            int(o.local_buffer_bytes))


def take_client(o: MooncakeOptions) -> Any:
    """An idle client set up with ``o``'s settings, or a new one (blocking)."""
    with _idle_lock:
        idle = _idle.get(_setup_key(o))
        store = idle.pop() if idle else None
    if store is None:
        return connect(o)
    # a master that went away fails this tier at once, as it does a new client's (connect)
    if not process_exit.master_answers(o.master_address, o.connect_timeout):
        keep_client(o, store)
        raise MooncakeUnavailable(f"no Mooncake master at {o.master}")
    return store


def keep_client(o: MooncakeOptions, store: Any) -> None:
    """Keep ``store`` for the next tier with the same settings (the caller unregistered its memory)."""
    with _idle_lock:
        _idle.setdefault(_setup_key(o), []).append(store)


def take_all_idle() -> list[Any]:
    """Every idle client, no longer kept (for the exit handler)."""
    with _idle_lock:
        stores = [store for idle in _idle.values() for store in idle]
        _idle.clear()
    return stores


def replicate_config(o: MooncakeOptions) -> Any:
    from mooncake.store import ReplicateConfig

    config = ReplicateConfig()
    config.replica_num = o.replica_num
    return config
