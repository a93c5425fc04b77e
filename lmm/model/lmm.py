"""The composition ``F(tokens with P(V(image)) scattered in at <image> positions)``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmm.model.connector import ConnectorSpec, build_connector
from lmm.model.freeze import FreezeConfig, apply_policy, parameter_table
from lmm.model.language import IMAGE_TOKEN, LanguageConfig, decoder_blocks, load_language_model, load_tokenizer
from lmm.model.vision import VisionConfig, build_vision_tower

IGNORE_INDEX = -100


@dataclass
class GenerationConfig:
    """Decoding used by validation, test, predict, chat and the lmms-eval adapter.

    Args:
        max_new_tokens: Longest answer generated.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (> 0; only used when sampling).
        top_p: Nucleus sampling mass in (0, 1] (only used when sampling).
        seed: Seed of the sampler (None: the global torch RNG). Greedy decoding ignores it.
    """

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def kwargs(self) -> dict:
        """Keyword arguments of :meth:`LMM.generate`."""
        return asdict(self)


class ImageTokenMismatchError(ValueError):
    """The batch's ``<image>`` positions and the image features do not line up."""


class LMM(nn.Module):
    """Vision tower -> connector -> causal LM."""

    def __init__(
        self,
        vision: VisionConfig,
        llm: LanguageConfig,
        connector: ConnectorSpec = "mlp2x_gelu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(llm)
        self.vision = build_vision_tower(vision, dtype=dtype)
        self.llm = load_language_model(llm, self.tokenizer, dtype=dtype)
        text_dim = self.llm.get_input_embeddings().weight.shape[1]
        self.connector = build_connector(connector, self.vision.hidden_size, text_dim, self.vision.num_tokens).to(dtype)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image occupies in the sequence (known before the model runs)."""
        return self.connector.num_output_tokens

    def components(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    def apply_freeze(self, cfg: FreezeConfig) -> str:
        """Apply a stage's freeze policy; returns the parameter table."""
        apply_policy(
            self.vision, cfg.vision, self.vision.blocks(), cfg.vision_from_layer, "model.freeze.vision", cfg.vision_lora
        )
        apply_policy(self.connector, cfg.connector, None, 0, "model.freeze.connector")
        apply_policy(self.llm, cfg.llm, decoder_blocks(self.llm), cfg.llm_from_layer, "model.freeze.llm", cfg.llm_lora)
        return parameter_table(self.components())[0]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[I, 3, H, W]`` -> ``[I, N, D_lm]``. A fully frozen tower runs without autograd."""
        tower_trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            features = self.vision(pixel_values.to(self.connector_dtype))
        return self.connector(features)

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written into the ``<image>`` positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        n_positions = int(mask.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_positions != n_images * self.num_image_tokens:
            raise ImageTokenMismatchError(
                f"batch has {n_positions} <image> positions but {n_images} image(s) x "
                f"{self.num_image_tokens} tokens = {n_images * self.num_image_tokens} features"
            )
        if n_images == 0:
            # Text-only batch: nothing runs through the tower, but DDP (without
            # find_unused_parameters) wants a gradient for every trainable parameter on every
            # rank, so tie the image path in with weight zero rather than invent a dummy image.
            if torch.is_grad_enabled():
                unused = [p.sum().float() for m in (self.vision, self.connector) for p in m.parameters() if p.requires_grad]
                if unused:
                    embeds = embeds + 0.0 * sum(unused).to(embeds.dtype)
            return embeds
        features = self.encode_images(pixel_values).to(embeds.dtype)
        # One vectorised scatter: row-major order of the mask matches image order in the batch.
        return embeds.masked_scatter(mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token loss over supervised positions.

        The LM head runs only where a label exists, so full-sequence logits over the
        vocabulary are never materialised.
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """KV-cached decoding of a left-padded batch; returns only the new token ids
        (``[B, T]``; rows that stopped early are filled with the pad id).

        Greedy unless ``do_sample``. ``seed`` makes sampling reproducible without touching
        the global RNG state. Decoding stops at the tokenizer's eos and at ``stop_token_ids``
        (e.g. a template's end-of-turn token).
        """
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
        if not bool(attention_mask[:, -1].all()):
            # Right padding would make every shorter row continue from pad tokens.
            raise ValueError("generate needs left-padded prompts (collate(..., left=True)): a row ends in padding")
        embeds = self.embed(input_ids, pixel_values)
        eos = [self.tokenizer.eos_token_id] + [t for t in (stop_token_ids or []) if t != self.tokenizer.eos_token_id]
        kwargs = {"do_sample": do_sample}
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {top_p}")
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            # The LM's own generation_config may carry sampling defaults; greedy ignores them.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        devices = [embeds.device] if embeds.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos if len(eos) > 1 else eos[0],
                **kwargs,
            )

    def generate_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                      **kwargs) -> list[str]:
        """:meth:`generate`, decoded: one stripped answer per row (special tokens dropped)."""
        out = self.generate(input_ids, attention_mask, pixel_values, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
