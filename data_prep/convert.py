"""LLaVA-schema annotations + image folders -> WebDataset shards, manifest and report.

One converter for LLaVA-1.5, ShareGPT4V and any file in the LLaVA conversation schema
(``{"id", "image"?: path | [paths], "conversations": [{"from", "value"}]}``); per-dataset
differences live in :mod:`data_prep.presets`. Entry points: ``python -m data_prep.llava``,
``python -m data_prep.sharegpt4v`` (same options, different preset defaults).

Output folder (nothing is written anywhere else)::

    shard-000000.tar ...   samples: KEY.json (the record) + KEY.000.jpg, KEY.001.png ... (image bytes as stored)
    manifest.json          shards, sample counts, text tokens and images per sample (lmm.data.manifest)
    report.json            skipped records by reason, and each one's index, id, reason and detail
    .convert/              progress: one record per finished shard (what a rerun skips)

Records are assigned to shards by position (record i -> shard i // samples_per_shard, after
an optional seeded shuffle), so the same input and options give the same shards whatever
``--workers`` is, and an interrupted conversion resumes shard by shard. Tar member names come
from the record's position and a sanitised id, never from the id as written, so an id like
``../../x`` cannot name a path.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from data_prep.presets import PRESETS, Preset, detect_preset
from lmm.constants import IMAGE_TOKEN
from lmm.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    TOKENS_PER_WORD,
    VERSION,
    conversation_text,
    estimate_tokens,
    write_manifest,
)
from lmm.data.tar_writer import shard_name, write_sample
from lmm.data.templates import parse_conversation
from lmm.errors import CONVERT_SKIP_REASONS, ConversationError

STATE_DIR = ".convert"
REPORT_NAME = "report.json"
CONVERTER_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
# PIL format -> member extension (the training side decodes whatever the bytes are; the
# extension only has to mark the member as an image).
_FORMAT_EXT = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
}


class SkipRecord(Exception):
    """A record that cannot become a sample; ``reason`` is one of ``CONVERT_SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in CONVERT_SKIP_REASONS, reason
        super().__init__(detail)
        self.reason = reason


@dataclass
class Options:
    """What a worker needs to turn records into samples (picklable)."""

    out: str
    images: str
    image_dirs: list[tuple[str, str]] = field(
        default_factory=list
    )  # (path prefix, folder), longest first
    alt_extensions: list[tuple[str, list[str]]] = field(default_factory=list)
    tokenizer: Optional[str] = None
    max_tokens: Optional[int] = None
    image_tokens: int = 576


# -- one record ------------------------------------------------------------------------------


def sample_key(index: int, record_id: str) -> str:
    """Tar key of record ``index``: its position plus a sanitised id (letters, digits, _ and -)."""
    safe = _SAFE.sub("_", record_id)[:48].strip("_")
    return f"{index:09d}_{safe}" if safe else f"{index:09d}"


def resolve_image(rel: Any, opts: Options) -> Path:
    """The file an annotation's image path names, inside ``--images`` (or an ``--image-dir``)."""
    if not isinstance(rel, str) or not rel.strip():
        raise SkipRecord("malformed", f"image path must be a non-empty string, got {rel!r:.60}")
    path = PurePosixPath(rel.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise SkipRecord(
            "image_missing", f"image path {rel!r} leaves the image folder (absolute or '..')"
        )
    base, sub = Path(opts.images), path
    for prefix, folder in opts.image_dirs:
        parts = PurePosixPath(prefix).parts
        if path.parts[: len(parts)] == parts:
            base, sub = Path(folder), PurePosixPath(*path.parts[len(parts) :])
            break
    full = base / sub
    if full.is_file():
        return full
    for prefix, exts in opts.alt_extensions:
        if rel.startswith(prefix):
            for ext in exts:
                candidate = full.with_suffix(ext)
                if candidate.is_file():
                    return candidate
    raise SkipRecord("image_missing", f"image {rel!r} not found at {full}")


def load_image(path: Path, rel: str) -> tuple[str, bytes]:
    """(member extension, bytes) of an image that fully decodes; re-encoded as PNG only when
    its format has no image extension the training side recognises."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SkipRecord(
            "image_missing", f"image {rel!r} cannot be read ({err.strerror or err})"
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: truncated or corrupt files fail here, not in training
            if img.width < 1 or img.height < 1:
                raise ValueError("empty image")
            ext = _FORMAT_EXT.get(img.format or "")
            if ext is None:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                return "png", buf.getvalue()
    except UnidentifiedImageError:
        # PIL's own message names the in-memory file by its repr (a memory address), which
        # would make two identical conversions report differently.
        raise SkipRecord(
            "image_decode", f"image {rel!r} is in no image format PIL can identify"
        ) from None
    except Exception as err:  # PIL raises many types for bad bytes
        raise SkipRecord(
            "image_decode", f"image {rel!r} does not decode ({type(err).__name__}: {err})"
        ) from None
    return ext, data


_TOKENIZERS: dict[str, Any] = {}


def count_tokens(text: str, tokenizer: Optional[str]) -> int:
    if tokenizer is None:
        return estimate_tokens(text)
    tok = _TOKENIZERS.get(tokenizer)
    if tok is None:  # once per worker process
        from transformers import AutoTokenizer

        tok = _TOKENIZERS[tokenizer] = AutoTokenizer.from_pretrained(tokenizer)
    return len(tok(text, add_special_tokens=False)["input_ids"])


@dataclass
class Sample:
    key: str
    id: str
    json: bytes
    images: list[tuple[str, bytes]]
    tokens: int


def make_sample(position: int, record: Any, opts: Options) -> Sample:
    """Check one record and load its images; raises :class:`SkipRecord` with the reason.
    ``position`` (in the conversion order) makes the tar key unique."""
    if not isinstance(record, dict):
        raise SkipRecord("malformed", f"record is a {type(record).__name__}, not a JSON object")
    sid = str(record.get("id", f"#{position}"))
    try:
        turns = parse_conversation(record.get("conversations"))
    except ConversationError as err:
        raise SkipRecord("malformed", f"conversation: {err}") from None
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise SkipRecord("no_assistant", "no non-empty assistant ('gpt') turn")
    paths = record.get("image")
    if paths is None:
        paths = []
    elif isinstance(paths, str):
        paths = [paths]
    elif not isinstance(paths, list):
        raise SkipRecord(
            "malformed", f"'image' must be a path or a list of paths, got {type(paths).__name__}"
        )
    n_tokens = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if n_tokens != len(paths):
        raise SkipRecord(
            "image_count", f"{n_tokens} {IMAGE_TOKEN} token(s) but {len(paths)} image(s)"
        )
    images = [load_image(resolve_image(p, opts), p) for p in paths]
    tokens = count_tokens(conversation_text(record["conversations"]), opts.tokenizer)
    if opts.max_tokens is not None and tokens + len(images) * opts.image_tokens > opts.max_tokens:
        raise SkipRecord(
            "overlong",
            f"{tokens} text + {len(images)}x{opts.image_tokens} image tokens > "
            f"--max-tokens {opts.max_tokens}",
        )
    meta = dict(record, id=sid)
    return Sample(
        sample_key(position, sid),
        sid,
        json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        images,
        tokens,
    )


# -- one shard -------------------------------------------------------------------------------


def convert_shard(task: tuple[int, int, list[int], list[Any], Options]) -> dict[str, Any]:
    """One shard's records -> ``shard-K.tar`` and its progress record (runs in a worker).

    ``first`` is the position of the shard's first record in the conversion order (keys are
    built from positions); ``indices`` are the records' indices in the annotation file (the
    report names those).
    """
    k, first, indices, records, opts = task
    out = Path(opts.out)
    kept: list[Sample] = []
    skipped: list[dict[str, Any]] = []
    for offset, (index, record) in enumerate(zip(indices, records)):
        try:
            kept.append(make_sample(first + offset, record, opts))
        except SkipRecord as err:
            rid = record.get("id") if isinstance(record, dict) else None
            skipped.append(
                {
                    "index": index,
                    "id": None if rid is None else str(rid),
                    "reason": err.reason,
                    "detail": str(err),
                }
            )
    part: dict[str, Any] = {
        "shard": k,
        "path": None,
        "size": 0,
        "ids": [s.id for s in kept],
        "tokens": [s.tokens for s in kept],
        "images": [len(s.images) for s in kept],
        "skipped": skipped,
    }
    if kept:
        path = out / shard_name(k)
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for s in kept:
                write_sample(
                    tar,
                    s.key,
                    {
                        "json": s.json,
                        **{f"{i:03d}.{ext}": data for i, (ext, data) in enumerate(s.images)},
                    },
                )
        os.replace(tmp, path)  # a shard is either complete or absent
        part.update(path=path.name, size=path.stat().st_size)
    _write_json(out / STATE_DIR / f"shard-{k:06d}.json", part)  # last: marks the shard done
    return part


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finished(out: Path, k: int) -> Optional[dict[str, Any]]:
    """The progress record of shard ``k`` if the shard is complete on disk."""
    try:
        part = json.loads((out / STATE_DIR / f"shard-{k:06d}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if part.get("path") is None:
        return part
    shard = out / part["path"]
    return part if shard.is_file() and shard.stat().st_size == part.get("size") else None


# -- the whole conversion ---------------------------------------------------------------------


def read_records(path: Path) -> list[Any]:
    """A JSON list (or JSON Lines, one record per line; bad lines become malformed records)."""
    if path.suffix == ".jsonl":
        records: list[Any] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        records.append(None)  # reported as malformed with its index
        return records
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def _fingerprint(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = hashlib.sha1(f.read(1 << 20)).hexdigest()
    return {
        "converter": CONVERTER_VERSION,
        "json": path.name,
        "json_bytes": path.stat().st_size,
        "json_sha1_first_mib": head,
        **settings,
    }


def _remove_outputs(out: Path) -> None:
    """Delete what a conversion writes (and nothing else) from ``out``."""
    for pattern in ("shard-*.tar", "shard-*.tar.tmp", MANIFEST_NAME, REPORT_NAME):
        for p in out.glob(pattern):
            p.unlink()
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


class ConversionError(Exception):
    """A problem with the inputs or options (not with single records): nothing was converted."""


def convert(
    json_path: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str = "llava",
    samples_per_shard: int = 1000,
    workers: int = 1,
    image_dirs: Sequence[tuple[str, str]] = (),
    tokenizer: Optional[str] = None,
    max_tokens: Optional[int] = None,
    image_tokens: int = 576,
    shuffle_seed: Optional[int] = None,
    limit: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert one annotation file; returns the summary (``report.json`` plus ``seconds``)."""
    json_path, out = Path(json_path), Path(out)
    p: Preset = PRESETS.get(preset, option="--preset")
    if samples_per_shard < 1:
        raise ConversionError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not json_path.is_file():
        raise ConversionError(f"--json {json_path}: no such file")
    if not Path(images).is_dir():
        raise ConversionError(f"--images {images}: no such folder (it should be {p.images})")
    opts = Options(
        out=str(out),
        images=str(images),
        image_dirs=sorted(
            ((pre.strip("/"), str(d)) for pre, d in image_dirs), key=lambda x: -len(x[0])
        ),
        alt_extensions=[(pre, list(exts)) for pre, exts in p.alt_extensions],
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        image_tokens=image_tokens,
    )
    settings = {
        "preset": preset,
        "samples_per_shard": samples_per_shard,
        "shuffle_seed": shuffle_seed,
        "limit": limit,
        "image_dirs": opts.image_dirs,
        "tokenizer": tokenizer,
        "max_tokens": max_tokens,
        "image_tokens": image_tokens,
    }
    fingerprint = json.loads(
        json.dumps(_fingerprint(json_path, settings))
    )  # as it reads back from disk

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_DIR / "state.json"
    if overwrite:
        _remove_outputs(out)
    try:
        previous = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if previous is not None and previous != fingerprint:
        changed = sorted(
            k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k)
        )
        raise ConversionError(
            f"--out {out} holds a conversion with other inputs or settings (differs in: {', '.join(changed)}); "
            "use another --out, or --overwrite to discard it"
        )
    if previous is None:
        foreign = sorted(p.name for p in out.glob("shard-*.tar")) + [
            n for n in (MANIFEST_NAME,) if (out / n).exists()
        ]
        if foreign:
            raise ConversionError(
                f"--out {out} already holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} but no "
                "conversion state; use an empty folder, or --overwrite to replace them"
            )
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        _write_json(state_path, fingerprint)

    print(f"reading {json_path} ...", file=sys.stderr, flush=True)
    try:
        records = read_records(json_path)
    except (OSError, ValueError) as err:
        raise ConversionError(f"--json {json_path}: {err}") from None
    order = list(range(len(records)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    n_shards = (len(order) + samples_per_shard - 1) // samples_per_shard

    parts: dict[int, dict[str, Any]] = {}
    todo = []
    for k in range(n_shards):
        done = _finished(out, k)
        if done is not None:
            parts[k] = done
        else:
            todo.append(k)

    def tasks() -> Iterator[tuple[int, int, list[int], list[Any], Options]]:
        for k in todo:
            idx = order[k * samples_per_shard : (k + 1) * samples_per_shard]
            yield k, k * samples_per_shard, idx, [records[i] for i in idx], opts

    from tqdm import tqdm

    resumed = sum(len(parts[k]["ids"]) + len(parts[k]["skipped"]) for k in parts)
    bar = tqdm(
        total=len(order),
        initial=resumed,
        unit="rec",
        desc=f"{json_path.name} -> {out.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    if resumed:
        bar.write(f"resuming: {len(parts)} of {n_shards} shards already done")
    start = time.perf_counter()
    pool = multiprocessing.Pool(workers) if workers > 1 and len(todo) > 1 else None
    try:
        results = (
            pool.imap_unordered(convert_shard, tasks()) if pool else map(convert_shard, tasks())
        )
        for part in results:
            parts[part["shard"]] = part
            bar.update(len(part["ids"]) + len(part["skipped"]))
    except BaseException:
        if pool is not None:
            pool.terminate()  # e.g. Ctrl-C: stop now; finished shards are kept for the rerun
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    return _finish(
        out,
        json_path,
        p,
        parts,
        n_shards,
        len(order),
        tokenizer,
        settings,
        time.perf_counter() - start,
    )


def _finish(
    out: Path,
    json_path: Path,
    preset: Preset,
    parts: dict[int, dict],
    n_shards: int,
    total: int,
    tokenizer: Optional[str],
    settings: dict,
    elapsed: float,
) -> dict[str, Any]:
    shards, skipped_list = [], []
    for k in range(n_shards):
        part = parts[k]
        skipped_list += part["skipped"]
        if part["path"] is not None:
            shards.append(
                {
                    "path": part["path"],
                    "num_samples": len(part["ids"]),
                    "tokens": part["tokens"],
                    "images": part["images"],
                }
            )
    counts = Counter(s["reason"] for s in skipped_list)
    written = sum(s["num_samples"] for s in shards)
    method = (
        {"method": "tokenizer", "tokenizer": tokenizer}
        if tokenizer
        else {"method": "words", "tokens_per_word": TOKENS_PER_WORD}
    )
    source = {"json": str(json_path), "preset": preset.name, **settings}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": written,
        "num_images": sum(sum(s["images"]) for s in shards),
        "num_text_only": sum(s["images"].count(0) for s in shards),
        "tokens": method,
        "shards": shards,
        "skipped": dict(counts),
        "source": source,
    }
    if written:
        write_manifest(out, manifest)
    else:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    report = {
        "json": str(json_path),
        "preset": preset.name,
        "records": total,
        "written": written,
        "shards": len(shards),
        "skipped": dict(counts),
        "skipped_records": skipped_list,
    }
    # The file holds only what the inputs determine, so equal conversions give equal reports;
    # the time is returned (and printed) beside it.
    _write_json(out / REPORT_NAME, report)
    return {**report, "seconds": round(elapsed, 1)}


# -- command line -------------------------------------------------------------------------------


def _image_dir(value: str) -> tuple[str, str]:
    prefix, sep, folder = value.partition("=")
    if not sep or not prefix or not folder:
        raise argparse.ArgumentTypeError(f"expected PREFIX=FOLDER, got {value!r}")
    return prefix, folder


def build_parser(prog: str, description: str, default_preset: str) -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:20s} {PRESETS.get(name).summary}" for name in PRESETS)
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{presets}\n\nOutput: shard-*.tar, manifest.json, report.json in --out. "
        "Exit status 0 when at least one sample was written, 1 when none was, 2 for bad options.",
    )
    p.add_argument(
        "--json",
        required=True,
        help="annotation file: a JSON list of LLaVA-schema records (or .jsonl)",
    )
    p.add_argument(
        "--images",
        required=True,
        help="folder the records' image paths are relative to (see the preset)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (shards, manifest.json, report.json); nothing is written outside it",
    )
    p.add_argument(
        "--preset",
        default="auto",
        choices=["auto", *PRESETS.names()],
        help=f"dataset preset; auto = chosen by the exact --json file name, else {default_preset!r} "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="records per shard, before skips (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel processes, one shard each at a time; the output does not depend on it "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--image-dir",
        action="append",
        default=[],
        type=_image_dir,
        metavar="PREFIX=FOLDER",
        help="read image paths starting with PREFIX from FOLDER instead of --images/PREFIX "
        "(repeatable), e.g. llava/llava_pretrain/images=/data/LLaVA-Pretrain/images",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="count text tokens with this tokenizer (hub name or local "
        "folder); default: estimate 1.3 tokens per word",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="skip records whose text tokens + images x "
        "--image-tokens exceed this (default: keep all)",
    )
    p.add_argument(
        "--image-tokens",
        type=int,
        default=576,
        help="tokens per image for --max-tokens "
        "(576 = CLIP ViT-L/14 at 336 px) (default: %(default)s)",
    )
    p.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        help="shuffle records with this seed before sharding (default: keep file order)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="convert only the first N records (a quick trial)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier conversion in --out (default: resume it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--list-presets",
        action="store_true",
        help="print presets with their image layout and quirks",
    )
    return p


def _list_presets() -> None:
    for name in PRESETS:
        pr = PRESETS.get(name)
        print(f"{name}: {pr.summary}")
        if pr.files:
            print(f"  files:  {', '.join(pr.files)}")
        print(f"  images: {pr.images}")
        for note in pr.notes:
            print(f"  note:   {note}")


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m data_prep.convert",
    description: str = __doc__.split("\n\n")[0],
    default_preset: str = "llava",
) -> int:
    if (
        argv is not None
        and "--list-presets" in argv
        or argv is None
        and "--list-presets" in sys.argv[1:]
    ):
        _list_presets()
        return 0
    args = build_parser(prog, description, default_preset).parse_args(argv)
    preset = (
        detect_preset(Path(args.json).name, default_preset)
        if args.preset == "auto"
        else args.preset
    )
    print(f"preset: {preset} ({PRESETS.get(preset).summary})", file=sys.stderr)
    try:
        report = convert(
            args.json,
            args.images,
            args.out,
            preset=preset,
            samples_per_shard=args.samples_per_shard,
            workers=max(1, args.workers),
            image_dirs=args.image_dir,
            tokenizer=args.tokenizer,
            max_tokens=args.max_tokens,
            image_tokens=args.image_tokens,
            shuffle_seed=args.shuffle_seed,
            limit=args.limit,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("records", "written", "shards", "skipped", "seconds")}
    print(json.dumps(summary, indent=2))
    if report["written"] == 0:
        print(
            f"error: no usable record in {args.json}; see {Path(args.out) / REPORT_NAME}",
            file=sys.stderr,
        )
        return 1
    print(f"shards, manifest.json and {REPORT_NAME} in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
