"""A client-side model of the homeserver's message rate limit.

Synapse's `rc_message` is a leaky bucket (default 0.2 events/s, burst 10) that
counts every event the bot sends, edits included. Mirroring it lets the edit
scheduler spend sends where they matter instead of learning the limit from
429 responses; a 429 still corrects the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second up to `burst`; rate <= 0 means unlimited (bot exempted)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self._clock = clock
        # Not quite full: joining a room or the run before a restart has usually spent some.
        self._tokens = float(self.burst - 1)
        self._updated = clock()
        self._blocked_until = 0.0

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def available(self) -> float:
        """Tokens that can be spent now (0 while a 429 back-off lasts)."""
        if self.unlimited:
            return float("inf") if self._clock() >= self._blocked_until else 0.0
        self._refill()
        return self._tokens if self._clock() >= self._blocked_until else 0.0

    def take(self) -> None:
        if not self.unlimited:
            self._refill()
            self._tokens -= 1

    def seconds_until(self, tokens: float) -> float:
        """How long until `tokens` can be spent (0 if now)."""
        now = self._clock()
        wait = max(self._blocked_until - now, 0.0)
        if self.unlimited:
            return wait
        self._refill()
        missing = tokens - self._tokens
        return max(wait, missing / self.rate if missing > 0 else 0.0)

    def blocked_for(self) -> float:
        """Seconds left of a 429's wait (0 if none)."""
        return max(self._blocked_until - self._clock(), 0.0)

    def tokens(self) -> float:
        """Tokens in the bucket, whether or not a 429's wait lets them be spent now."""
        if self.unlimited:
            return float("inf")
        self._refill()
        return self._tokens

    def limited(self, retry_after_s: float) -> None:
        """The homeserver said 429: nothing for `retry_after_s`, then exactly one send."""
        self._refill()
        if not self.unlimited:
            self._tokens = min(self._tokens, 1.0 - self.rate * retry_after_s)
        self._blocked_until = max(self._blocked_until, self._clock() + retry_after_s)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
