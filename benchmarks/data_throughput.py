"""Training data throughput: lmm's shard pipeline vs two LLaVA-style map-style Datasets.

All three read the same samples with the same DataLoader worker count and batch size, in one
process, one after the other (alternating, ``--repeats`` times each):

* **shards (lmm)**: ``LMMDataModule(...).train_dataloader()``: the epoch plan's batches,
  each built inside a worker (samples read from the tar by offset, image decoded,
  transformed, conversation tokenized, batch collated);
* **map-style, lmm encoder** (layout only): LLaVA's file layout -- a JSON list of records in
  memory and one image file per sample in a folder -- but ``__getitem__`` opens the image with
  PIL and encodes it with lmm's own ``SampleEncoder.encode_train``, batched by lmm's
  ``collate`` (``torch`` DataLoader, ``shuffle=True``). Per-sample work is identical to the
  shards', so the ratio to it isolates the storage layout (tar by offset vs JSON + folder);
* **map-style, LLaVA-1.5 data path** (the reference approach): the same JSON + folder, with
  ``__getitem__`` doing what LLaVA-1.5's ``LazySupervisedDataset`` (llava/train/train.py) does
  per sample: ``Image.open(...).convert('RGB')``, ``expand2square`` with the processor's mean
  colour (``image_aspect_ratio='pad'``), the Hugging Face image processor's
  ``preprocess(image, return_tensors='pt')['pixel_values'][0]`` (``AutoImageProcessor`` of
  the tower), ``preprocess_multimodal`` (``<image>`` moved to the front of its turn) and
  ``preprocess_v1`` (Vicuna v1 prompt, ``tokenizer_image_token`` of the full prompt, then the
  prompt split into rounds, each round and its instruction tokenized again to mask the
  instruction tokens); batches by a ``DataCollatorForSupervisedDataset``-style collator
  (``pad_sequence``). Reimplemented here from the description of that code (LLaVA itself is
  not a dependency); its ``<image>`` stays one placeholder id (-200) that LLaVA's model expands,
  where lmm's encoder expands it to N image-token ids in the data. The ratio to it is the
  gain over the reference implementation's data path (layout + per-sample work).

samples/s counts every sample handed to the training loop, from ``iter()`` (worker start
included) to the last batch; "steady" leaves out the wait for the first batch. The files
are freshly written, so by default all read from the page cache and the comparison is of
the pipelines' CPU cost; ``--cold`` drops the files from the page cache before every pass,
as reads from a data set larger than memory (or from network storage) would be.

``--check`` runs no throughput passes: it encodes ``--check-samples`` samples with lmm's
encoder and with the LLaVA-1.5 path, asserts the tensors agree in shape and meaning (pixel
values ``[3, H, W]`` normalised alike; the same supervised tokens), and times each stage of
both per-sample paths in this process.

Data (default): a shapes world (``lmm.worlds.shapes.world.write_world``, ``--images`` train images,
its ``finetune`` or ``pretrain`` split) generated in a temp dir, and the same samples exported
to ``data.json`` + one PNG per sample. Or give ``--shards`` (pattern) and ``--json`` + ``--image-folder``
holding the same samples. Tokenizer and image spec: ``artifacts/tiny/models`` if present,
else the tiny models (``lmm.standins.tiny.build_tiny_models``) built in the temp dir.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --workers 2 --batch-size 16
    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import yaml
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from lmm.data.collate import collate
from lmm.data.datamodule import LMMDataModule
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.templates import get_template
from lmm.model.connectors import build_connector

TINY_MODELS = Path("artifacts/tiny/models")
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "finetune.yaml"


class LlavaStyleDataset(Dataset):
    """Baseline "map-style, lmm encoder": LLaVA's layout (records from one JSON list, each image
    a file opened with PIL per sample), encoded by lmm's own ``SampleEncoder``."""

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


# -- baseline "map-style, LLaVA-1.5 data path" -------------------------------------------------
# What LLaVA-1.5 (llava/train/train.py, llava/mm_utils.py, llava/conversation.py) does per sample,
# written from the description of that code: same steps, same tokenizer calls, same masking rule.

IGNORE_INDEX = -100
LLAVA_IMAGE_TOKEN_INDEX = (
    -200
)  # LLaVA's placeholder id; its model splices the image features in there
DEFAULT_IMAGE_TOKEN = "<image>"
# conv_vicuna_v1: SeparatorStyle.TWO, roles USER/ASSISTANT, sep " ", sep2 "</s>".
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_ROLES = ("USER", "ASSISTANT")
VICUNA_V1_SEP, VICUNA_V1_SEP2 = " ", "</s>"


def vicuna_v1_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """``Conversation.get_prompt`` for SeparatorStyle.TWO: system, then ``ROLE: text`` + sep / sep2
    alternately (sep after user turns, sep2 after assistant turns)."""
    seps = (VICUNA_V1_SEP, VICUNA_V1_SEP2)
    out = VICUNA_V1_SYSTEM + seps[0]
    for k, (role, text) in enumerate(messages):
        out += f"{role}: {text}{seps[k % 2]}" if text else f"{role}:"
    return out


def tokenizer_image_token(
    prompt: str, tokenizer: Any, image_token_index: int = LLAVA_IMAGE_TOKEN_INDEX
) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: tokenize the text between ``<image>`` markers chunk by
    chunk, one bos at the start (the chunks' own bos dropped), the placeholder id between chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_token_index)
        ids.extend(chunk[offset:])
    return ids


def preprocess_multimodal(sources: list[list[dict]]) -> list[list[dict]]:
    """LLaVA's ``preprocess_multimodal`` (is_multimodal, no im_start/end tokens, not mmtag): a turn
    holding ``<image>`` becomes ``<image>\n`` + its text without the marker, stripped."""
    for source in sources:
        for sentence in source:
            if DEFAULT_IMAGE_TOKEN in sentence["value"]:
                value = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = (DEFAULT_IMAGE_TOKEN + "\n" + value).strip()
    return sources


def preprocess_v1(
    sources: list[list[dict]], tokenizer: Any, has_image: bool, model_max_length: int
) -> dict:
    """LLaVA's ``preprocess_v1``: Vicuna v1 prompt per conversation, tokenized whole; labels are the
    ids with each round's instruction masked, its length found by tokenizing every round and its
    instruction part again (``- 2`` for the bos and the space the answer's first token absorbs)."""
    roles = {"human": VICUNA_V1_ROLES[0], "gpt": VICUNA_V1_ROLES[1]}
    conversations = []
    for source in sources:
        if roles[source[0]["from"]] != VICUNA_V1_ROLES[0]:
            source = source[1:]  # skip a first turn that is not from the human
        messages = []
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            assert role == VICUNA_V1_ROLES[j % 2], "turns must alternate"
            messages.append((role, sentence["value"]))
        conversations.append(vicuna_v1_prompt(messages))

    if has_image:
        input_ids = torch.stack(
            [
                torch.tensor(tokenizer_image_token(c, tokenizer), dtype=torch.long)
                for c in conversations
            ]
        )
    else:
        input_ids = tokenizer(
            conversations,
            return_tensors="pt",
            padding="longest",
            max_length=model_max_length,
            truncation=True,
        ).input_ids
    targets = input_ids.clone()

    def n_tokens(text: str) -> int:
        return (
            len(tokenizer_image_token(text, tokenizer))
            if has_image
            else len(tokenizer(text).input_ids)
        )

    sep = VICUNA_V1_SEP + VICUNA_V1_ROLES[1] + ": "
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())
        cur_len = 1
        target[:cur_len] = IGNORE_INDEX
        for rou in conversation.split(VICUNA_V1_SEP2):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = n_tokens(rou)
            instruction_len = n_tokens(parts[0]) - 2
            target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
            cur_len += round_len
        target[cur_len:] = IGNORE_INDEX
        if cur_len < model_max_length and cur_len != total_len:
            target[:] = IGNORE_INDEX
            print(f"WARNING: tokenization mismatch: {cur_len} vs. {total_len}. (ignored)")
    return {"input_ids": input_ids, "labels": targets}


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(
        pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    )
    return result


class Llava15Dataset(Dataset):
    """Baseline "map-style, LLaVA-1.5 data path": ``LazySupervisedDataset.__getitem__`` of
    LLaVA-1.5 (image_aspect_ratio='pad', conversation version v1) on the JSON list + folder."""

    def __init__(
        self,
        json_path: str,
        image_folder: str,
        tokenizer: Any,
        image_processor: Any,
        model_max_length: int,
        image_aspect_ratio: str = "pad",
    ) -> None:
        with open(json_path, encoding="utf-8") as f:
            self.list_data_dict = json.load(f)
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.processor = image_processor
        self.model_max_length = model_max_length
        self.image_aspect_ratio = image_aspect_ratio

    def __len__(self) -> int:
        return len(self.list_data_dict)

    def load_image(self, image_file: str) -> Image.Image:
        return Image.open(os.path.join(self.image_folder, image_file)).convert("RGB")

    def image_tensor(self, image: Image.Image) -> torch.Tensor:
        if self.image_aspect_ratio == "pad":
            image = expand2square(image, tuple(int(x * 255) for x in self.processor.image_mean))
        return self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]

    def text(self, record: dict) -> dict:
        has_image = "image" in record
        sources = copy.deepcopy([record["conversations"]])
        if has_image:
            sources = preprocess_multimodal(sources)
        data = preprocess_v1(sources, self.tokenizer, has_image, self.model_max_length)
        return {"input_ids": data["input_ids"][0], "labels": data["labels"][0]}

    def __getitem__(self, i: int) -> dict:
        record = self.list_data_dict[i]
        image = self.image_tensor(self.load_image(record["image"])) if "image" in record else None
        data = self.text(record)
        if image is not None:
            data["image"] = image
        else:  # text-only sample of a multimodal model: a zero image of the processor's size
            size = self.processor.size
            data["image"] = torch.zeros(3, size["height"], size["width"])
        return data


def llava_collate(instances: Sequence[dict], pad_id: int, model_max_length: int) -> dict:
    """``DataCollatorForSupervisedDataset``: right-pad with ``pad_sequence``, cut to model_max_length,
    attention mask from ``ne(pad)``, images stacked when all have one shape."""
    input_ids = pad_sequence(
        [x["input_ids"] for x in instances], batch_first=True, padding_value=pad_id
    )
    labels = pad_sequence(
        [x["labels"] for x in instances], batch_first=True, padding_value=IGNORE_INDEX
    )
    input_ids, labels = input_ids[:, :model_max_length], labels[:, :model_max_length]
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad_id)}
    images = [x["image"] for x in instances]
    batch["images"] = (
        torch.stack(images) if all(x.shape == images[0].shape for x in images) else images
    )
    return batch


def load_processor(models_dir: Path | None, workdir: Path) -> tuple[Processor, str, Path]:
    from lmm.model.language import LanguageConfig, load_tokenizer
    from lmm.standins.tiny import TinySpec
    from lmm.visual.image_spec import ImageSpec

    if models_dir is None and (TINY_MODELS / "tiny_spec.json").is_file():
        models_dir = TINY_MODELS
    if models_dir is None:
        from lmm.standins.tiny import build_tiny_models
        from lmm.worlds.shapes.tiny import tiny_corpus

        models_dir = workdir / "models"
        build_tiny_models(models_dir, tiny_corpus(), TinySpec())
    spec = json.loads((models_dir / "tiny_spec.json").read_text())
    size, patch = int(spec["image_size"]), int(spec["patch_size"])
    tok = load_tokenizer(LanguageConfig(name_or_path=str(models_dir / "llm")))
    image_spec = ImageSpec.from_pretrained(str(models_dir / "vision"), "siglip_vision_model", size)
    # As many tokens per image as the tiny configs' connector hands the LM.
    connector = yaml.safe_load(TINY_CONFIG.read_text())["model"]["connector"]
    n_tokens = build_connector(
        connector, int(spec["vision_width"]), int(spec["llm_width"]), (size // patch) ** 2
    ).num_output_tokens
    proc = Processor(tok, image_spec, n_tokens, tok.convert_tokens_to_ids("<image>"))
    return (
        proc,
        f"{models_dir} ({size} px images, {n_tokens} tokens each, vocab {len(tok)})",
        models_dir,
    )


def make_data(workdir: Path, n_images: int, split: str) -> tuple[str, str, str]:
    """Shapes world shards + the same samples as data.json and a PNG folder."""
    from lmm.data.shards import expand_shards
    from lmm.data.tarindex import TarSamples
    from lmm.worlds.shapes.config import WorldConfig
    from lmm.worlds.shapes.writer import write_world

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
        n += int(batch["size"]) if "size" in batch else len(batch["input_ids"])
        batches_seen += 1
        if first is None:
            first, n_first = time.perf_counter(), n
        if n >= limit:
            break
    end = time.perf_counter()
    return {
        "samples": n,
        "batches": batches_seen,
        "seconds": end - start,
        "rate": n / (end - start),
        "steady": (n - n_first) / max(end - first, 1e-9),
    }


def evict(paths: Iterable[str]) -> None:
    """Drop these files from the page cache (``--cold``): the next pass reads them from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def shard_pass(
    pattern: str, proc: Processor, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    dm = LMMDataModule(
        train=[pattern],
        template=args.template,
        batch_size=args.batch_size,
        num_workers=args.workers,
        max_length=args.max_length,
        seed=seed,
        processor=proc,
    )
    loader = dm.train_dataloader()
    return timed(loader, args.samples)


def map_pass(
    dataset: Dataset, collate_fn: Callable, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate_fn,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return timed(loader, args.samples)


def load_image_processor(models_dir: Path) -> Any:
    """The tower's Hugging Face image processor, as LLaVA loads it (``from_pretrained`` of the tower)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(models_dir / "vision"))


def stage_times(fns: dict[str, Callable[[int], Any]], n: int) -> dict[str, float]:
    """Microseconds per sample of each stage, run over samples 0..n-1 in this process."""
    out = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        out[name] = (time.perf_counter() - t) / n * 1e6
    return out


def check(lmm_ds: LlavaStyleDataset, ref_ds: Llava15Dataset, proc: Processor, n: int) -> int:
    """Same samples through lmm's encoder and the LLaVA-1.5 path: shapes and meaning agree?"""
    tok, spec = proc.tokenizer, proc.image_spec
    n = min(n, len(lmm_ds))
    print(
        f"check: {n} samples through lmm's SampleEncoder and the LLaVA-1.5 path "
        f"(image processor {type(ref_ds.processor).__name__}, mean {list(ref_ds.processor.image_mean)}, "
        f"std {list(ref_ds.processor.image_std)}; lmm ImageSpec mean {list(spec.mean)}, std {list(spec.std)})"
    )
    max_pix, n_same_ids, sup_total = 0.0, 0, 0
    for i in range(n):
        ours, ref = lmm_ds[i], ref_ds[i]
        img, pix = ref["image"], ours["pixel_values"]
        assert img.shape == (3, spec.size, spec.size) == tuple(pix.shape[1:]) and len(pix) == 1, (
            img.shape,
            pix.shape,
        )
        max_pix = max(max_pix, float((img - pix[0]).abs().max()))
        sup_ours = ours["labels"][ours["labels"] != IGNORE_INDEX]
        sup_ref = ref["labels"][ref["labels"] != IGNORE_INDEX]
        assert len(sup_ref) > 0, f"sample {i}: LLaVA path masked everything (tokenization mismatch)"
        assert torch.equal(sup_ours, sup_ref), (
            f"sample {i}: supervised tokens differ:\n{sup_ours}\n{sup_ref}"
        )
        sup_total += len(sup_ref)
        # The placeholder expanded to N image-token ids, as lmm's encoder does in the data.
        ids = ref["input_ids"]
        reps = torch.where(ids == LLAVA_IMAGE_TOKEN_INDEX, proc.num_image_tokens, 1)
        expanded = torch.repeat_interleave(
            torch.where(ids == LLAVA_IMAGE_TOKEN_INDEX, proc.image_token_id, ids), reps
        )
        n_same_ids += int(torch.equal(expanded, ours["input_ids"]))
        if i < 2:
            print(
                f"  sample {i}: lmm input_ids {tuple(ours['input_ids'].shape)} "
                f"(<image> -> {proc.num_image_tokens} ids), "
                f"LLaVA input_ids {tuple(ids.shape)} (<image> -> 1 placeholder {LLAVA_IMAGE_TOKEN_INDEX}); "
                f"supervised tokens {len(sup_ours)} vs {len(sup_ref)}: {tok.decode(sup_ref)!r}"
            )
    print(
        f"  pixel_values: [3, {spec.size}, {spec.size}] both; max |lmm - LLaVA| = {max_pix:.4f} "
        f"(normalised units; 1/255/std = {1 / 255 / spec.std[0]:.4f} is one 8-bit step)"
    )
    print(f"  labels: the same supervised token ids in {n}/{n} samples ({sup_total} tokens in all)")
    print(f"  input_ids: identical after expanding LLaVA's placeholder in {n_same_ids}/{n} samples")

    # Where each path spends its time, per sample, in this process (one core, no workers).
    m = min(n, 200)
    recs = ref_ds.list_data_dict
    opened = [ref_ds.load_image(recs[i]["image"]) for i in range(m)]
    squared = [
        expand2square(im, tuple(int(x * 255) for x in ref_ds.processor.image_mean)) for im in opened
    ]
    enc = lmm_ds.encoder
    raw_imgs = [Image.open(os.path.join(lmm_ds.image_folder, recs[i]["image"])) for i in range(m)]
    for im in raw_imgs:
        im.load()
    ref_t = stage_times(
        {
            "open + convert('RGB')": lambda i: ref_ds.load_image(recs[i]["image"]),
            "expand2square": lambda i: expand2square(
                opened[i], tuple(int(x * 255) for x in ref_ds.processor.image_mean)
            ),
            "image processor .preprocess": lambda i: ref_ds.processor.preprocess(
                squared[i], return_tensors="pt"
            )["pixel_values"][0],
            "preprocess_multimodal + preprocess_v1": lambda i: ref_ds.text(recs[i]),
            "whole __getitem__": lambda i: ref_ds[i],
        },
        m,
    )
    ours_t = stage_times(
        {
            "open + load": lambda i: Image.open(
                os.path.join(lmm_ds.image_folder, recs[i]["image"])
            ).load(),
            "ImageTransform": lambda i: enc.transform(raw_imgs[i]),
            "template + tokenize + labels": lambda i: _lmm_text(enc, recs[i]),
            "whole __getitem__": lambda i: lmm_ds[i],
        },
        m,
    )
    print(f"\nper-sample stage cost, us (mean over {m} samples, one process, no workers):")
    for title, times in (("LLaVA-1.5 path", ref_t), ("lmm encoder", ours_t)):
        print(f"  {title}:")
        for name, us in times.items():
            print(f"    {name:<40} {us:8.0f}")
    return 0


def _lmm_text(enc: SampleEncoder, record: dict) -> None:
    """lmm's text side of ``encode_train``: render, tokenize once with offsets, labels, expand."""
    meta = dict(record)
    turns = enc._turns(meta)
    text, spans = enc.template.render(turns, enc.eos)
    ids, labels = enc._label(text, spans, str(meta.get("id", "?")))
    enc._expand_images(ids, labels, text.count("<image>"), "?")


PIPELINES = {
    "shards (lmm)": "lmm's WebDataset shard loader (tar read by offset, lmm encoder + collate)",
    "map lmm-encoder": "JSON list + image folder, DataLoader(shuffle=True), lmm's SampleEncoder + collate: "
    "same per-sample work as the shards, so this ratio is the storage layout only",
    "map LLaVA-1.5": "JSON list + image folder, DataLoader(shuffle=True), LLaVA-1.5 LazySupervisedDataset path: "
    "PIL convert, expand2square, HF image processor, preprocess_v1 (round re-tokenization), "
    "pad_sequence collator: the reference implementation's data path",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader workers of all pipelines (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="samples per batch (default: %(default)s)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples read per pass (default: all of one epoch)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="passes per pipeline, alternating; the median is reported (default: %(default)s)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=10000,
        help="shapes-world train images to generate (default: %(default)s)",
    )
    p.add_argument(
        "--split",
        default="finetune",
        choices=["finetune", "pretrain"],
        help="generated split: multi-turn QA or captions (default: %(default)s)",
    )
    p.add_argument(
        "--shards",
        default=None,
        help="shard pattern to read instead of generating data "
        "(needs --json and --image-folder with the same samples)",
    )
    p.add_argument("--json", default=None, help="LLaVA-style JSON list of the same samples")
    p.add_argument(
        "--image-folder", default=None, help="folder the JSON's image paths are relative to"
    )
    p.add_argument(
        "--models",
        default=None,
        help="tiny models folder (vision/, llm/, tiny_spec.json); default: "
        f"{TINY_MODELS} if present, else built in the temp dir",
    )
    p.add_argument(
        "--template",
        default=None,
        help="conversation template (default: vicuna for finetune, plain for pretrain)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="token budget per sample; also the LLaVA path's "
        "model_max_length (default: %(default)s)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the shards and image files from the page cache before "
        "each pass (posix_fadvise), so all read from disk as a data "
        "set larger than memory would",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="no throughput passes: check that the LLaVA-1.5 path and "
        "lmm's encoder give tensors of the same shapes and meaning on "
        "--check-samples samples, and time each stage per sample",
    )
    p.add_argument(
        "--check-samples", type=int, default=64, help="samples for --check (default: %(default)s)"
    )
    args = p.parse_args(argv)
    if bool(args.shards) != bool(args.json and args.image_folder):
        p.error("--shards, --json and --image-folder go together")
    args.template = args.template or ("plain" if args.split == "pretrain" else "vicuna")
    llava_path = (
        args.template == "vicuna"
    )  # the LLaVA-1.5 path implemented here is conversation v1 (Vicuna)

    with tempfile.TemporaryDirectory(prefix="lmm_data_bench_") as tmp:
        workdir = Path(tmp)
        proc, model_desc, models_dir = load_processor(
            Path(args.models) if args.models else None, workdir
        )
        if args.shards:
            pattern, ann, folder = args.shards, args.json, args.image_folder
            data_desc = f"{pattern} vs {ann} + {folder}"
        else:
            t = time.perf_counter()
            pattern, ann, folder = make_data(
                workdir, args.images if not args.check else max(args.check_samples, 8), args.split
            )
            data_desc = (
                f"shapes world, {args.images if not args.check else max(args.check_samples, 8)} images, "
                f"{args.split} split (generated and exported in {time.perf_counter() - t:.0f} s)"
            )
        encoder = SampleEncoder(proc, get_template(args.template), args.max_length)
        dataset = LlavaStyleDataset(ann, folder, encoder)
        ref = None
        if llava_path:
            ref = Llava15Dataset(
                ann, folder, proc.tokenizer, load_image_processor(models_dir), args.max_length
            )
        elif args.check:
            p.error(
                "--check compares with the LLaVA-1.5 path, which is implemented for the vicuna template only"
            )
        if args.check:
            print(f"data:       {data_desc}\nprocessor:  {model_desc}\n")
            return check(dataset, ref, proc, args.check_samples)

        epoch = len(dataset) // args.batch_size * args.batch_size
        args.samples = min(args.samples or epoch, epoch)
        print(f"data:       {data_desc}; {len(dataset)} samples, {args.samples} read per pass")
        print(f"processor:  {model_desc}; template {args.template}, max_length {args.max_length}")
        reads = (
            "cold (files dropped from the page cache before each pass)"
            if args.cold
            else "warm (page cache)"
        )
        print(f"reads:      {reads}")
        print(
            f"loader:     {args.workers} workers, batch size {args.batch_size}; torch threads "
            f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
            f"{os.cpu_count()} cores"
        )
        print("pipelines:")
        for name, what in PIPELINES.items():
            if name != "map LLaVA-1.5" or ref is not None:
                print(f"  {name:<16} {what}")
        if ref is None:
            print(
                "  (map LLaVA-1.5 left out: it implements LLaVA's conversation v1, i.e. --template vicuna)"
            )
        print()

        files: list[str] = []
        if args.cold:
            from lmm.data.shards import expand_shards

            os.sync()  # written pages must be clean to be dropped
            files = (
                expand_shards([pattern], "--shards")
                + [ann]
                + [
                    os.path.join(folder, p)
                    for r in dataset.records
                    for p in (
                        [r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])
                    )
                ]
            )
        passes: dict[str, Callable[[int], dict[str, float]]] = {
            "shards (lmm)": lambda seed: shard_pass(pattern, proc, args, seed),
            "map lmm-encoder": lambda seed: map_pass(
                dataset, partial(collate, pad_id=proc.tokenizer.pad_token_id), args, seed
            ),
        }
        if ref is not None:
            passes["map LLaVA-1.5"] = lambda seed: map_pass(
                ref,
                partial(
                    llava_collate,
                    pad_id=proc.tokenizer.pad_token_id,
                    model_max_length=args.max_length,
                ),
                args,
                seed,
            )
        results: dict[str, list[dict[str, float]]] = {name: [] for name in passes}
        for r in range(args.repeats):
            for name, run in passes.items():
                evict(files)
                results[name].append(run(r))

    med = {
        name: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        for name, runs in results.items()
    }
    print(
        f"{'pipeline':<18} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'steady/s':>9}   each pass (samples/s)"
    )
    for name, m in med.items():
        each = ", ".join(f"{run['rate']:.0f}" for run in results[name])
        print(
            f"{name:<18} {m['samples']:>8.0f} {m['seconds']:>8.2f} {m['rate']:>10.1f} {m['steady']:>9.1f}   {each}"
        )
    shard = med["shards (lmm)"]
    print()
    for name, why in (
        ("map lmm-encoder", "storage layout only, same encoder"),
        ("map LLaVA-1.5", "vs the reference implementation's data path"),
    ):
        if name not in med:
            continue
        base = med[name]
        ratio = shard["rate"] / base["rate"]
        target = (
            f"; target >= 1.5x: {'met' if ratio >= 1.5 else 'not met'}"
            if name == "map LLaVA-1.5"
            else ""
        )
        print(
            f"shards / {name + ':':<17} {ratio:.2f}x samples/s ({shard['steady'] / base['steady']:.2f}x steady) "
            f"at {args.workers} workers -- {why}{target}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
