"""CLI: LLaVA-1.5 annotations (pretraining 558K, instruction mix 665K, or any LLaVA-schema
file) + image folders -> WebDataset shards with ``manifest.json`` and ``report.json``.

Examples::

    python -m data_prep.llava --json LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
        --images LLaVA-Pretrain/images --out data/llava_pretrain --samples-per-shard 2000 --workers 8
    python -m data_prep.llava --json llava_v1_5_mix665k.json --images playground/data \\
        --out data/llava_mix665k --workers 8

The preset is picked from the annotation file's exact name (``--preset`` overrides it); see
``--list-presets`` for each dataset's image layout and quirks. All logic is in
:mod:`data_prep.convert`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from data_prep.convert import main as convert_main


def main(argv: Sequence[str] | None = None) -> int:
    return convert_main(
        argv,
        prog="python -m data_prep.llava",
        description="Convert LLaVA-1.5 (or any LLaVA-schema) annotations and images to WebDataset shards.",
        default_preset="llava",
    )


if __name__ == "__main__":
    sys.exit(main())
