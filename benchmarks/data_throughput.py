"""Training data throughput: lmm's shard pipeline vs a LLaVA-style map-style Dataset.

Both read the same samples and do the same per-sample work with the same worker count and
batch size, in one process, one after the other (alternating, ``--repeats`` times each):

* **shards** (lmm): ``LMMDataModule(...).train_dataloader()``: the epoch plan's batches,
  each built inside a worker (samples read from the tar by offset, image decoded,
  transformed, conversation tokenized, batch collated);
* **map-style** (LLaVA's ``LazySupervisedDataset`` layout): a JSON list of records in memory
  and one image file per sample in a folder; ``__getitem__`` opens the image with PIL and
  encodes it with the same ``SampleEncoder.encode_train``; a ``torch`` DataLoader with
  ``shuffle=True`` and the same ``collate`` batches it in its workers.

samples/s counts every sample handed to the training loop, from ``iter()`` (worker start
included) to the last batch; "steady" leaves out the wait for the first batch. The files
are freshly written, so by default both read from the page cache and the comparison is of
the pipelines' CPU cost; ``--cold`` drops the files from the page cache before every pass,
as reads from a data set larger than memory (or from network storage) would be.

Data (default): a shapes world (``lmm.data.synthetic.write_world``, ``--images`` train images,
its ``finetune`` or ``pretrain`` split) generated in a temp dir, and the same samples exported
to ``data.json`` + one PNG per sample. Or give ``--shards`` (pattern) and ``--json`` + ``--image-folder``
holding the same samples. Tokenizer and image spec: ``artifacts/tiny/models`` if present,
else the tiny models (``lmm.tiny.build_tiny_models``) built in the temp dir.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --workers 2 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lmm.data.collate import collate
from lmm.data.datamodule import LMMDataModule
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.templates import get_template

TINY_MODELS = Path("artifacts/tiny/models")


class LlavaStyleDataset(Dataset):
    """LLaVA's layout: records from one JSON list, each image a file opened with PIL per sample."""

    def __init__(self, json_path: str, image_folder: str, encoder: SampleEncoder) -> None:
        with open(json_path, encoding="utf-8") as f:
            self.records = json.load(f)
        self.image_folder = image_folder
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        images = []
        for p in paths:
            img = Image.open(os.path.join(self.image_folder, p))
            img.load()
            images.append(img)
        return self.encoder.encode_train(dict(record), images)


def load_processor(models_dir: Path | None, workdir: Path) -> tuple[Processor, str]:
    from lmm.model.image_spec import ImageSpec
    from lmm.model.language import LanguageConfig, load_tokenizer
    from lmm.tiny import TinySpec

    if models_dir is None and (TINY_MODELS / "tiny_spec.json").is_file():
        models_dir = TINY_MODELS
    if models_dir is None:
        from lmm.pipeline import tokenizer_corpus
        from lmm.tiny import build_tiny_models

        models_dir = workdir / "models"
        build_tiny_models(models_dir, tokenizer_corpus(), TinySpec())
    spec = json.loads((models_dir / "tiny_spec.json").read_text())
    size, patch = int(spec["image_size"]), int(spec["patch_size"])
    tok = load_tokenizer(LanguageConfig(name_or_path=str(models_dir / "llm")))
    image_spec = ImageSpec.from_pretrained(str(models_dir / "vision"), "siglip_vision_model", size)
    proc = Processor(tok, image_spec, (size // patch) ** 2, tok.convert_tokens_to_ids("<image>"))
    return proc, f"{models_dir} ({size} px images, {(size // patch) ** 2} tokens each, vocab {len(tok)})"


def make_data(workdir: Path, n_images: int, split: str) -> tuple[str, str, str]:
    """Shapes world shards + the same samples as data.json and a PNG folder."""
    from lmm.data.synthetic import WorldConfig, write_world
    from lmm.data.shards import expand_shards
    from lmm.data.tarindex import TarSamples

    world = workdir / "world"
    cfg = WorldConfig(train_images=n_images, val_images=8, test_images=8, samples_per_shard=1000)
    write_world(world, cfg, num_workers=min(2, os.cpu_count() or 1), progress=False)
    pattern = str(world / split / "shard-*.tar")
    folder = workdir / "images"
    folder.mkdir()
    records = []
    for url in expand_shards([pattern], "--shards"):
        tar = TarSamples(url)
        for i in range(len(tar)):
            raw = tar.read(i)
            meta = json.loads(raw["json"])
            name = f"{raw['__key__']}.png"
            (folder / name).write_bytes(raw["png"])
            records.append({**meta, "image": name})
        tar.close()
    ann = workdir / "data.json"
    ann.write_text(json.dumps(records))
    return pattern, str(ann), str(folder)


def timed(batches: Iterable[dict], limit: int) -> dict[str, float]:
    """Consume batches until ``limit`` samples; seconds to the first and the last batch."""
    start = time.perf_counter()
    first = None
    n = batches_seen = 0
    for batch in batches:
        n += int(batch["size"])
        batches_seen += 1
        if first is None:
            first, n_first = time.perf_counter(), n
        if n >= limit:
            break
    end = time.perf_counter()
    return {"samples": n, "batches": batches_seen, "seconds": end - start,
            "rate": n / (end - start), "steady": (n - n_first) / max(end - first, 1e-9)}


def evict(paths: Iterable[str]) -> None:
    """Drop these files from the page cache (``--cold``): the next pass reads them from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def shard_pass(pattern: str, proc: Processor, args: argparse.Namespace, seed: int) -> dict[str, float]:
    dm = LMMDataModule(train=[pattern], template=args.template, batch_size=args.batch_size,
                       num_workers=args.workers, max_length=args.max_length, seed=seed, processor=proc)
    loader = dm.train_dataloader()
    return timed(loader, args.samples)


def map_pass(dataset: LlavaStyleDataset, proc: Processor, args: argparse.Namespace, seed: int) -> dict[str, float]:
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=partial(collate, pad_id=proc.tokenizer.pad_token_id), drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    return timed(loader, args.samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both pipelines (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batch (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="samples read per pass (default: all of one epoch)")
    p.add_argument("--repeats", type=int, default=2, help="passes per pipeline, alternating; the median is "
                                                          "reported (default: %(default)s)")
    p.add_argument("--images", type=int, default=3000, help="shapes-world train images to generate "
                                                            "(default: %(default)s)")
    p.add_argument("--split", default="finetune", choices=["finetune", "pretrain"],
                   help="generated split: multi-turn QA or captions (default: %(default)s)")
    p.add_argument("--shards", default=None, help="shard pattern to read instead of generating data "
                                                  "(needs --json and --image-folder with the same samples)")
    p.add_argument("--json", default=None, help="LLaVA-style JSON list of the same samples")
    p.add_argument("--image-folder", default=None, help="folder the JSON's image paths are relative to")
    p.add_argument("--models", default=None, help="tiny models folder (vision/, llm/, tiny_spec.json); default: "
                                                  f"{TINY_MODELS} if present, else built in the temp dir")
    p.add_argument("--template", default=None, help="conversation template (default: vicuna for finetune, "
                                                    "plain for pretrain)")
    p.add_argument("--max-length", type=int, default=512, help="token budget per sample (default: %(default)s)")
    p.add_argument("--cold", action="store_true", help="drop the shards and image files from the page cache before "
                                                       "each pass (posix_fadvise), so both read from disk as a data "
                                                       "set larger than memory would")
    args = p.parse_args(argv)
    if bool(args.shards) != bool(args.json and args.image_folder):
        p.error("--shards, --json and --image-folder go together")
    args.template = args.template or ("plain" if args.split == "pretrain" else "vicuna")

    with tempfile.TemporaryDirectory(prefix="lmm_data_bench_") as tmp:
        workdir = Path(tmp)
        proc, model_desc = load_processor(Path(args.models) if args.models else None, workdir)
        if args.shards:
            pattern, ann, folder = args.shards, args.json, args.image_folder
            data_desc = f"{pattern} vs {ann} + {folder}"
        else:
            t = time.perf_counter()
            pattern, ann, folder = make_data(workdir, args.images, args.split)
            data_desc = (f"shapes world, {args.images} images, {args.split} split (generated and exported in "
                         f"{time.perf_counter() - t:.0f} s)")
        encoder = SampleEncoder(proc, get_template(args.template), args.max_length)
        dataset = LlavaStyleDataset(ann, folder, encoder)
        epoch = len(dataset) // args.batch_size * args.batch_size
        args.samples = min(args.samples or epoch, epoch)
        print(f"data:       {data_desc}; {len(dataset)} samples, {args.samples} read per pass")
        print(f"processor:  {model_desc}; template {args.template}, max_length {args.max_length}")
        reads = "cold (files dropped from the page cache before each pass)" if args.cold else "warm (page cache)"
        print(f"reads:      {reads}")
        print(f"loader:     {args.workers} workers, batch size {args.batch_size}; torch threads "
              f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
              f"{os.cpu_count()} cores\n")

        files: list[str] = []
        if args.cold:
            from lmm.data.shards import expand_shards

            os.sync()  # written pages must be clean to be dropped
            files = expand_shards([pattern], "--shards") + [ann] + [
                os.path.join(folder, p) for r in dataset.records
                for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", []))]
        results: dict[str, list[dict[str, float]]] = {"shards (lmm)": [], "map-style (LLaVA)": []}
        for r in range(args.repeats):
            evict(files)
            results["shards (lmm)"].append(shard_pass(pattern, proc, args, seed=r))
            evict(files)
            results["map-style (LLaVA)"].append(map_pass(dataset, proc, args, seed=r))

    med = {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for name, runs in results.items()}
    print(f"{'pipeline':<20} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'steady/s':>9}   each pass (samples/s)")
    for name, m in med.items():
        each = ", ".join(f"{run['rate']:.0f}" for run in results[name])
        print(f"{name:<20} {m['samples']:>8.0f} {m['seconds']:>8.2f} {m['rate']:>10.1f} {m['steady']:>9.1f}   {each}")
    shard, base = med["shards (lmm)"], med["map-style (LLaVA)"]
    ratio = shard["rate"] / base["rate"]
    print(f"\nshards / map-style: {ratio:.2f}x samples/s ({shard['steady'] / base['steady']:.2f}x steady) at "
          f"{args.workers} workers; target >= 1.5x: {'met' if ratio >= 1.5 else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
