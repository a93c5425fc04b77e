"""CLI: ShareGPT4V annotations (ShareGPT4V-PT 1246K captions, the 100K GPT4-Vision captions,
the SFT mix 665K) + ShareGPT4V's image folders -> WebDataset shards with ``manifest.json``
and ``report.json``.

Example::

    python -m data_prep.sharegpt4v --json data/sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json \\
        --images data --out shards/sharegpt4v_cap100k --workers 8 \\
        --image-dir llava/llava_pretrain/images=/data/LLaVA-Pretrain/images

``--images`` is ShareGPT4V's ``data/`` folder (coco/, llava/llava_pretrain/, sam/, ...);
``--image-dir`` redirects a path prefix to a folder elsewhere. Same options as
``python -m data_prep.llava``; all logic is in :mod:`data_prep.convert`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from data_prep.convert import main as convert_main


def main(argv: Sequence[str] | None = None) -> int:
    return convert_main(
        argv,
        prog="python -m data_prep.sharegpt4v",
        description="Convert ShareGPT4V annotations and images to WebDataset shards.",
        default_preset="llava",
    )


if __name__ == "__main__":
    sys.exit(main())
