"""Next-token cross-entropy computed only where a label exists, a chunk of positions at a time.

In pretraining most of a sequence is image tokens and only the caption is supervised, and
with a 150k-token vocabulary (Qwen2) full-sequence logits are the largest tensor of a step
(``B x L x V`` floats, kept again for backward by a naive ``logits -> cross_entropy``).
Here the LM head runs on supervised positions only, ``chunk_size`` rows at a time, and each
chunk's gradients (w.r.t. the hidden states and the head) are formed right away, so at most
``chunk_size x V`` logits exist at any moment and nothing is recomputed in backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmm.constants import IGNORE_INDEX

# Supervised positions per LM-head chunk by default: bounds the logits held at once (chunk x vocab).
DEFAULT_CHUNK_SIZE = 2048


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``targets``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            z = F.linear(h, weight, bias).float()
            if softcap is not None:  # Gemma-2: logits = c * tanh(z / c)
                squashed = torch.tanh(z / softcap)
                z = softcap * squashed
            total += F.cross_entropy(z, t, reduction="sum")
            if not (need_h or need_w or need_b):
                continue
            # d(sum CE)/dz = softmax(z) - onehot(t), through the soft cap if there is one.
            g = torch.softmax(z, dim=-1)
            g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if softcap is not None:
                g *= 1.0 - squashed * squashed
            if need_h:
                grad_h[start : start + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += g.T @ h.float()
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype),
            None if grad_b is None else (grad_b * scale).to(ctx.bias_dtype),
            None,
            None,
            None,
        )


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L - 1]`` targets (position ``i`` predicts label ``i + 1``) and where one exists."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def supervised_positions(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a label, and those labels: ``[N, D]`` and ``[N]``."""
    targets, keep = next_token_targets(labels)
    return hidden[:, :-1][keep], targets[keep]


def capped_logits(
    hidden: torch.Tensor, head: torch.nn.Module, softcap: Optional[float] = None
) -> torch.Tensor:
    """``head(hidden)`` in float32, soft-capped as Gemma-2 does when ``softcap`` is set."""
    logits = head(hidden).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Linear,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (``[N, D]``, ``[N]``).

    Same value and gradients as ``F.cross_entropy(head(hidden).float(), targets)`` (with a
    ``softcap`` applied to the logits first, as Gemma-2 does), without ``N x V`` logits."""
    if chunk_size < 1:
        raise ValueError(f"loss chunk size must be >= 1, got {chunk_size}")
    if targets.numel() == 0:
        raise ValueError("no supervised token in this batch (every label is ignored)")
    if targets.numel() <= chunk_size:
        # One chunk's logits are within the bound anyway: plain autograd, which is also what
        # the results of earlier lmm versions were computed with (bit for bit).
        return F.cross_entropy(capped_logits(hidden, head, softcap), targets)
    total = _ChunkedHeadCrossEntropy.apply(
        hidden, head.weight, head.bias, targets, chunk_size, softcap
    )
    return total / targets.numel()
