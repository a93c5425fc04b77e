"""``python -m data_prep.shapes_multi``: write the multi-image and video shapes world (the tiny
OneVision demonstration's data).
"""

from __future__ import annotations

import argparse
import json

from lmm.worlds.shapes.multi import MultiWorldConfig, write_multi_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.shapes_multi",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--train-samples", type=int, default=MultiWorldConfig.train_samples, help="per task"
    )
    parser.add_argument(
        "--test-samples", type=int, default=MultiWorldConfig.test_samples, help="per task"
    )
    args = parser.parse_args(argv)
    manifest = write_multi_world(
        args.out, MultiWorldConfig(train_samples=args.train_samples, test_samples=args.test_samples)
    )
    print(json.dumps({k: v["num_samples"] for k, v in manifest["splits"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
