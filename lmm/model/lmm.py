"""The composition ``F(tokens with P(V(image)) scattered in at <image> positions)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmm.model.connector import build_connector
from lmm.model.freeze import FreezeConfig, apply_policy, parameter_table
from lmm.model.language import IMAGE_TOKEN, LanguageConfig, decoder_blocks, load_language_model, load_tokenizer
from lmm.model.vision import VisionConfig, build_vision_tower

IGNORE_INDEX = -100


class ImageTokenMismatchError(ValueError):
    """The batch's ``<image>`` positions and the image features do not line up."""


class LMM(nn.Module):
    """Vision tower -> connector -> causal LM."""

    def __init__(
        self,
        vision: VisionConfig,
        llm: LanguageConfig,
        connector: str = "mlp2x_gelu",
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
        apply_policy(self.vision, cfg.vision, self.vision.blocks(), cfg.vision_from_layer, "model.freeze.vision")
        apply_policy(self.connector, cfg.connector, None, 0, "model.freeze.connector")
        apply_policy(self.llm, cfg.llm, decoder_blocks(self.llm), cfg.llm_from_layer, "model.freeze.llm")
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
    ) -> torch.Tensor:
        """KV-cached decoding of left-padded prompts; returns only the new token ids."""
        embeds = self.embed(input_ids, pixel_values)
        kwargs = {"do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kwargs,
        )
