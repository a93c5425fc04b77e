"""Rendered text -> token ids and character offsets (``data.tokenization``).

- ``chunked``: the text is split at every ``<image>`` and each piece is tokenized on its own,
  with the tokenizer's special tokens; one bos is kept at the very start and each ``<image>``
  becomes the image id (LLaVA ``llava/mm_utils.py::tokenizer_image_token``, which TinyLLaVA
  ``Template.tokenizer_image_token`` and LLaVA-NeXT copy). A SentencePiece tokenizer starts
  each piece afresh, so the text after an image begins with its own ``▁``: ``<image>``,
  ``▁``, ``<0x0A>``, ``What`` as released LLaVA/TinyLLaVA checkpoints were trained and are
  prompted. For byte-level BPE tokenizers (Phi-2, StableLM-2, Qwen2), and Llama's hub
  tokenizer file in its legacy mode, it gives the same ids as ``single_pass``.
- ``single_pass``: the whole text at once, ``<image>`` being a special token (lmm's tiny
  recipes).

Offsets are ``[start, end)`` characters of the whole text; a special token the tokenizer adds
(bos) has an empty range, so no label ever covers it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

import numpy as np

from lmm.constants import IMAGE_TOKEN

Tokenization = Literal["chunked", "single_pass"]
TOKENIZATIONS: tuple[str, ...] = get_args(Tokenization)


def tokenize(
    backend: Any, text: str, image_id: int, bos_id: Optional[int], chunked: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and their ``(n, 2)`` character offsets in ``text``.

    ``backend`` is a fast tokenizer's ``tokenizers.Tokenizer`` (``tokenizer.backend_tokenizer``).
    """
    if not chunked:
        enc = backend.encode(text)
        return _arrays(enc.ids, enc.offsets)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    keep_first = True
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        enc = backend.encode(piece)
        piece_ids, piece_offsets = enc.ids, enc.offsets
        if i == 0:
            # A tokenizer that starts the first piece with bos starts every piece with it:
            # only the first one is kept.
            keep_first = bos_id is None or piece_ids[:1] != [bos_id]
        else:
            ids.append(image_id)
            offsets.append((pos, pos + len(IMAGE_TOKEN)))
            pos += len(IMAGE_TOKEN)
            if not keep_first:
                piece_ids, piece_offsets = piece_ids[1:], piece_offsets[1:]
        ids += piece_ids
        offsets += [(pos + s, pos + e) if e > s else (0, 0) for s, e in piece_offsets]
        pos += len(piece)
    return _arrays(ids, offsets)


def _arrays(ids: list[int], offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray(ids, dtype=np.int64),
        np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
    )
