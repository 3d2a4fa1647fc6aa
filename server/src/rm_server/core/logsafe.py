"""What clients send reaches the log bounded and escaped, and repeated refusals do not flood it."""

from __future__ import annotations

import time

REFUSAL_LOG_INTERVAL_S = 10.0


def loggable(text: str, limit: int = 128) -> str:
    """At most `limit` characters of client text, control characters escaped (a newline in a request id
    must not forge a log line), with the full length noted when cut."""
    escaped = text[:limit].encode("unicode_escape").decode("ascii")
    return escaped + (f"...({len(text)} chars)" if len(text) > limit else "")


class RefusalLog:
    """One log line per (method, status) every REFUSAL_LOG_INTERVAL_S at most, saying how many refusals of
    that kind it stands for; the metrics count every one of them."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S):
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def admit(self, method: str, code: str) -> int | None:
        """None: do not log this one. Otherwise log it, noting this many suppressed since the last line."""
        key, now = (method, code), time.monotonic()
        if now - self._last.get(key, -float("inf")) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
