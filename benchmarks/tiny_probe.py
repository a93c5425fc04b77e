"""What limits the tiny model: can its image tokens be read, and at what scale do they enter the LM?

Loads the tiny pipeline's finetuned weights (``python -m lmm tiny`` writes them), renders fresh
shapes-world images and reports

* linear-probe accuracy of shape and colour per grid cell, read from the tower's tokens and
  from the connector's output (a softmax regression trained on 2000 images, scored on 1000);
* the mean L2 norm of the image embeddings the connector writes and of the LM's token
  embeddings (the two kinds of vectors the LM's first layer adds to);
* with ``--captions N``: how well the model writes the captions of N fresh images (the
  stage-1 task, ``plain`` template): next-token accuracy and loss per word class (shape,
  colour and position words, and the rest), i.e. what stage 1 has learned to see;
* with ``--supervised-steps N``: how fast a fresh random-init tower of the same architecture
  learns the cells' shapes when trained on them directly (a linear head per cell, AdamW,
  batches of 32 fresh images), i.e. what the tower could learn without the LM in between.

The tower's tokens are read per cell: a cell's patch tokens side by side, as the tiny
configs' ``pixel_shuffle`` connector joins them.

    python benchmarks/tiny_probe.py [--weights artifacts/tiny/finetune.safetensors] [--supervised-steps 250]
    python benchmarks/tiny_probe.py --weights artifacts/tiny/pretrain.safetensors --captions 512
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
import yaml


def probe(
    features: torch.Tensor, labels: torch.Tensor, n_train: int, steps: int = 300
) -> tuple[float, list[float]]:
    """Accuracy on occupied cells (label > 0) of a softmax regression fitted on the first
    ``n_train`` rows, overall and per class (classes 1..max)."""
    mu, sd = features[:n_train].mean(0), features[:n_train].std(0) + 1e-5
    z = (features - mu) / sd
    w = torch.zeros(z.shape[1], int(labels.max()) + 1, requires_grad=True)
    b = torch.zeros(int(labels.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(z[:n_train] @ w + b, labels[:n_train]).backward()
        opt.step()
    with torch.no_grad():
        pred = (z[n_train:] @ w + b).argmax(1)
    truth = labels[n_train:]
    occupied = truth > 0
    per_class = [
        (pred[truth == c] == c).float().mean().item() for c in range(1, int(labels.max()) + 1)
    ]
    return (pred[occupied] == truth[occupied]).float().mean().item(), per_class


def per_cell(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, side*side, D] patch tokens -> [B, grid*grid, (side/grid)^2 * D]: each cell's patch
    tokens side by side (row-major), as the pixel_shuffle connector joins them."""
    from lmm.model.connectors.pixel_shuffle import space_to_depth

    return space_to_depth(tokens, math.isqrt(tokens.shape[1]) // grid)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default="artifacts/tiny/finetune.safetensors")
    parser.add_argument(
        "--models", default="artifacts/tiny/models", help="the tiny models' directory"
    )
    parser.add_argument(
        "--connector",
        default="pixel_shuffle",
        type=yaml.safe_load,
        help="the connector the weights were trained with: a name or a mapping such as "
        "'{name: pixel_shuffle, factor: 1}'",
    )
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument(
        "--caption-style", default=None, help="captions for --captions (default: the tiny world's)"
    )
    parser.add_argument(
        "--captions", type=int, default=0, help="also score the captions of this many fresh images"
    )
    parser.add_argument(
        "--supervised-steps",
        type=int,
        default=0,
        help="also train a fresh tower on the cells' shapes for this many steps",
    )
    args = parser.parse_args()

    from lmm.checkpoints.weights import load_weights
    from lmm.data.image import ImageTransform
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM
    from lmm.model.towers import VisionConfig
    from lmm.worlds.shapes.scene import image_rng, make_image
    from lmm.worlds.shapes.tiny import TINY_WORLD

    torch.manual_seed(0)
    model = LMM(
        VisionConfig(kind="hf", name_or_path=f"{args.models}/vision", feature_layer=-1),
        LanguageConfig(name_or_path=f"{args.models}/llm"),
        args.connector,
    )
    load_weights(model, args.weights)
    model.eval()
    world, transform = TINY_WORLD, ImageTransform(model.vision.image_spec)
    pixels, shapes, colors = [], [], []
    for i in range(args.images):  # a split name of its own: images no stage trained on
        img, objects = make_image(world, image_rng(world, "probe", i))
        pixels.append(transform(img))
        shape, color = [0] * 9, [0] * 9  # 0 = empty cell
        for o in objects:
            shape[o.cell], color[o.cell] = (
                1 + world.shapes.index(o.shape),
                1 + world.colors.index(o.color),
            )
        shapes.append(shape)
        colors.append(color)
    x = torch.stack(pixels)
    labels = {"shape": torch.tensor(shapes).flatten(), "colour": torch.tensor(colors).flatten()}
    with torch.no_grad():
        tower = torch.cat([model.vision(x[i : i + 500]) for i in range(0, len(x), 500)])
        image_embeds = torch.cat(
            [model.connector(tower[i : i + 500]) for i in range(0, len(x), 500)]
        )
        token_embeds = model.llm.get_input_embeddings().weight[: len(model.tokenizer)]
    n_train = int(len(x) * 2 / 3) * 9
    print(
        f"{'features':<12}{'shape acc':>10}{'colour acc':>12}   "
        f"(linear probe, occupied cells, {len(x) // 3} held-out images)"
    )
    for name, feats in (("tower", per_cell(tower, world.grid)), ("connector", image_embeds)):
        flat = feats.reshape(-1, feats.shape[-1])
        with torch.enable_grad():
            (shape_acc, per_shape), (colour_acc, _) = (
                probe(flat, labels[k], n_train) for k in ("shape", "colour")
            )
        print(
            f"{name:<12}{shape_acc:>10.3f}{colour_acc:>12.3f}   per shape: "
            + ", ".join(f"{kind} {acc:.3f}" for kind, acc in zip(world.shapes, per_shape))
        )
    img_norm, tok_norm = (
        image_embeds.norm(dim=-1).mean().item(),
        token_embeds.norm(dim=-1).mean().item(),
    )
    print(
        f"mean L2 norm: image embeddings {img_norm:.2f}, token embeddings {tok_norm:.3f}, "
        f"ratio {img_norm / tok_norm:.1f}x"
    )
    if args.captions:
        style = args.caption_style or world.caption_style
        caption_words(model, replace(world, caption_style=style), args.captions)
    if args.supervised_steps:
        supervised(
            f"{args.models}/vision",
            x,
            labels["shape"],
            n_train // 9,
            args.supervised_steps,
            world.grid,
        )


def caption_words(model, world, n_images: int, batch: int = 64) -> None:
    """Next-token accuracy and mean loss of the captions of ``n_images`` fresh images, per word class."""
    from lmm.data.encode import Processor, SampleEncoder
    from lmm.data.packing import pack
    from lmm.data.templates import get_template
    from lmm.model.loss import capped_logits, next_token_targets
    from lmm.worlds.shapes.config import POSITIONS_3X3
    from lmm.worlds.shapes.scene import image_rng, make_image
    from lmm.worlds.shapes.text import make_caption

    tok = model.tokenizer
    processor = Processor(
        tok,
        model.vision.image_spec,
        model.num_image_tokens,
        model.image_token_id,
        model.image_layout,
    )
    # The tiny pretraining recipe's data settings (configs/tiny/pretrain.yaml).
    encoder = SampleEncoder(
        processor,
        get_template("plain_eos"),
        256,
        image_placement="as_written",
        tokenization="single_pass",
    )
    samples = []
    for i in range(n_images):
        rng = image_rng(world, "probe_captions", i)
        img, objects = make_image(world, rng)
        conversation = [
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": make_caption(world, objects, rng)},
        ]
        samples.append(encoder.encode_train({"id": str(i), "conversations": conversation}, [img]))
    classes = {
        **{w: "shape" for w in world.shapes},
        **{w: "colour" for w in world.colors},
        **{w: "position" for p in POSITIONS_3X3 for w in p.split()},
    }
    scores: dict[str, list[tuple[float, bool]]] = {
        "shape": [],
        "colour": [],
        "position": [],
        "other": [],
    }
    with torch.no_grad():
        for start in range(0, n_images, batch):
            b = pack(samples[start : start + batch], tok.pad_token_id, budget=256)
            hidden = model.hidden_states(
                b["input_ids"], b["attention_mask"], b["pixel_values"], b["position_ids"]
            )
            targets, keep = next_token_targets(b["labels"])
            logits = capped_logits(hidden[:, :-1][keep], model.llm.get_output_embeddings())
            losses = F.cross_entropy(logits, targets[keep], reduction="none")
            for t, loss, hit in zip(
                targets[keep].tolist(),
                losses.tolist(),
                (logits.argmax(-1) == targets[keep]).tolist(),
            ):
                word = tok.decode([t]).strip()
                scores[classes.get(word, "other")].append((loss, hit))
    print(
        f"captions of {n_images} fresh images ({world.caption_style!r} style), "
        "next-token accuracy / mean loss per word class:"
    )
    for name, rows in scores.items():
        if rows:
            print(
                f"  {name:<9}{sum(h for _, h in rows) / len(rows):>7.3f} / "
                f"{sum(loss for loss, _ in rows) / len(rows):.3f}"
                f"   ({len(rows)} tokens)"
            )


def supervised(
    vision_dir: str,
    x: torch.Tensor,
    shapes: torch.Tensor,
    n_train: int,
    steps: int,
    grid: int,
    batch: int = 32,
) -> None:
    """Train a fresh tower (config of ``vision_dir``, random init) + a linear head on the cell
    shapes of the first ``n_train`` images; print held-out accuracy on occupied cells."""
    from transformers import AutoConfig, SiglipVisionModel

    torch.manual_seed(0)
    tower = SiglipVisionModel(AutoConfig.from_pretrained(vision_dir))
    labels = shapes.view(len(x), -1)
    patches_per_cell = (tower.config.image_size // tower.config.patch_size // grid) ** 2
    head = torch.nn.Linear(patches_per_cell * tower.config.hidden_size, int(shapes.max()) + 1)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=6e-4)
    held_x, held_y = x[n_train:], labels[n_train:]
    for step in range(1, steps + 1):
        i = torch.randint(0, n_train, (batch,))
        logits = head(per_cell(tower(pixel_values=x[i]).last_hidden_state, grid))
        loss = F.cross_entropy(logits.flatten(0, 1), labels[i].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                pred = head(per_cell(tower(pixel_values=held_x).last_hidden_state, grid)).argmax(-1)
            occupied = held_y > 0
            acc = (pred[occupied] == held_y[occupied]).float().mean().item()
            print(
                f"supervised fresh tower: step {step:>4} (x{batch} images)  held-out shape acc {acc:.3f}"
            )


if __name__ == "__main__":
    main()
