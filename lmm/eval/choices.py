"""The option letters a multiple-choice question shows (what likelihood scoring compares)."""

from __future__ import annotations

import re
import string

__all__ = ["option_letters"]


def _shown(letter: str, text: str) -> bool:
    # "A. cat" / "(A) cat" / "A: cat" at a line start or after a space, "(" or ",".
    return re.search(rf"(?:^|[\s(,]){letter}[.:)](?:\s|$)", text, flags=re.MULTILINE) is not None


def option_letters(text: str) -> tuple[str, ...]:
    """The letters ``A``, ``B``, ... that ``text`` presents as options, in order, up to the first
    letter it does not show: ``"A. cat\\nB. dog"`` (LLaVA's ScienceQA/MMBench/SEED prompts),
    ``"Options: A: cat, B: dog"`` (MMStar), ``"(A) cat (B) dog"``. Raises ``ValueError`` when
    fewer than two are found."""
    letters: list[str] = []
    for letter in string.ascii_uppercase:
        if not _shown(letter, text):
            break
        letters.append(letter)
    if len(letters) < 2:
        raise ValueError(
            "no multiple-choice options 'A. ...', 'B. ...' (or 'A: ...', '(A) ...') in the "
            "question; give the candidates explicitly (--candidates)"
        )
    return tuple(letters)
