"""Process plumbing shared by the supervisor, the API and `prefetch dev`.

Every role names itself for `ps`. Forked children leave the terminal's process group, so a
Ctrl-C reaches only their parent, which forwards one SIGTERM: otherwise each child would get
the terminal's SIGINT *and* the forwarded signal, and "a second signal kills" would turn
every Ctrl-C into a kill instead of a drain. PR_SET_PDEATHSIG stops orphans if the parent
itself is killed.

A serving process settles its heap once it is up (`settle_heap`): what is alive then stays
alive, and requests and jobs leave almost no cyclic garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

import setproctitle

from engine import logs

_PR_SET_PDEATHSIG = 1

# Generation-0 collection threshold (tracked objects) of the API and the workers.
YOUNG_GC_THRESHOLD = 10_000


def set_title(title: str) -> None:
    """Name this process for `ps`, e.g. `prefetch: worker 1`, and its log lines' role (worker)."""
    setproctitle.setproctitle(title)
    logs.set_role(title.removeprefix("prefetch: ").split(" ", 1)[0])


def become_child(death_signal: int = signal.SIGTERM) -> None:
    """In a freshly forked child: own process group, and a signal if the parent dies."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fork_child(name: str, body: Callable[[], int]) -> int:
    """Fork; the child runs `body()` (returning an exit code) and never returns here."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        become_child()
        code = body()
    except BaseException:
        logging.getLogger("engine.process").exception("%s crashed", name)
    finally:
        logging.shutdown()
        os._exit(code)


def settle_heap() -> None:
    """Call once a serving process is up: freeze its heap, raise the young-collection threshold.

    Everything alive by then (modules, the app or the worker, its Runtime) lives as long as the
    process. gc.freeze() keeps it out of every later collection: otherwise each full collection
    rescans it while requests and jobs churn objects, a pause of ~80 ms that set the reads'
    p99 (tuning.md, "Cached reads"). A read or a job leaves almost no cyclic garbage, yet the
    default threshold (700) ran a young collection every few reads and, in a worker, every
    job or two: what requests and jobs in flight hold crosses it, and each collection walks
    it (tuning.md, "Garbage collection in the workers"). 10,000 lies above them; cyclic
    garbage (an error's traceback) waits for at most that many new objects.
    """
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """Within the block, SIGTERM and SIGINT set the event (handled on the running loop)
    instead of ending the process: a serving process awaits it, then tears down what it
    started. Their default action is back after the block."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
