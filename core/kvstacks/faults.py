"""Which failures are worth retrying, and warnings that do not flood the log.

A full disk, a read-only filesystem or a refused permission will not heal within
an offload's backoff: retrying only delays the drop and multiplies the noise. Such
*permanent* failures fail at once; anything else (a timeout, a refused connection,
an unknown error) is *transient* and retried. Every failure is counted by *kind*:
the errno name (``ENOSPC``) or the exception class (``ConnectionError``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time

from kvstacks.errors import ConfigError, InvalidInput, PermanentError

#: errnos that retrying cannot fix: the operator has to act (free space, remount, chmod)
PERMANENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
    errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
})


def kind(exc: BaseException) -> str:
    """The failure's kind for counting: an errno name, else the exception's class name."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno{exc.errno}")
    return type(exc).__name__


def is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, (PermanentError, InvalidInput, ConfigError, TypeError, NotImplementedError)):
        return True
    return isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS


class BurstLog:
    """Log the first failure of a kind at once; the rest of its burst as one line with a count.

    A burst is what follows within ``interval`` seconds of a logged line. When the
    caller runs on an event loop, the count is logged when the interval ends; otherwise
    it rides on the next line of that kind.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[int, str]] = {}  # kind -> (suppressed so far, the latest message)

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                count, _ = self._held.get(key, (0, ""))
                self._held[key] = (count + 1, message)
                if count == 0:
                    self._schedule(key, last + self.interval - now)
                return
            self._last[key] = now
            count, _ = self._held.pop(key, (0, ""))
        suffix = f" (and {count} more like it in the previous {self.interval:g} s)" if count else ""
        self.logger.warning("%s%s", message, suffix)

    def _schedule(self, key: str, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(max(0.0, delay), self.flush, key)

    def flush(self, key: str | None = None) -> None:
        """Log the held count of ``key`` (or of every kind) now."""
        with self._lock:
            keys = list(self._held) if key is None else [key]
            held = [(k, self._held.pop(k)) for k in keys if k in self._held]
            now = time.monotonic()
            for k, _ in held:
                self._last[k] = now
        for _, (count, message) in held:
            self.logger.warning("%s (%d more like it in the last %g s)", message, count, self.interval)
