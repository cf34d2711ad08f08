"""Schedules for the temperature and alpha over training: constant, linear or cosine.

A schedule is a pure function of progress ``p = step / max_steps`` in [0, 1], so a resumed run (which
restores ``global_step``) continues on the same curve with nothing extra to save:

    constant  v(p) = start
    linear    v(p) = start + (end - start) · p
    cosine    v(p) = end + (start - end) · (1 + cos(π p)) / 2
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def scheduled_value(schedule: str, start: float, end: float, progress: float) -> float:
    """Value of ``schedule`` from ``start`` to ``end`` at ``progress`` (clamped to [0, 1])."""
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return float(start)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
    raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
