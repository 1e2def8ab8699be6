"""Mooncake clients when the process exits: torn down while their master answers, left alone once it is gone.

Mooncake tears every client down when the process ends (the client's destructor, and an exit
handler of its own for clients still alive then): the client tells its master it unmounts its
segment and joins its threads. With the master gone, every one of those calls retries for about
4.5 s, and the client's heartbeat thread, once it has noticed, is in such retries itself: 5-15 s
a client, a minute and more for a process holding several (a test session, or an engine whose
tiers kept their clients), for nothing: a master that is gone has nothing to unmount, and a
restarted one never knew the client.

So at exit, before Python tears anything down, each client this process set up and still holds:

- whose master answers, and which no tier uses (kept by ``keep_client``): closed now, a clean
  unmount while every module is still there;
- whose master does not answer: never torn down. Python keeps it (one reference it never gives
  back), and once Python has finished, the process ends with its exit status before the C
  library's exit handlers run (Mooncake's among them), after flushing C's output streams.

"Answers" is a TCP connection within ``PROBE_TIMEOUT``: a master that accepts but hangs (stopped,
or stuck) still costs the client's own RPC timeout.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kvstacks.mooncake")

#: seconds a master has to accept a connection at exit for its clients to be torn down
PROBE_TIMEOUT = 1.0

_clients: list[tuple[weakref.ref, tuple[str, int]]] = []
_lock = threading.Lock()
_registered = False
_native_exit_skipped = False


def track(store: Any, master: tuple[str, int]) -> None:
    """Remember a set-up client and its master's address for the exit handler."""
    global _registered
    with _lock:
        _clients[:] = [(ref, address) for ref, address in _clients if ref() is not None]
        _clients.append((weakref.ref(store), master))
        if not _registered:
            atexit.register(settle_at_exit)
            _registered = True


def master_answers(address: tuple[str, int], timeout: float = PROBE_TIMEOUT) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def settle_at_exit(idle: Callable[[], list[Any]] | None = None) -> None:
    """Close idle clients whose master answers; keep every client whose master does not from being torn down."""
    if idle is None:
        from kvstacks_mooncake.client import take_all_idle as idle
    kept = idle()
    kept_ids = {id(store) for store in kept}
    with _lock:
        live = [(store, address) for store, address in ((ref(), address) for ref, address in _clients)
                if store is not None]
    answers: dict[tuple[str, int], bool] = {}
    stranded = []
    for store, address in live:
        if address not in answers:
            answers[address] = master_answers(address)
        if not answers[address]:
            stranded.append(store)
        elif id(store) in kept_ids:
            try:
                store.close()
            except Exception as exc:  # exiting anyway: say so, do not stop the other handlers
                log.warning("mooncake client of master %s:%d did not close cleanly: %s", *address, exc)
    if stranded:
        gone = sorted({f"{host}:{port}" for (host, port), up in answers.items() if not up})
        log.info("mooncake: master %s gone at exit; %d client(s) left without teardown", ", ".join(gone),
                 len(stranded))
        for store in stranded:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(store))  # never destroyed by Python
        skip_native_exit_handlers()


def skip_native_exit_handlers() -> None:
    """After Python has finished, flush C's streams and end the process with its status, skipping the
    C exit handlers registered before this call (Mooncake's teardown of the clients still alive)."""
    global _native_exit_skipped
    if _native_exit_skipped:
        return
    try:
        libc = ctypes.CDLL(None)
        on_exit, cxa_atexit = libc.on_exit, libc.__cxa_atexit
        end, flush = libc._exit, libc.fcloseall
    except AttributeError as exc:  # not glibc: Mooncake's teardown runs, slowly
        log.warning("mooncake: cannot skip the teardown of clients whose master is gone (%s); exit may take a while",
                    exc)
        return
    on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    cxa_atexit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    # exit() runs its handlers last registered first: fcloseall(), then _exit(status)
    if on_exit(ctypes.cast(end, ctypes.c_void_p), None) != 0:
        return
    cxa_atexit(ctypes.cast(flush, ctypes.c_void_p), None, None)
    _native_exit_skipped = True
