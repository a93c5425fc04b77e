"""The composition ``F(tokens with P(V(image)) scattered in at <image> positions)``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmm.constants import IMAGE_TOKEN
from lmm.errors import ImageTokenMismatchError
from lmm.model.connectors import ConnectorSpec, as_connector_config, build_connector
from lmm.model.efficiency import mark_blocks
from lmm.model.freeze import FreezeConfig, apply_policy, parameter_table
from lmm.model.language import (
    LanguageConfig,
    decoder_blocks,
    load_language_model,
    load_tokenizer,
)
from lmm.model.loss import (
    DEFAULT_CHUNK_SIZE,
    capped_logits,
    chunked_cross_entropy,
    next_token_targets,
    supervised_positions,
)
from lmm.model.towers import VisionConfig, build_vision_tower
from lmm.visual.image_batch import ImageBatch, PixelValues, tower_inputs
from lmm.visual.layout import arrange, build_layout


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
        self.connector = build_connector(
            connector,
            self.vision.hidden_size,
            text_dim,
            self.vision.num_tokens,
            token_groups=self.vision.token_groups,
        ).to(dtype)
        self.image_layout = build_layout(
            vision.anyres,
            vision.video,
            self.vision.image_spec.size,
            self.connector.num_output_tokens,
            as_connector_config(connector).name,
            learned_queries=getattr(self.connector, "learned_queries", False),
        )
        if self.image_layout is not None:
            # LLaVA-NeXT's learned row/clip end. On the connector, so the connector's freeze policy,
            # learning rate and weight files cover it. Scale 1/sqrt(D) as OneVision's init.
            self.connector.image_newline = nn.Parameter(
                torch.randn(text_dim, dtype=dtype) / math.sqrt(text_dim)
            )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        mark_blocks([*self.vision.blocks(), *decoder_blocks(self.llm)])
        self.loss_chunk_size = (
            DEFAULT_CHUNK_SIZE  # model.efficiency.loss_chunk_size in a LightningModule
        )

    @property
    def num_image_tokens(self) -> int:
        """Tokens of one image view (known before the model runs). With ``image_layout`` set
        (AnyRes, video) an image's tokens depend on its size and kind: ``image_layout.count``."""
        return self.connector.num_output_tokens

    def components(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    def apply_freeze(self, cfg: FreezeConfig) -> str:
        """Apply a stage's freeze policy; returns the parameter table.

        The vision policy applies to each of ``vision.sub_towers()`` (a fused tower's towers)
        with its own blocks: ``partial`` freezes the first ``vision_from_layer`` blocks of each."""
        for tower in self.vision.sub_towers():
            apply_policy(
                tower,
                cfg.vision,
                tower.blocks(),
                cfg.vision_from_layer,
                "model.freeze.vision",
                cfg.vision_lora,
            )
        apply_policy(self.connector, cfg.connector, None, 0, "model.freeze.connector")
        apply_policy(
            self.llm,
            cfg.llm,
            decoder_blocks(self.llm),
            cfg.llm_from_layer,
            "model.freeze.llm",
            cfg.llm_lora,
        )
        return parameter_table(self.components())[0]

    def encode_images(self, pixel_values: PixelValues) -> torch.Tensor:
        """``[I, 3, H, W]`` -> ``[I, N, D_lm]``; an :class:`ImageBatch` -> ``[tokens, D_lm]``,
        its tiles arranged by ``image_layout`` (AnyRes maps, newlines, pooled frames). A fully
        frozen tower runs without autograd."""
        tower_trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            features = self.vision(tower_inputs(pixel_values).to(self.connector_dtype))
        projected = self.connector(features)
        if isinstance(pixel_values, ImageBatch):
            return arrange(
                projected, pixel_values.visuals, self.image_layout, self.connector.image_newline
            )
        return projected

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: PixelValues | None) -> torch.Tensor:
        """Token embeddings with image features written into the ``<image>`` positions.

        ``pixel_values``: ``[I, 3, H, W]`` (every image ``num_image_tokens`` tokens), or with
        ``image_layout`` set an :class:`ImageBatch` (tokens per image by ``image_layout.count``).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        pixels = tower_inputs(pixel_values)
        n_images = 0 if pixels is None else pixels.shape[0]
        self._check_image_positions(mask, pixel_values, n_images)
        if n_images == 0:
            # Text-only batch: nothing runs through the tower, but DDP (without
            # find_unused_parameters) wants a gradient for every trainable parameter on every
            # rank, so tie the image path in with weight zero rather than invent a dummy image.
            if torch.is_grad_enabled():
                unused = [
                    p.sum().float()
                    for m in (self.vision, self.connector)
                    for p in m.parameters()
                    if p.requires_grad
                ]
                if unused:
                    embeds = embeds + 0.0 * sum(unused).to(embeds.dtype)
            return embeds
        features = self.encode_images(pixel_values).to(embeds.dtype)
        # One vectorised scatter: row-major order of the mask matches image order in the batch.
        return embeds.masked_scatter(mask.unsqueeze(-1), features)

    def _check_image_positions(
        self, mask: torch.Tensor, pixel_values: PixelValues | None, n_images: int
    ) -> None:
        """The ``<image>`` positions must be exactly the features the images give."""
        n_positions = int(mask.sum())
        if not isinstance(pixel_values, ImageBatch):
            if self.image_layout is not None and n_images:
                raise ImageTokenMismatchError(
                    "this model sets model.vision.anyres/video, so image tokens vary per image: pass pixel_values "
                    "as the ImageBatch its SampleEncoder and collate build, not a plain tensor"
                )
            if n_positions != n_images * self.num_image_tokens:
                raise ImageTokenMismatchError(
                    f"batch has {n_positions} <image> positions but {n_images} image(s) x "
                    f"{self.num_image_tokens} tokens = {n_images * self.num_image_tokens} features"
                )
            return
        layout = self.image_layout
        if layout is None:
            raise ImageTokenMismatchError(
                "pixel_values is an ImageBatch but this model has no model.vision.anyres/video: encode the "
                "samples with this model's processor"
            )
        needed = [[layout.count(v) for v in row] for row in pixel_values.items]
        if n_positions == sum(map(sum, needed)):
            tiles = sum(layout.tiles(v) for v in pixel_values.visuals)
            if tiles != n_images:
                raise ImageTokenMismatchError(
                    f"the batch's images need {tiles} tower inputs, pixel_values has {n_images}"
                )
            return
        detail = ""
        if len(needed) == mask.shape[0]:  # one row per sample (not packed): name the first bad row
            per_row = mask.sum(dim=1).tolist()
            bad = next((r for r, n in enumerate(needed) if per_row[r] != sum(n)), None)
            if bad is not None:
                detail = (
                    f"; row {bad} has {per_row[bad]} positions but its {len(needed[bad])} image(s) "
                    f"{[tuple(v) for v in pixel_values.items[bad]]} take {needed[bad]} tokens"
                )
        raise ImageTokenMismatchError(
            f"batch has {n_positions} <image> positions but its images take {sum(map(sum, needed))} tokens by "
            f"model.vision.anyres/video{detail}; was it encoded with another model's processor?"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token loss over supervised positions.

        The LM head runs only where a label exists, in chunks (``lmm.model.loss``), so
        full-sequence logits over the vocabulary are never materialised. ``position_ids``
        marks packed rows (``lmm.data.packing``): positions restart at 0 for each sample, and
        transformers then confines attention to each sample (block-diagonal causal mask).
        """
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, position_ids)
        h, targets = supervised_positions(hidden, labels)
        return chunked_cross_entropy(
            h, targets, self.llm.get_output_embeddings(), self.loss_chunk_size, self.logit_softcap
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's last hidden states ``[B, L, D]`` (before the LM head)."""
        embeds = self.embed(input_ids, pixel_values)
        decoder = self.llm.get_decoder()
        if position_ids is not None:
            # No attention_mask and no cache: transformers then derives the per-sample causal
            # blocks from where the position ids restart (a padded tail is a block of its own).
            return decoder(
                inputs_embeds=embeds, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        return decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state

    @torch.no_grad()
    def sample_losses(self, batch: dict) -> torch.Tensor:
        """Mean next-token loss of each sample of a (padded or packed) batch, in sample order.

        The naive path (full logits at supervised positions): for checks and scoring, not training."""
        hidden = self.hidden_states(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch.get("position_ids"),
        )
        targets, keep = next_token_targets(batch["labels"])
        logits = capped_logits(
            hidden[:, :-1][keep], self.llm.get_output_embeddings(), self.logit_softcap
        )
        token_loss = F.cross_entropy(logits, targets[keep], reduction="none")
        if "sample_index" in batch:  # packed: which sample each position belongs to
            owner = batch["sample_index"][:, 1:][keep]
        else:
            owner = torch.arange(targets.shape[0]).unsqueeze(1).expand_as(targets)[keep]
        n = int(batch["size"])
        sums = torch.zeros(n).index_add_(0, owner, token_loss)
        counts = torch.zeros(n).index_add_(0, owner, torch.ones_like(token_loss))
        return sums / counts

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-2's final logit soft cap (``None`` for the other families)."""
        config = self.llm.config
        return getattr(getattr(config, "text_config", config), "final_logit_softcapping", None)

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
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ"
            )
        if not bool(attention_mask[:, -1].all()):
            # Right padding would make every shorter row continue from pad tokens.
            raise ValueError(
                "generate needs left-padded prompts (collate(..., left=True)): a row ends in padding"
            )
        embeds = self.embed(input_ids, pixel_values)
        eos = [self.tokenizer.eos_token_id] + [
            t for t in (stop_token_ids or []) if t != self.tokenizer.eos_token_id
        ]
        kwargs = {"do_sample": do_sample}
        if do_sample:
            if temperature <= 0:
                raise ValueError(
                    f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)"
                )
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

    def generate_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        **kwargs,
    ) -> list[str]:
        """:meth:`generate`, decoded: one stripped answer per row (special tokens dropped)."""
        out = self.generate(input_ids, attention_mask, pixel_values, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
