"""Flood-control emulation for message-sending methods.

Choice: **token buckets**, not sliding windows.  A bucket with rate ``r`` per
``period`` seconds holds at most ``capacity`` tokens (``max(1, r)``, so one
second's / one minute's worth of burst) and refills continuously.  This handles
fractional limits (``0.5`` msgs/sec) that a sliding window cannot express, and
``retry_after`` falls straight out of the deficit: ``ceil((1 - tokens) / refill)``
-- an integer >= 1 like Telegram's.  Telegram's own limits are documented as
"about 30 msgs/sec overall, 1 msg/sec per private chat, 20 msgs/min per group";
the exact algorithm is unpublished, a bucket is a faithful enough model for
testing that a bot honours ``retry_after``.

A rejected request consumes nothing (Telegram does not charge refused sends).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``rate`` tokens per ``period`` seconds, burst up to ``capacity``."""

    rate: float
    period: float = 1.0
    capacity: float = 0.0
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.capacity <= 0:
            self.capacity = max(1.0, self.rate)
        if self.tokens < 0:
            self.tokens = self.capacity

    @property
    def refill_per_sec(self) -> float:
        return self.rate / self.period

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_sec)
        self.stamp = now

    def wait_time(self, cost: float = 1.0, now: float | None = None) -> float:
        """Seconds until ``cost`` tokens are available (0 if available now)."""
        self._refill(time.monotonic() if now is None else now)
        deficit = min(cost, self.capacity) - self.tokens
        return 0.0 if deficit <= 1e-9 else deficit / self.refill_per_sec

    def take(self, cost: float = 1.0) -> None:
        self.tokens -= min(cost, self.capacity)


@dataclass
class RateLimits:
    """Configured limits; ``None`` disables a limit (all off by default)."""

    global_per_sec: float | None = None
    private_per_sec: float | None = None
    group_per_min: float | None = None

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.global_per_sec, self.private_per_sec,
                                            self.group_per_min))


class RateLimiter:
    """Per-bot set of buckets: one global, one per chat."""

    def __init__(self, limits: Callable[[], RateLimits]) -> None:
        self._limits = limits
        self._buckets: dict[tuple[str, int], TokenBucket] = {}

    def _bucket(self, key: tuple[str, int], rate: float, period: float) -> TokenBucket:
        b = self._buckets.get(key)
        if b is None or b.rate != rate or b.period != period:
            b = self._buckets[key] = TokenBucket(rate=rate, period=period)
        return b

    def check(self, chat_id: int, is_private: bool, cost: int = 1) -> int | None:
        """Charge ``cost`` messages; return ``retry_after`` seconds if over a limit."""
        cfg = self._limits()
        if not cfg.enabled:
            return None
        buckets: list[TokenBucket] = []
        if cfg.global_per_sec is not None:
            buckets.append(self._bucket(("global", 0), cfg.global_per_sec, 1.0))
        if is_private and cfg.private_per_sec is not None:
            buckets.append(self._bucket(("chat", chat_id), cfg.private_per_sec, 1.0))
        if not is_private and cfg.group_per_min is not None:
            buckets.append(self._bucket(("chat", chat_id), cfg.group_per_min, 60.0))
        now = time.monotonic()
        wait = max((b.wait_time(cost, now) for b in buckets), default=0.0)
        if wait > 0:
            return max(1, math.ceil(wait))
        for b in buckets:
            b.take(cost)
        return None

    def reset(self) -> None:
        self._buckets.clear()
