"""The health watch after an activation: pure logic, no I/O, time passed in.

For ``window_s`` seconds after a new model goes live the daemon records every inference's
latency and success here and asks for a verdict; on "breach" it rolls back. Keeping the
decision pure means it is tested with made-up clocks and latencies, not with sleeps.

What counts:
- error rate = failed / all recorded requests, judged once ``min_requests`` were seen. The
  daemon records ``ok=False`` only for failures of the model or the device, not for a client's
  malformed request (a 400 says nothing about the model).
- p95 latency over the successful requests (nearest-rank), judged once ``min_requests``
  successful requests were seen, against ``max_p95_latency_ms`` or, when that is 0, against
  ``LATENCY_FACTOR`` x the baseline p95 (from the bundle's validation) when one is known.
A breach is final; so is "healthy", reached when the window ends without a breach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.config import HealthConfig

LATENCY_FACTOR = 1.5
WATCHING, HEALTHY, BREACH = "watching", "healthy", "breach"


@dataclass(frozen=True)
class HealthVerdict:
    state: str                  # "watching" | "healthy" | "breach"
    reason: str                 # names the figure and the bound
    requests: int
    errors: int
    p95_ms: float | None
    p95_bound_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"state": self.state, "reason": self.reason, "requests": self.requests, "errors": self.errors,
                "error_rate": self.error_rate, "p95_ms": self.p95_ms, "p95_bound_ms": self.p95_bound_ms}


def p95(latencies: list[float]) -> float | None:
    """Nearest-rank 95th percentile (a value actually observed), None without data."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class HealthWatch:
    """Watches one activation. Not thread-safe: the daemon calls it under its own lock."""

    def __init__(self, cfg: HealthConfig, started_at: float, baseline_p95_ms: float | None = None) -> None:
        self.cfg = cfg
        self.started_at = started_at
        self.ends_at = started_at + cfg.window_s
        self.baseline_p95_ms = baseline_p95_ms
        if cfg.max_p95_latency_ms > 0:
            self.p95_bound_ms: float | None = cfg.max_p95_latency_ms
            self._bound_source = "max_p95_latency_ms"
        elif baseline_p95_ms and baseline_p95_ms > 0:
            self.p95_bound_ms = baseline_p95_ms * LATENCY_FACTOR
            self._bound_source = f"{LATENCY_FACTOR:g} x validated p95 {baseline_p95_ms:.1f} ms"
        else:
            self.p95_bound_ms = None
            self._bound_source = "none"
        self.requests = 0
        self.errors = 0
        self._latencies: list[float] = []
        self._final: HealthVerdict | None = None

    def record(self, latency_ms: float, ok: bool, now: float) -> None:
        """Count one inference; ignored outside the window or once the verdict is final."""
        if self._final is not None or not (self.started_at <= now <= self.ends_at):
            return
        self.requests += 1
        if ok:
            self._latencies.append(float(latency_ms))
        else:
            self.errors += 1

    def verdict(self, now: float) -> HealthVerdict:
        if self._final is not None:
            return self._final
        latency = p95(self._latencies)
        breach = self._breach(latency)
        if breach:
            self._final = self._make(BREACH, breach, latency)
            return self._final
        if now >= self.ends_at:
            if self.requests < self.cfg.min_requests:
                why = (f"window of {self.cfg.window_s:g} s passed with {self.requests} requests, fewer than "
                       f"min_requests {self.cfg.min_requests}; too few to judge, kept")
            else:
                why = (f"window of {self.cfg.window_s:g} s passed: error rate {self._rate():.1%} <= "
                       f"{self.cfg.max_error_rate:.1%}" + self._latency_text(latency, "<="))
            self._final = self._make(HEALTHY, why, latency)
            return self._final
        left = self.ends_at - now
        return self._make(WATCHING, f"{self.requests} requests, {self.errors} failed, "
                                    f"{left:.0f} s of the {self.cfg.window_s:g} s window left"
                                    + self._latency_text(latency, "vs"), latency)

    def _breach(self, latency: float | None) -> str:
        cfg = self.cfg
        if self.requests >= cfg.min_requests and self._rate() > cfg.max_error_rate:
            return (f"error rate {self._rate():.1%} ({self.errors} of {self.requests} requests) is over "
                    f"max_error_rate {cfg.max_error_rate:.1%}")
        if (self.p95_bound_ms is not None and latency is not None
                and len(self._latencies) >= cfg.min_requests and latency > self.p95_bound_ms):
            return (f"p95 latency {latency:.1f} ms over {len(self._latencies)} requests is over the bound "
                    f"{self.p95_bound_ms:.1f} ms ({self._bound_source})")
        return ""

    def _rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def _latency_text(self, latency: float | None, op: str) -> str:
        if latency is None or self.p95_bound_ms is None:
            return f", p95 {latency:.1f} ms (no bound)" if latency is not None else ""
        return f", p95 {latency:.1f} ms {op} bound {self.p95_bound_ms:.1f} ms ({self._bound_source})"

    def _make(self, state: str, reason: str, latency: float | None) -> HealthVerdict:
        return HealthVerdict(state, reason, self.requests, self.errors, latency, self.p95_bound_ms)


__all__ = ["HealthWatch", "HealthVerdict", "LATENCY_FACTOR", "p95", "WATCHING", "HEALTHY", "BREACH"]
