"""±10 % jitter for every wait the relay schedules, so work started together spreads out."""

from __future__ import annotations

import random

SPREAD = 0.1


def jittered(seconds: float) -> float:
    return seconds * random.uniform(1 - SPREAD, 1 + SPREAD)  # noqa: S311 - not security-sensitive
