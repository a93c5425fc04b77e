"""Every text the world can produce: the corpus a tiny tokenizer is trained on."""

from __future__ import annotations

from dataclasses import replace

from lmm.worlds.shapes.config import (
    CAPTION_STYLES,
    CAPTION_TEMPLATES,
    DESCRIBE_QUESTION,
    PRETRAIN_PROMPT,
    WorldConfig,
    position_names,
)
from lmm.worlds.shapes.scene import image_rng, sample_objects
from lmm.worlds.shapes.text import (
    cell_phrase,
    color_question,
    count_all_question,
    count_shape_question,
    exist_question,
    kind_phrase,
    make_caption,
    object_phrase,
    position_phrase,
    position_question,
    shape_question,
)


def world_corpus(cfg: WorldConfig | None = None, n_examples: int = 200) -> list[str]:
    """Text lines covering every word/phrase the generator can emit (for a tiny BPE).

    Includes every caption fragment, every question with all slots filled, all answers,
    the fixed prompts and ``n_examples`` full example captions (drawn from a dedicated
    "corpus" stream, not from any split).  The ``<image>`` placeholder is not included:
    it is a special token for the tokenizer to add.
    """
    cfg = cfg or WorldConfig()
    positions = position_names(cfg.grid)
    lines: list[str] = [PRETRAIN_PROMPT, DESCRIBE_QUESTION, count_all_question()]
    lines += [t.split("{objects}")[0].strip() for t in CAPTION_TEMPLATES if not t.startswith("{")]
    for shape in cfg.shapes:
        lines += [color_question(shape), count_shape_question(shape), exist_question(shape), shape]
        for color in cfg.colors:
            lines.append(position_question(color, shape))
            lines += [object_phrase(shape, color, p) for p in positions]
            lines += [cell_phrase(p, shape, color) for p in positions]
            lines += [kind_phrase(shape, [(color, p)]) for p in positions]
    for color in cfg.colors:
        lines += [shape_question(color), color]
    lines += (
        list(positions)
        + [position_phrase(p) for p in positions]
        + [cell_phrase(p) for p in positions]
    )
    lines += [str(i) for i in range(cfg.max_objects + 1)] + ["Yes", "No", "yes", "no"]
    for i in range(n_examples):
        rng = image_rng(cfg, "corpus", i, 0)
        style = CAPTION_STYLES[i % len(CAPTION_STYLES)]
        lines.append(make_caption(replace(cfg, caption_style=style), sample_objects(cfg, rng), rng))
    return lines
