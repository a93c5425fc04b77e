"""Sample-level problems: each is skipped and counted under its reason, never fatal."""
from __future__ import annotations

# Reasons a sample is skipped; counters and TensorBoard scalars use these exact names.
SKIP_REASONS = (
    "malformed",  # json missing / not the LLaVA schema
    "image_decode",  # corrupt, truncated or empty image bytes, or not an allowed image format
    "image_too_large",  # more pixels than data.max_image_pixels (a decompression bomb is never decoded)
    "image_mode",  # a pixel mode that cannot be converted to RGB
    "image_count",  # number of <image> tokens differs from the number of images
    "no_assistant",  # nothing to learn from
    "overlong",  # no supervised token fits in max_length (or prompt too long)
    "shard_read",  # a tar member or shard could not be read
)


# Reasons a converter (data_prep) leaves a record out of the shards; the same names as above
# where the meaning is the same, plus the ones only a converter can see.
CONVERT_SKIP_REASONS = (
    "malformed",  # not a JSON object / no valid conversation / bad "image" field
    "no_assistant",  # no non-empty assistant answer
    "image_missing",  # an image file does not exist (or its path leaves the image folder)
    "image_decode",  # an image file is unreadable, truncated or corrupt (fully decoded to check)
    "image_count",  # number of <image> tokens differs from the number of images
    "overlong",  # text tokens + images x image tokens exceed --max-tokens
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
