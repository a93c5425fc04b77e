"""The bad-sample rate: single bad samples are skipped and counted (``lmm.data.errors``), but a
stage that skips too large a share of its samples is reading broken data and stops."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from lmm.errors import BadDataError

log = logging.getLogger("lmm")

# Skip messages logged (and kept for the report) per reason; the rest are only counted.
EXAMPLES_PER_REASON = 3


class BadSampleMonitor:
    """Counts the samples one stage (training, validation or test) was handed and those it
    had to skip, by reason; raises :class:`BadDataError` with a report when, after at least
    ``min_samples``, the skipped share exceeds ``max_fraction``."""

    def __init__(self, stage: str, max_fraction: float, min_samples: int) -> None:
        self.stage = stage
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def update(self, batch: dict[str, Any]) -> None:
        """Add one batch (``size`` used samples, ``skipped`` counts, ``skip_notes`` messages)."""
        skipped = batch.get("skipped") or {}
        self.seen += int(batch.get("size", 0)) + sum(skipped.values())
        self.skipped.update(skipped)
        for reason, message in batch.get("skip_notes") or []:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < EXAMPLES_PER_REASON:
                examples.append(message)
                log.warning("%s: skipped a sample (%s): %s", self.stage, reason, message)
        bad = sum(self.skipped.values())
        if self.seen >= self.min_samples and bad > self.max_fraction * self.seen:
            raise BadDataError(self.report())

    def report(self) -> str:
        bad = sum(self.skipped.values())
        lines = [
            f"data: {bad} of {self.seen} {self.stage} samples ({bad / max(1, self.seen):.1%}) were skipped, more than "
            f"data.max_bad_fraction={self.max_fraction} allows (checked from data.bad_fraction_min_samples="
            f"{self.min_samples} samples on). Skipped by reason:"
        ]
        for reason, n in self.skipped.most_common():
            lines.append(f"  {reason}: {n}")
            lines += [f"    e.g. {message}" for message in self.examples.get(reason, [])]
        lines.append(
            "Fix or drop these samples (the data_prep converters check every record and report what they "
            "leave out), or raise data.max_bad_fraction."
        )
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state.get("seen", 0))
        self.skipped = Counter({k: int(v) for k, v in (state.get("skipped") or {}).items()})
