"""Background threads that give way to serving: Linux's SCHED_IDLE class for shadow scoring.

A thread in SCHED_IDLE runs only on CPU time no other thread wants, and a waking thread of the
normal class preempts it at once. Threads it starts (llama.cpp's compute threads, the KLD helper)
inherit the class. Nice values alone were not enough: with nice 10, exact scoring slowed the
embedded clients' generation by 1.24x to 1.51x at p50 (docs/benchmarks.md), because the two
llama.cpp thread teams shared the cores and each waited at its barriers on threads the other had
preempted; with SCHED_IDLE, 1.04x to 1.08x.
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
