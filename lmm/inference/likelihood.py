"""Scoring answers by the model's likelihood instead of generating them.

Two uses, both one forward pass per batch of prompts (no decoding loop):

* **Candidates** (yes/no, option letters): the probability of each candidate's token in the
  next-token distribution where the answer starts, renormalised over the candidates -- the
  protocol of Prismatic's evaluation harness (vlm-evaluation: ``PrismaticVLM.generate_batch``
  with ``return_string_probabilities``, scored by its POPE, VSR, AI2D and TallyQA scorers).
  The most likely candidate is the answer; for yes/no the P(yes) over a set gives AUC-ROC.
* **Continuations** (lmms-eval's ``loglikelihood``): the summed log-probability of a whole
  answer text and whether greedy decoding would produce it token by token.

Which token stands for a candidate
----------------------------------
An answer is scored where the model would write it: after the rendered prompt and the
template's ``answer_prefix`` (vicuna's space after ``ASSISTANT:``). Its tokens are those of
``tokenizer(prompt + answer_prefix + answer)`` after the tokens of ``tokenizer(prompt)`` --
the answer tokenized in context, as training tokenized it (so a Llama SentencePiece
tokenizer gives ``▁Yes``, a byte-level BPE ``ĠYes`` or a lone ``Ġ`` then ``Yes``). The
candidates are compared at the first position where their token sequences differ; the tokens
before it, shared by all candidates (e.g. that lone space token), are appended to every prompt
first. So with the tiny BPE, "Yes" and "No" are scored by ``P(Yes | prompt, Ġ)`` against
``P(No | prompt, Ġ)``: exactly the choice greedy decoding makes at that position, and with no
shared prefix the choice it makes for its first token. Prismatic takes
``tokenizer.encode(candidate, add_special_tokens=False)[0]`` and requires a single token;
for its Llama tokenizers that is the same ``▁Yes`` token.

The probe prompt is a one-question conversation rendered by the template with its generation
prompt; every prompt ends with the same generation prompt, so the answer's tokens do not
depend on the question. It is an error when a candidate's first characters merge with the end
of the prompt into one token (the prompt's tokens are then no prefix), when the candidates'
differing tokens coincide (``"A"`` and ``"AB"``), or when one candidate is a prefix of another
in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmm.data.collate import collate
from lmm.data.templates import Template, parse_conversation
from lmm.model.lmm import LMM
from lmm.model.loss import capped_logits

__all__ = [
    "Candidates",
    "answer_token_ids",
    "candidate_logprobs",
    "candidate_probs",
    "candidates_for",
    "continuation_scores",
    "next_token_logprobs",
]

_PROBE = [{"from": "human", "value": "?"}]


def answer_token_ids(
    tokenizer: Any, template: Template, answer: str, turns: list[dict] | None = None
) -> list[int]:
    """Token ids of ``answer`` as the assistant's answer right after the generation prompt of
    ``turns`` (LLaVA-schema turns ending with a user turn; default a probe question)."""
    bound = template.bind(tokenizer)
    prompt, _ = bound.render(
        parse_conversation(turns or _PROBE), tokenizer.eos_token, add_generation_prompt=True
    )
    p_ids = tokenizer(prompt)["input_ids"]
    w_ids = tokenizer(prompt + bound.answer_prefix + answer)["input_ids"]
    if w_ids[: len(p_ids)] != p_ids:
        raise ValueError(
            f"answer {answer!r}: its first characters merge with the end of template "
            f"{template.name!r}'s prompt into one token, so it cannot be scored after the prompt"
        )
    return w_ids[len(p_ids) :]


@dataclass(frozen=True)
class Candidates:
    """Candidate answers and the tokens they are scored by (see the module docstring).

    Attributes:
        labels: The answers, as written in records (``"Yes"``, ``"A"``).
        token_ids: The token of each answer at the position where the answers differ.
        shared: The tokens all answers start with, appended to the prompt before scoring.
    """

    labels: tuple[str, ...]
    token_ids: tuple[int, ...]
    shared: tuple[int, ...] = ()


def candidates_for(tokenizer: Any, template: Template, labels: Sequence[str]) -> Candidates:
    """The scoring tokens of ``labels`` for this tokenizer and template (see the module
    docstring; callers keep the result: it tokenizes a probe prompt per label)."""
    labels = tuple(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"likelihood scoring needs two or more distinct candidates, got {labels}")
    seqs = [answer_token_ids(tokenizer, template, label) for label in labels]
    k = 0
    while all(len(s) > k for s in seqs) and len({s[k] for s in seqs}) == 1:
        k += 1
    short = [label for label, s in zip(labels, seqs) if len(s) <= k]
    if short:
        raise ValueError(
            f"candidate(s) {short} end where the others go on: in tokens, each is a prefix of "
            f"another candidate, so one next-token distribution cannot tell them apart"
        )
    firsts = [s[k] for s in seqs]
    for i, tok in enumerate(firsts):
        same = [labels[j] for j in range(len(labels)) if firsts[j] == tok and j != i]
        if same:
            raise ValueError(
                f"candidates {labels[i]!r} and {same[0]!r} start with the same token "
                f"{tokenizer.convert_ids_to_tokens(tok)!r} where the candidates differ; "
                "choose candidates whose first differing tokens are distinct"
            )
    return Candidates(tuple(labels), tuple(firsts), tuple(seqs[0][:k]))


def _right_aligned(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's tokens moved to the left (right padding, so positions count from 0 as in an
    unpadded forward) with ``extra[i]`` appended after row i's last token."""
    lengths = attention_mask.sum(1).tolist()
    width = max(n + len(e) for n, e in zip(lengths, extra))
    ids = torch.zeros(len(lengths), width, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids, dtype=attention_mask.dtype)
    for row, (n, e) in enumerate(zip(lengths, extra)):
        tokens = input_ids[row][attention_mask[row].bool()]
        if e:
            tokens = torch.cat([tokens, torch.tensor(e, dtype=ids.dtype, device=ids.device)])
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


@torch.no_grad()
def next_token_logprobs(
    model: LMM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: Any,
    extra: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Log-probabilities ``[B, V]`` (float32) of the token after each prompt of a batch (left
    or right padded), with ``extra[i]`` appended to prompt i first."""
    extra = extra if extra is not None else [()] * input_ids.shape[0]
    ids, mask = _right_aligned(input_ids, attention_mask, extra)
    hidden = model.hidden_states(ids, mask, pixel_values)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), mask.sum(1) - 1]
    logits = capped_logits(last, model.llm.get_output_embeddings(), model.logit_softcap)
    return torch.log_softmax(logits, dim=-1)


def candidate_logprobs(
    model: LMM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: Any,
    candidates: Sequence[Candidates],
) -> list[torch.Tensor]:
    """``log P(candidate token | prompt + shared tokens)`` per row, for row i's ``candidates[i]``
    (one forward pass). ``softmax`` of a row renormalises over its candidates."""
    logp = next_token_logprobs(
        model, input_ids, attention_mask, pixel_values, [c.shared for c in candidates]
    )
    return [logp[row, list(c.token_ids)] for row, c in enumerate(candidates)]


def candidate_probs(
    model: LMM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: Any,
    candidates: Sequence[Candidates],
) -> list[dict[str, float]]:
    """``{candidate: probability}`` per row, renormalised over row i's ``candidates[i]``."""
    logps = candidate_logprobs(model, input_ids, attention_mask, pixel_values, candidates)
    return [dict(zip(c.labels, torch.softmax(lp, 0).tolist())) for c, lp in zip(candidates, logps)]


@torch.no_grad()
def continuation_scores(
    model: LMM, prompts: list[dict], continuations: list[list[int]], pad_id: int, batch_size: int
) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation token | prompt, earlier continuation tokens), greedy)`` per
    encoded prompt; ``greedy``: every continuation token is the most likely one at its place.
    Batched ``batch_size`` prompts per forward pass, in the given order."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    out: list[tuple[float, bool]] = []
    dev = next(model.parameters()).device
    head = model.llm.get_output_embeddings()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        conts = continuations[start : start + batch_size]
        batch = collate(
            [
                {**p, "input_ids": torch.cat([p["input_ids"], torch.tensor(c, dtype=torch.long)])}
                for p, c in zip(chunk, conts)
            ],
            pad_id=pad_id,
            left=False,  # right padding: a plain forward numbers positions from 0
        )
        hidden = model.hidden_states(
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            batch["pixel_values"].to(dev),
        )
        for row, cont in enumerate(conts):
            total = int(batch["attention_mask"][row].sum())
            n = len(cont)
            rows = hidden[row, total - n - 1 : total - 1]
            logp = torch.log_softmax(capped_logits(rows, head, model.logit_softcap), dim=-1)
            targets = torch.tensor(cont, device=dev)
            score = float(logp.gather(-1, targets[:, None]).sum())
            out.append((score, bool((logp.argmax(-1) == targets).all())))
    return out
