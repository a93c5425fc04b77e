"""What ``lmm test`` writes: ``metrics.json`` and one ``predictions_{set}.jsonl`` per eval set."""

from __future__ import annotations

import json
import os
from typing import Any


def write_test_results(
    out_dir: str, metrics: dict[str, Any], per_set: dict[str, list[dict]]
) -> str:
    """Write the metrics and every set's prediction records (in their original order) to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    for name, records in per_set.items():
        with open(os.path.join(out_dir, f"predictions_{name}.jsonl"), "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return out_dir
