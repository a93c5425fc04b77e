"""Values the data and model sides must agree on, defined once."""

from __future__ import annotations

IGNORE_INDEX = -100


IMAGE_TOKEN = "<image>"
