"""Stop requests from Slurm, recorded by a signal handler and acted on at the next step boundary.

Slurm sends USR2 before the time limit or on preemption (the job should be requeued) and TERM when the job is
cancelled or requeued by someone else. The handler only records the request: collectives cannot run inside it.
No torch here, so the job can install it the moment it starts.
"""

from __future__ import annotations

import signal
import time

SIGNALS = {signal.SIGUSR2: "requeue", signal.SIGTERM: "stop"}
_requests: list[str] = []
_deadline: list[float] = []


def _record(signum, frame) -> None:
    _requests.append(SIGNALS[signal.Signals(signum)])


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _record)


def set_deadline(when: float | None) -> None:
    """After `when` (time.time()), ask for a requeue as USR2 would: the allocation is about to end."""
    _deadline[:] = [] if when is None else [when]


def requested() -> str | None:
    """"requeue" if any USR2 came or the deadline passed, else "stop" if a TERM came, else None."""
    if "requeue" in _requests or (_deadline and time.time() > _deadline[0]):
        return "requeue"
    return "stop" if _requests else None


def end_fits(seconds: float, lead_s: float) -> bool:
    """Whether work of about `seconds` after the last step (the Hugging Face export) ends before the allocation
    does: the deadline is `lead_s` before the limit. False after a stop request (the job is being ended)."""
    if _requests:
        return False
    if not _deadline:
        return True
    return time.time() + 1.5 * seconds < _deadline[0] + lead_s
