"""One signal policy for every command: SIGINT and SIGTERM end a run the same way, cleanly.

`merge.console` installs it before anything heavy is imported: during start-up a signal is only
recorded (a torn import gave tracebacks, an abort, or was swallowed), and acted on as soon as the
command line has loaded; from then on SIGINT raises KeyboardInterrupt and SIGTERM `Terminated`
(a KeyboardInterrupt), so every `with StagedOutput(...)` removes its staging on the way out.
The CLI exits 130 after SIGINT and 143 after SIGTERM. Standard library only.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from merge.errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []


def _record(signum: int, frame: object) -> None:
    _pending.append(signum)


def _raise(signum: int, frame: object) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _ours() -> list[int]:
    """The signals to handle: not those ignored by whoever started us (`nohup`, `cmd &`)."""
    return [s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


def defer_signals() -> None:
    """Record SIGINT/SIGTERM instead of acting on them (start-up: imports must not be torn)."""
    for s in _ours():
        try:
            signal.signal(s, _record)
        except ValueError:  # not the main thread
            return


def raise_on_signals() -> int | None:
    """SIGINT raises KeyboardInterrupt, SIGTERM `Terminated`; returns a signal deferred until now."""
    for s in _ours():
        try:
            signal.signal(s, _raise)
        except ValueError:
            return None
    return _pending[0] if _pending else None


def exit_code(e: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 143 if isinstance(e, Terminated) else 130


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back around steps that must not be torn; delivered on the way out.

    The Python-level handler is swapped, not the thread's signal mask: a signal sent to the
    process may land on any thread (the prefetch pool, a progress bar), and Python runs its
    handler in the main thread whichever thread took it.
    """
    caught: list[int] = []
    try:
        old = {s: signal.signal(s, lambda n, f: caught.append(n)) for s in SIGNALS}
    except ValueError:  # not the main thread: no handler of ours can run here anyway
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])
