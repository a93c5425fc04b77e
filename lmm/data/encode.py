"""Sample -> token ids, labels and pixels: templates rendered, tokenized once with offsets,
labels taken from the assistant spans, ``<image>`` expanded to N ids, truncation that never
cuts an image span."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmm.data.errors import SampleError, TemplateMismatchError, UnsafeShardError
from lmm.data.image import IMAGE_EXTENSIONS, ImageTransform, decode_image
from lmm.data.templates import ConversationError, NoAssistantTurnError, Template, parse_conversation
from lmm.model.image_spec import ImageSpec

IGNORE_INDEX = -100
# Members that would run code when decoded; a shard holding one is refused outright.
_PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz")


@dataclass
class Processor:
    """Model-side facts the data needs: tokenizer, image spec, tokens per image."""

    tokenizer: Any
    image_spec: ImageSpec
    num_image_tokens: int
    image_token_id: int


class SampleEncoder:
    """Turns raw shard samples (json + image bytes) into model inputs for one stage."""

    def __init__(self, processor: Processor, template: Template, max_length: int, blank_images: bool = False) -> None:
        self.processor = processor
        # A template sees the tokenizer once: checks its end-of-turn, or renders with it (``tokenizer``).
        self.template = template.bind(processor.tokenizer)
        self.max_length = max_length
        self.blank_images = blank_images
        self.transform = ImageTransform(processor.image_spec)
        tok = processor.tokenizer
        self.eos = tok.eos_token
        stop = self.template.stop_string(self.eos)
        self._stop_id = tok.convert_tokens_to_ids(stop) if stop in tok.get_vocab() else None
        # The Rust tokenizer behind a fast tokenizer gives the same ids and offsets as
        # tokenizer(text, return_offsets_mapping=True) without transformers' per-call overhead
        # (about a third of the encoding time on short conversations).
        self._backend = getattr(tok, "backend_tokenizer", None)

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
                images.append(decode_image(raw[name]))
            except Exception as err:  # PIL raises many types for bad bytes
                raise SampleError("image_decode", f"sample {key!r}: member {name!r} is not a readable image ({err})") from None
        return meta, images

    def pixels(self, images: list) -> torch.Tensor:
        if self.blank_images:
            return torch.stack([self.transform.blank() for _ in images]) if images else self._no_pixels()
        return torch.stack([self.transform(img) for img in images]) if images else self._no_pixels()

    def _no_pixels(self) -> torch.Tensor:
        s = self.processor.image_spec.size
        return torch.zeros(0, 3, s, s)

    # -- tokenization -----------------------------------------------------------------------

    def _turns(self, meta: dict):
        try:
            return parse_conversation(meta.get("conversations"))
        except ConversationError as err:
            raise SampleError("malformed", f"sample {meta['id']!r}: {err}") from None

    def _expand_images(self, ids: np.ndarray, labels: np.ndarray, n_images: int, sample_id: str):
        is_image = ids == self.processor.image_token_id
        n_tokens = int(is_image.sum())
        if n_tokens != n_images:
            raise SampleError("image_count", f"sample {sample_id!r}: {n_tokens} <image> token(s) but {n_images} image(s)")
        repeats = np.where(is_image, self.processor.num_image_tokens, 1)
        return np.repeat(ids, repeats), np.repeat(labels, repeats)

    def _truncate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Cut to ``max_length``; a cut inside an image span moves to the span's start and
        drops that image. Returns ids, labels and the number of images kept."""
        is_image = ids == self.processor.image_token_id
        cut = min(len(ids), self.max_length)
        if cut < len(ids) and cut > 0 and is_image[cut - 1] and is_image[cut]:
            # Adjacent images form one run of k*N ids; spans start every N ids within it.
            starts = np.flatnonzero(is_image[:cut] & ~np.concatenate([[False], is_image[: cut - 1]]))
            cut -= (cut - int(starts[-1])) % self.processor.num_image_tokens
        kept_images = int(is_image[:cut].sum()) // self.processor.num_image_tokens
        return ids[:cut], labels[:cut], kept_images

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
        ids, labels = self._expand_images(ids, labels, len(images), sid)
        ids, labels, kept = self._truncate(ids, labels)
        if not (labels != IGNORE_INDEX).any():
            raise SampleError("overlong", f"sample {sid!r}: no answer token fits in max_length={self.max_length}")
        return {
            "id": sid,
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "pixel_values": self.pixels(images[:kept]),
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
        ids = np.asarray(self.processor.tokenizer(text)["input_ids"], dtype=np.int64)
        ids, _ = self._expand_images(ids, np.zeros_like(ids), len(images), sid)
        if len(ids) > self.max_length:
            raise SampleError("overlong", f"sample {sid!r}: prompt of {len(ids)} tokens exceeds max_length={self.max_length}")
        return {"id": sid, "input_ids": torch.from_numpy(ids), "pixel_values": self.pixels(images), "meta": meta}

    def _label(self, text: str, spans: list[tuple[int, int]], sid: str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize ``text`` once; a token is supervised iff it overlaps an assistant span.

        A supervised token that also covers non-space text outside the span, an answer
        character no token covers, or an end-of-turn that did not become its own token
        are template/tokenizer mismatches and raise with the sample id.
        """
        if self._backend is not None:
            enc = self._backend.encode(text)
            ids = np.asarray(enc.ids, dtype=np.int64)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        else:
            enc = self.processor.tokenizer(text, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        n = len(text)
        sup = np.zeros(n + 1, dtype=np.int64)
        for s, e in spans:
            sup[s:e] = 1
        chars = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        space = (chars == 32) | (chars == 9) | (chars == 10) | (chars == 13)
        hard_outside = np.concatenate([(1 - sup[:n]) * ~space, [0]]).astype(np.int64)
        cs_sup = np.concatenate([[0], np.cumsum(sup[:n])])
        cs_out = np.concatenate([[0], np.cumsum(hard_outside[:n])])
        start, end = offsets[:, 0], offsets[:, 1]
        supervised = (end > start) & (cs_sup[end] - cs_sup[start] > 0)
        straddle = supervised & (cs_out[end] - cs_out[start] > 0)
        if straddle.any():
            i = int(np.flatnonzero(straddle)[0])
            raise TemplateMismatchError(
                f"sample {sid!r}: token {i} ({text[start[i]:end[i]]!r}) crosses an answer boundary of template "
                f"{self.template.name!r}; this tokenizer cannot separate the answer from its surroundings"
            )
        covered = np.zeros(n + 1, dtype=np.int64)
        np.add.at(covered, start[supervised], 1)
        np.add.at(covered, end[supervised], -1)
        covered = np.cumsum(covered)[:n] > 0
        missing = (sup[:n] == 1) & ~space & ~covered
        if missing.any():
            raise TemplateMismatchError(f"sample {sid!r}: answer text at char {int(np.flatnonzero(missing)[0])} has no token")
        if self._stop_id is not None:
            for s, e in spans:
                inside = np.flatnonzero(supervised & (start < e) & (end > s))
                if len(inside) == 0 or ids[inside[-1]] != self._stop_id:
                    raise TemplateMismatchError(
                        f"sample {sid!r}: the end-of-turn {self.template.stop_string(self.eos)!r} of template "
                        f"{self.template.name!r} did not tokenize to its own token"
                    )
        labels = np.where(supervised, ids, IGNORE_INDEX)
        return ids, labels
