"""Every exception lmm raises on purpose, in one place: each says what went wrong and what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the option and what is allowed."""


class UnknownComponentError(ConfigError):
    """A config named a component that no registry entry has."""


class MissingWeightsError(OSError):
    """Pretrained weights could not be found locally nor fetched."""


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


class ShardFormatError(ValueError):
    """A shard that cannot be indexed for random access (e.g. compressed)."""


class ConversationError(ValueError):
    """A conversation does not have the LLaVA schema or the turn structure a template needs."""


class NoAssistantTurnError(ConversationError):
    """A training conversation without any answer to learn from."""


class BadDataError(RuntimeError):
    """More samples were skipped than ``data.max_bad_fraction`` allows."""


class NonFiniteError(RuntimeError):
    """Training kept producing non-finite losses or gradients."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need unpickling arbitrary Python objects to load."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (empty, truncated, overwritten), or ``last.ckpt``
    missing while an older checkpoint is there; the message names a loadable one if any."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint of another model, freeze policy or data plan than this run's."""


class CheckpointWriteError(OSError):
    """A checkpoint cannot be written: no space left, a read-only file system, no permission."""


class CheckpointError(ValueError):
    """A directory given as ``--ckpt`` is not a usable lmm checkpoint directory."""


class ImageTokenMismatchError(ValueError):
    """The batch's ``<image>`` positions and the image features do not line up."""


class ExportError(ValueError):
    """The checkpoint has a part the Hugging Face LLaVA format cannot express."""


class ImportFormatError(ValueError):
    """A released model's files cannot become an lmm checkpoint directory (the message names the
    file or field and what to do)."""


class AnnotationError(ValueError):
    """An annotation file exists but does not have the expected format."""
