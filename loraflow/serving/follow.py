"""The stack's serving reconciler (`loraflow serve --follow`, started by `loraflow up`): one long-lived process, so
an alias move is served in seconds, not after a new process per pass. Each job has its own lane: a pass runs as
soon as its alias moves (`notify`), passes of one job never overlap and a burst of moves is coalesced into one
more pass that reads the aliases afresh; different jobs pass side by side. Every few seconds a cheap drift check
(no pass, no record) compares each served job with the registry and starts a pass only when they differ: the
fallback for a lost webhook delivery, a crashed endpoint, or a job whose serving was never started.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowedJob:
    model: str  # the registered model: what an alias event names
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)


RunPass = Callable[[FollowedJob, str, datetime | None], None]


@dataclass
class _Lane:
    busy: bool = False
    why: str | None = None  # a pass is due, and why
    promoted_at: datetime | None = None


class Follower:
    """`run_pass(job, why, promoted_at)` does one recorded pass; `jobs()` lists what to follow now; `drift(job)` says
    why a job needs a pass (None: it serves what the registry says)."""

    def __init__(self, jobs: Callable[[], list[FollowedJob]], run_pass: RunPass,
                 drift: Callable[[FollowedJob], str | None], poll_s: float = 10.0):
        self.jobs, self.run_pass, self.drift, self.poll_s = jobs, run_pass, drift, poll_s
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self.passes = 0

    def notify(self, model: str, promoted_at: datetime | None, why: str) -> None:
        """A pass of `model`'s job is due (an alias moved): now, or right after the one running."""
        with self._lock:
            lane = self._lanes.setdefault(model, _Lane())
            lane.why = why
            if promoted_at is not None and (lane.promoted_at is None or promoted_at > lane.promoted_at):
                lane.promoted_at = promoted_at
            if lane.busy:
                return
            lane.busy = True
        threading.Thread(target=self._drain, args=(model,), name=f"serve-{model}", daemon=True).start()

    def _drain(self, model: str) -> None:
        while True:
            with self._lock:
                lane = self._lanes[model]
                why, promoted_at = lane.why, lane.promoted_at
                if why is None:
                    lane.busy = False
                    return
                lane.why, lane.promoted_at = None, None
            job = next((j for j in self.jobs() if j.model == model), None)
            if job is None:
                log.info("%s: %s, but no served job registers it: nothing to do", model, why)
                continue
            try:
                self.run_pass(job, why, promoted_at)
            except Exception:  # one failed pass must not stop the lane: the next event or drift check tries again
                log.exception("%s: pass failed (%s)", model, why)
            self.passes += 1

    def check_drift(self) -> None:
        for job in self.jobs():
            try:
                why = self.drift(job)
            except Exception as error:  # a registry or endpoint that does not answer now: the next check sees
                log.warning("%s: drift check failed: %s", job.model, error)
                continue
            if why is not None:
                self.notify(job.model, None, why)

    def run(self, stop: threading.Event) -> None:
        """Check for drift every `poll_s` until `stop` is set (alias events call `notify` meanwhile)."""
        while not stop.is_set():
            self.check_drift()
            stop.wait(self.poll_s)
