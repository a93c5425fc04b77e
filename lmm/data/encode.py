"""Sample -> token ids, labels and pixels: ``<image>`` placed (``lmm.data.placement``), the
template rendered, tokenized with offsets (``lmm.data.tokenization``), labels taken from the
assistant spans, ``<image>`` expanded to N ids, truncation that never cuts an image span."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from lmm.constants import IGNORE_INDEX
from lmm.data.image import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    ImageTransform,
    decode_image,
)
from lmm.data.placement import IMAGE_PLACEMENTS, place_images
from lmm.data.templates import Template, parse_conversation
from lmm.data.tokenization import TOKENIZATIONS, tokenize
from lmm.data.visuals import modality_of, placeholders, tiles, video_unsupported
from lmm.errors import (
    ConfigError,
    ConversationError,
    NoAssistantTurnError,
    SampleError,
    TemplateMismatchError,
    UnsafeShardError,
)
from lmm.visual.image_batch import ImageBatch, PixelValues
from lmm.visual.image_spec import ImageSpec
from lmm.visual.layout import VisualLayout

_SPACE = " \t\n\r"  # characters an answer span may leave untokenized
# Members that would run code when decoded; a shard holding one is refused outright.
_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz")


@dataclass
class Processor:
    """Model-side facts the data needs: tokenizer, image spec, tokens per image.

    ``layout`` (the model's ``image_layout``; None without ``model.vision.anyres/video``) makes
    each image's tokens depend on its size and kind, and ``pixel_values`` an ``ImageBatch``.
    """

    tokenizer: Any
    image_spec: ImageSpec
    num_image_tokens: int
    image_token_id: int
    layout: Optional[VisualLayout] = None


class SampleEncoder:
    """Turns raw shard samples (json + image bytes) into model inputs for one stage.

    ``image_placement`` and ``tokenization`` are the data options of the same names (see
    ``lmm.data.placement`` and ``lmm.data.tokenization``); the defaults reproduce LLaVA and
    TinyLLaVA. The tokenizer must be a fast one (character offsets give the labels).
    """

    def __init__(
        self,
        processor: Processor,
        template: Template,
        max_length: int,
        blank_images: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        image_placement: str = "llava",
        tokenization: str = "chunked",
    ) -> None:
        for option, value, allowed in (
            ("data.image_placement", image_placement, IMAGE_PLACEMENTS),
            ("data.tokenization", tokenization, TOKENIZATIONS),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"{option}: unknown value {value!r}; allowed: {', '.join(allowed)}"
                )
        tok = processor.tokenizer
        # The Rust tokenizer behind a fast tokenizer gives the ids and character offsets the
        # labels come from, without transformers' per-call overhead (about a third of the
        # encoding time on short conversations). A slow tokenizer has no offsets at all.
        self._backend = getattr(tok, "backend_tokenizer", None)
        if self._backend is None:
            name = getattr(tok, "name_or_path", "") or type(tok).__name__
            raise ConfigError(
                f"model.llm.name_or_path: the tokenizer of {name!r} ({type(tok).__name__}) has no fast version, "
                "and lmm takes labels from a fast tokenizer's character offsets. Point model.llm.name_or_path at a "
                "checkpoint that ships a tokenizer.json (transformers converts most SentencePiece and BPE "
                "tokenizers: AutoTokenizer.from_pretrained(path).save_pretrained(out) writes one)."
            )
        self.image_placement = image_placement
        self.tokenization = tokenization
        self.processor = processor
        self.max_image_pixels = max_image_pixels
        # A template sees the tokenizer once: checks its end-of-turn, or renders with it (``tokenizer``).
        self.template = template.bind(tok)
        self.max_length = max_length
        self.blank_images = blank_images
        self.transform = ImageTransform(processor.image_spec)
        self.eos = tok.eos_token
        stop = self.template.stop_string(self.eos)
        self._stop_id = (
            tok.convert_tokens_to_ids(stop)
            if self.template.stop_at_end_of_turn and stop in tok.get_vocab()
            else None
        )
        self._always_supervised = np.asarray(
            self.template.always_supervised_ids(tok), dtype=np.int64
        )

    def train_sample(self, raw: dict[str, Any]) -> dict:
        """Raw shard sample -> training inputs (picklable, for worker processes)."""
        return self.encode_train(*self.unpack(raw))

    def prompt_sample(self, raw: dict[str, Any]) -> dict:
        """Raw shard sample -> generation prompt."""
        return self.encode_prompt(*self.unpack(raw))

    # -- raw shard sample -> (meta, images) -------------------------------------------------

    def unpack(self, raw: dict[str, Any]) -> tuple[dict, list]:
        """Parse the json member and decode the image members (sorted by member name)."""
        key = raw.get("__key__", "?")
        for name in raw:
            if name.rsplit(".", 1)[-1].lower() in _PICKLE_EXTENSIONS:
                raise UnsafeShardError(
                    f"{raw.get('__url__', '?')}: sample {key!r} has a {name!r} member; pickled members are "
                    "refused because decoding them would execute code. Re-write the shard without it."
                )
        if "json" not in raw:
            raise SampleError("malformed", f"sample {key!r} has no .json member")
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise SampleError("malformed", f"sample {key!r}: invalid json ({err})") from None
        if not isinstance(meta, dict):
            raise SampleError("malformed", f"sample {key!r}: json is not an object")
        meta.setdefault("id", key)
        images = []
        for name in sorted(n for n in raw if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS):
            try:
                images.append(decode_image(raw[name], self.max_image_pixels))
            except SampleError as err:
                raise SampleError(err.reason, f"sample {key!r}: member {name!r}: {err}") from None
        return meta, images

    def visual_inputs(
        self, meta: dict, images: list
    ) -> tuple[list[int], Callable[[int], PixelValues]]:
        """Tokens per ``<image>`` placeholder, and a function giving the ``pixel_values`` of the
        first k placeholders (truncation may keep fewer)."""
        n = self.processor.num_image_tokens
        layout = self.processor.layout
        if layout is None:
            if modality_of(meta) == "video":
                raise video_unsupported(meta)
            return [n] * len(images), lambda k: self.pixels(images[:k])
        items = placeholders(meta, images, layout)

        def pixel_values(k: int) -> ImageBatch:
            kept = items[:k]
            parts = [tiles(v, imgs, layout, self.transform, self.blank_images) for v, imgs in kept]
            return ImageBatch.of_sample(
                torch.cat(parts) if parts else self._no_pixels(), [v for v, _ in kept]
            )

        return [layout.count(v) for v, _ in items], pixel_values

    def pixels(self, images: list) -> torch.Tensor:
        if self.blank_images:
            return (
                torch.stack([self.transform.blank() for _ in images])
                if images
                else self._no_pixels()
            )
        return torch.stack([self.transform(img) for img in images]) if images else self._no_pixels()

    def _no_pixels(self) -> torch.Tensor:
        spec = self.processor.image_spec
        return torch.zeros(0, spec.channels, spec.size, spec.size)

    # -- tokenization -----------------------------------------------------------------------

    def _turns(self, meta: dict):
        """The sample's turns, ``<image>`` placed by ``image_placement``."""
        try:
            turns = parse_conversation(meta.get("conversations"))
        except ConversationError as err:
            raise SampleError("malformed", f"sample {meta['id']!r}: {err}") from None
        return place_images(turns, self.image_placement)

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and character offsets of ``text`` by ``tokenization``."""
        tok = self.processor.tokenizer
        return tokenize(
            self._backend,
            text,
            self.processor.image_token_id,
            tok.bos_token_id,
            chunked=self.tokenization == "chunked",
        )

    def _expand_images(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        n_images: int,
        sample_id: str,
        counts: Optional[list[int]] = None,
    ):
        """Repeat the i-th ``<image>`` id ``counts[i]`` times (default: ``num_image_tokens`` each)."""
        is_image = ids == self.processor.image_token_id
        n_tokens = int(is_image.sum())
        if n_tokens != n_images:
            raise SampleError(
                "image_count",
                f"sample {sample_id!r}: {n_tokens} <image> token(s) but {n_images} image(s)",
            )
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[is_image] = self.processor.num_image_tokens if counts is None else counts
        return np.repeat(ids, repeats), np.repeat(labels, repeats)

    def _truncate(
        self, ids: np.ndarray, labels: np.ndarray, counts: list[int]
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Cut to ``max_length``; a cut inside an image span (the i-th of ``counts[i]`` ids)
        moves to the span's start and drops that image. Returns ids, labels and the number of
        images kept."""
        cut = min(len(ids), self.max_length)
        image_pos = np.flatnonzero(ids == self.processor.image_token_id)
        ends = np.cumsum(counts, dtype=np.int64)
        span_start = image_pos[ends - np.asarray(counts, dtype=np.int64)]
        span_end = image_pos[ends - 1] + 1
        kept = int((span_end <= cut).sum())
        if kept < len(counts) and span_start[kept] < cut:
            cut = int(span_start[kept])
        return ids[:cut], labels[:cut], kept

    def encode_train(self, meta: dict, images: list) -> dict:
        """Training sample: ``input_ids``, ``labels`` (assistant tokens only), ``pixel_values``."""
        sid = str(meta["id"])
        turns = self._turns(meta)
        try:
            text, spans = self.template.render(turns, self.eos)
        except NoAssistantTurnError as err:
            raise SampleError("no_assistant", f"sample {sid!r}: {err}") from None
        except TemplateMismatchError as err:
            raise TemplateMismatchError(f"sample {sid!r}: {err}") from None
        except ConversationError as err:
            raise SampleError("malformed", f"sample {sid!r}: {err}") from None
        ids, labels = self._label(text, spans, sid)
        counts, pixel_values = self.visual_inputs(meta, images)
        ids, labels = self._expand_images(ids, labels, len(counts), sid, counts)
        ids, labels, kept = self._truncate(ids, labels, counts)
        if not (labels != IGNORE_INDEX).any():
            raise SampleError(
                "overlong", f"sample {sid!r}: no answer token fits in max_length={self.max_length}"
            )
        return {
            "id": sid,
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "pixel_values": pixel_values(kept),
        }

    def encode_prompt(self, meta: dict, images: list) -> dict:
        """Evaluation sample: the prompt up to the assistant opener, plus its metadata."""
        sid = str(meta["id"])
        turns = self._turns(meta)
        if turns[-1].role == "assistant":  # score the last answer: prompt = everything before it
            turns = turns[:-1]
        try:
            text, _ = self.template.render(turns, self.eos, add_generation_prompt=True)
        except TemplateMismatchError as err:
            raise TemplateMismatchError(f"sample {sid!r}: {err}") from None
        except ConversationError as err:
            raise SampleError("malformed", f"sample {sid!r}: {err}") from None
        ids, _ = self._tokenize(text)
        counts, pixel_values = self.visual_inputs(meta, images)
        ids, _ = self._expand_images(ids, np.zeros_like(ids), len(counts), sid, counts)
        if len(ids) > self.max_length:
            raise SampleError(
                "overlong",
                f"sample {sid!r}: prompt of {len(ids)} tokens exceeds max_length={self.max_length}",
            )
        return {
            "id": sid,
            "input_ids": torch.from_numpy(ids),
            "pixel_values": pixel_values(len(counts)),
            "meta": meta,
        }

    def _label(
        self, text: str, spans: list[tuple[int, int]], sid: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize ``text``; a token is supervised iff it overlaps an assistant span, or is
        one of the template's ``always_supervised`` tokens.

        A supervised token that also covers non-space text outside the span, an answer
        character no token covers, or an end-of-turn that did not become its own token
        are template/tokenizer mismatches and raise with the sample id.
        """
        ids, offsets = self._tokenize(text)
        # Plain Python over bytearrays: samples are short, and numpy's per-call overhead on
        # arrays of a few dozen elements made this the data workers' largest cost.
        n = len(text)
        sup = bytearray(n)
        for s, e in spans:
            sup[s:e] = b"\x01" * (e - s)
        covered = bytearray(n)
        supervised = np.zeros(len(ids), dtype=bool)
        for i, (start, end) in enumerate(offsets.tolist()):
            if end <= start or 1 not in sup[start:end]:
                continue
            supervised[i] = True
            if any(not sup[c] and text[c] not in _SPACE for c in range(start, end)):
                raise TemplateMismatchError(
                    f"sample {sid!r}: token {i} ({text[start:end]!r}) crosses an answer boundary of template "
                    f"{self.template.name!r}; this tokenizer cannot separate the answer from its surroundings"
                )
            covered[start:end] = b"\x01" * (end - start)
        for s, e in spans:
            for c in range(s, e):
                if not covered[c] and text[c] not in _SPACE:
                    raise TemplateMismatchError(
                        f"sample {sid!r}: answer text at char {c} has no token"
                    )
        if self._stop_id is not None:
            start, end = offsets[:, 0], offsets[:, 1]
            tail = self.template.end_of_turn_offset()
            for s, e in spans:
                inside = np.flatnonzero(supervised & (start < e - tail) & (end > s))
                if len(inside) == 0 or ids[inside[-1]] != self._stop_id:
                    raise TemplateMismatchError(
                        f"sample {sid!r}: the end-of-turn {self.template.stop_string(self.eos)!r} of template "
                        f"{self.template.name!r} did not tokenize to its own token"
                    )
        if len(self._always_supervised):
            supervised |= np.isin(ids, self._always_supervised)
        labels = np.where(supervised, ids, IGNORE_INDEX)
        return ids, labels
