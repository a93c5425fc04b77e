"""How a model was trained to be asked: the prompt conventions a checkpoint directory records.

Besides the template and system prompt, a prompt depends on where ``<image>`` goes in a turn
(``image_placement``), how the text is tokenized around it (``tokenization``), where a bare
question's images go when ``predict``, ``chat`` or the lmms-eval adapter build the turn
themselves (``image_position``), and which answer instruction a benchmark's question gets
(``answer_suffixes``). Every consumer reads them from the checkpoint, so a model is asked the
way it was trained (a tiny-pipeline model learned ``question\\n<image>``; LLaVA-1.5 learned
``<image>\\nquestion``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmm.constants import IMAGE_TOKEN
from lmm.errors import ConfigError

IMAGE_POSITIONS: tuple[str, ...] = ("before", "after")

_SHORT = "\nAnswer the question using a single word or phrase."
_LETTER = "\nAnswer with the option's letter from the given choices directly."

# The instructions LLaVA-1.5 evaluates with (haotian-liu/LLaVA docs/Evaluation.md; the question
# files of its eval.zip carry them; llava/eval/model_vqa_science.py and model_vqa_mmbench.py
# append the letter instruction with --single-pred-prompt). lmms-eval's task yamls use the same
# post_prompts (tasks/pope/pope.yaml, mme/mme.yaml, gqa/gqa.yaml, scienceqa/scienceqa_img.yaml,
# mmbench/_default_template_mmbench_en_yaml), so TinyLLaVA and OneVision share them.
# Keys are ``lmm score`` benchmark names.
LLAVA_ANSWER_SUFFIXES: dict[str, str] = {
    "pope": _SHORT,
    "vqav2": _SHORT,
    "gqa": _SHORT,
    "mme": _SHORT,
    "textvqa": _SHORT,
    "scienceqa_img": _LETTER,
    "mmbench": _LETTER,
}


@dataclass(frozen=True)
class PromptConventions:
    """The prompt conventions of a checkpoint (``lmm.json`` ``data`` section).

    Args:
        image_placement: Where a turn's ``<image>`` placeholders go before the template renders
            it (``data.image_placement``, passed to ``SampleEncoder``).
        tokenization: How the rendered text becomes ids (``data.tokenization``).
        image_position: Where ``predict``, ``chat`` and the lmms-eval adapter put the images of a
            question that does not place ``<image>`` itself: ``before`` (LLaVA's
            ``<image>\\nquestion``) or ``after`` (``question\\n<image>``, as the tiny world writes).
        answer_suffixes: Per benchmark (``lmm score`` names), the instruction appended to each
            question when the reference evaluates (LLaVA-1.5: " Answer the question using a
            single word or phrase." after a newline for POPE, VQAv2, GQA, MME, TextVQA).
    """

    image_placement: str = "as_written"
    tokenization: str = "single_pass"
    image_position: str = "before"
    answer_suffixes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_position not in IMAGE_POSITIONS:
            raise ConfigError(
                f"data.image_position: unknown value {self.image_position!r}; "
                f"allowed: {', '.join(IMAGE_POSITIONS)}"
            )

    def question_turn(self, text: str, n_images: int) -> str:
        """A user turn for ``text`` and ``n_images`` images: one ``<image>`` per image, on its
        own line before or after the question, unless the text already places them."""
        if not n_images or IMAGE_TOKEN in text:
            return text
        images = (IMAGE_TOKEN + "\n") * n_images
        return images + text if self.image_position == "before" else text + "\n" + images[:-1]

    def with_answer_suffix(self, text: str, benchmark: str | None) -> str:
        """``text`` plus ``benchmark``'s answer instruction (once: a question that already ends
        with it, as in LLaVA's eval.zip files, is left as it is)."""
        suffix = self.answer_suffixes.get(benchmark or "", "")
        return text if not suffix or text.endswith(suffix) else text + suffix

    def to_info(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_info(cls, data: dict[str, Any]) -> "PromptConventions":
        """From a ``lmm.json`` ``data`` section; a checkpoint written before these keys existed
        reads as ``as_written`` / ``single_pass`` / ``before`` (what it was trained and asked with)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
