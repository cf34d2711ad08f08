"""Peak-RSS probes for the benchmark scripts (Linux ``/proc``, with a ``getrusage`` fallback).

``reset_peak()`` sets the process's high-water mark (VmHWM) back to its current RSS by writing ``5`` to
``/proc/self/clear_refs``; ``peak_kb() - rss_kb()`` taken around a piece of work is then that work's extra
peak memory. Where the reset is not allowed, ``ru_maxrss`` (the peak since process start) is used, which
is only meaningful in a fresh process.
"""

from __future__ import annotations

import resource
from typing import Optional


def status_kb(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_kb() -> int:
    """Peak RSS in kB: VmHWM, else ``ru_maxrss``."""
    hwm = status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_kb() -> int:
    """Current RSS in kB: VmRSS, else ``ru_maxrss``."""
    rss = status_kb("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
