"""Sample-level problems: each is skipped and counted under its reason, never fatal."""
from __future__ import annotations

# Reasons a sample is skipped; counters and TensorBoard scalars use these exact names.
SKIP_REASONS = (
    "malformed",  # json missing / not the LLaVA schema
    "image_decode",  # corrupt, truncated or empty image bytes
    "image_count",  # number of <image> tokens differs from the number of images
    "no_assistant",  # nothing to learn from
    "overlong",  # no supervised token fits in max_length (or prompt too long)
    "shard_read",  # a tar member or shard could not be read
)


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


class TemplateMismatchError(ValueError):
    """The template's spans and the tokenizer's tokens disagree: a bug, not bad data."""


class UnsafeShardError(ValueError):
    """A shard holds a member type that would execute code when decoded (pickle)."""
