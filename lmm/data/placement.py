"""Where a user turn's ``<image>`` placeholders go before the template renders it
(``data.image_placement``).

- ``llava``: every user turn holding ``<image>`` becomes ``<image>\\n`` + the rest of its text,
  stripped (LLaVA ``llava/train/train.py::preprocess_multimodal``; TinyLLaVA
  ``tinyllava/data/template/base.py::Template._prompt``). So ``question\\n<image>`` trains as
  ``<image>\\nquestion``. The references collapse several ``<image>`` of one turn into one
  (their samples hold one image); lmm keeps the count, one ``<image>\\n`` per image.
- ``llava_next``: only a turn with exactly one ``<image>`` that does not already start it is
  rewritten that way; a leading ``<image>`` stays as written (no newline added) and turns
  with several (interleaved multi-image) are left alone (LLaVA-NeXT
  ``llava/train/train.py::preprocess_multimodal``).
- ``as_written``: the turn as the sample writes it (lmm's tiny recipes).

The references also apply their rule to answers, which hold no ``<image>`` in their data;
lmm places images in user turns only.
"""

from __future__ import annotations

from typing import Literal, get_args

from lmm.constants import IMAGE_TOKEN
from lmm.data.templates import Turn

ImagePlacement = Literal["llava", "llava_next", "as_written"]
IMAGE_PLACEMENTS: tuple[str, ...] = get_args(ImagePlacement)


def _llava(text: str) -> str:
    n = text.count(IMAGE_TOKEN)
    if not n:
        return text
    rest = text.replace(IMAGE_TOKEN, "").strip()
    return ((IMAGE_TOKEN + "\n") * n + rest).strip()


def _llava_next(text: str) -> str:
    if text.count(IMAGE_TOKEN) != 1 or text.startswith(IMAGE_TOKEN):
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


_RULES = {"llava": _llava, "llava_next": _llava_next, "as_written": lambda text: text}


def place_images(turns: list[Turn], placement: str) -> list[Turn]:
    """``turns`` with each user turn's ``<image>`` placeholders moved by ``placement``."""
    rule = _RULES[placement]
    return [Turn(t.role, rule(t.text)) if t.role == "user" else t for t in turns]
