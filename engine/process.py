"""Process plumbing shared by the supervisor, the API and `prefetch dev`.

Every role names itself for `ps`. Forked children leave the terminal's process group, so a
Ctrl-C reaches only their parent, which forwards one SIGTERM: otherwise each child would get
the terminal's SIGINT *and* the forwarded signal, and "a second signal kills" would turn
every Ctrl-C into a kill instead of a drain. PR_SET_PDEATHSIG stops orphans if the parent
itself is killed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from collections.abc import Callable

import setproctitle

from engine import logs

_PR_SET_PDEATHSIG = 1


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
