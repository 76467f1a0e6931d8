"""Background threads that give way to serving: Linux's SCHED_IDLE class for shadow scoring.

A thread in SCHED_IDLE runs only on CPU time no other thread wants, and a waking thread of the
normal class preempts it at once. Threads it starts (llama.cpp's compute threads, the KLD helper)
inherit the class. A nice value alone is not enough: two llama.cpp thread teams sharing the cores
each wait at their barriers on threads the other has preempted, so a niced scorer still slows
generation (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

FALLBACK_NICE = 19  # where SCHED_IDLE is refused (not Linux, a restricted container)


def lower_thread_priority() -> bool:
    """Put the calling thread in SCHED_IDLE, or else at nice 19. False where neither is allowed."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, FALLBACK_NICE)
        return True
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        log.debug("could not lower a background thread's priority")
        return False
