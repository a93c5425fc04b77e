"""Every YAML recipe in ``configs/`` instantiates and trains one step, and exactly the
parameters its stage means to train receive gradients.

Hub names in the recipes are swapped for tiny random-init stand-ins of the same transformers
classes (``lmm.standins``), data paths for the tiny shapes world, output paths for a temp dir
and the trainer for one CPU (``RecipeCLI.rewrite``, applied to the parsed config right where
``{variant}`` is filled in). Stages run in recipe order, so each stage's ``init_from`` is the
file the previous stage's ``save_weights`` wrote. The stand-in towers are deepened to 14 layers:
the TinyLLaVA paper's share variant tunes the tower from block 12, so blocks 0-11 and 12 must
exist to tell "frozen" from "trains" at the recipe's own layer index (``feature_layer: -2``
keeps 13 blocks).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from lmm.errors import ConfigError
from lmm.train.cli import LMMCLI, accumulation_steps

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOWER_LAYERS = 14

# Every hub checkpoint a recipe names -> the stand-in of the same class that replaces it.
HUB_STANDINS = {
    "openai/clip-vit-large-patch14-336": ("tower", "clip"),  # CLIPModel
    "lmsys/vicuna-7b-v1.3": ("llm", "llama"),  # LlamaForCausalLM (LLaVA v1)
    "google/siglip-so400m-patch14-384": ("tower", "siglip"),  # SiglipModel
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ("llm", "llama"),  # LlamaForCausalLM
    "stabilityai/stablelm-2-zephyr-1_6b": ("llm", "stablelm"),  # StableLmForCausalLM
    "microsoft/phi-2": ("llm", "phi"),  # PhiForCausalLM
    "Qwen/Qwen2-0.5B-Instruct": ("llm", "qwen2"),  # Qwen2ForCausalLM
    "openai/clip-vit-large-patch14": ("tower", "clip"),  # CLIPModel (MoF's CLIP, LLaVA v1)
    "facebook/dinov2-large": ("tower", "dinov2"),  # Dinov2Model + BitImageProcessor
    "meta-llama/Llama-2-7b-hf": ("llm", "llama"),  # LlamaForCausalLM (Prismatic's LLaMa-2)
    "lmsys/vicuna-7b-v1.5": ("llm", "llama"),  # LlamaForCausalLM (Prismatic's Vicuna, LLaVA-1.5)
    # timm towers (Prismatic's DINO-SigLIP): the same timm architectures, shrunk.
    "vit_large_patch14_reg4_dinov2.lvd142m": ("timm", "timm_dinov2_reg4"),
    "vit_so400m_patch14_siglip_384": ("timm", "timm_siglip"),
}


@dataclass(frozen=True)
class Intent:
    """What a stage trains: ``vision`` True (all), False (nothing) or k (blocks k and later)."""

    vision: Union[bool, int]
    connector: bool
    llm: bool


# Every stage file, with what it is meant to train (a new recipe must be added here).
STAGES = {
    "tiny/pretrain.yaml": Intent(vision=True, connector=True, llm=True),
    "tiny/finetune.yaml": Intent(vision=True, connector=True, llm=True),
    "tinyllava/base/pretrain.yaml": Intent(vision=False, connector=True, llm=False),
    "tinyllava/base/finetune.yaml": Intent(vision=False, connector=True, llm=True),
    "tinyllava/share/pretrain.yaml": Intent(vision=False, connector=True, llm=True),
    "tinyllava/share/finetune.yaml": Intent(vision=False, connector=True, llm=True),
    "onevision/pretrain.yaml": Intent(vision=False, connector=True, llm=False),
    "onevision/finetune.yaml": Intent(vision=True, connector=True, llm=True),
    "tiny_ov/finetune.yaml": Intent(vision=True, connector=True, llm=True),
    "prismatic/prism-dinosiglip-7b.yaml": Intent(vision=False, connector=True, llm=True),
    "prismatic/dinosiglip-384px-letterbox-7b.yaml": Intent(vision=False, connector=True, llm=True),
    "llava/v1/pretrain.yaml": Intent(vision=False, connector=True, llm=False),
    "llava/v1/finetune.yaml": Intent(vision=False, connector=True, llm=True),
    "llava/v1_5/pretrain.yaml": Intent(vision=False, connector=True, llm=False),
    "llava/v1_5/finetune.yaml": Intent(vision=False, connector=True, llm=True),
}
# Stage files in run order per recipe family; TinyLLaVA's run once per pair file in models/.
CHAINS = {
    "tiny": ["tiny/pretrain.yaml", "tiny/finetune.yaml"],
    "tinyllava": ["tinyllava/base/pretrain.yaml", "tinyllava/base/finetune.yaml",
                  "tinyllava/share/pretrain.yaml", "tinyllava/share/finetune.yaml"],
    "onevision": ["onevision/pretrain.yaml", "onevision/finetune.yaml"],
    # tiny_ov starts from the tiny pipeline's checkpoint directory (artifacts/tiny/finetune).
    "tiny_ov": ["tiny/pretrain.yaml", "tiny/finetune.yaml", "tiny_ov/finetune.yaml"],
    # Two single-stage recipes (no init_from), run one after the other.
    "prismatic": ["prismatic/prism-dinosiglip-7b.yaml", "prismatic/dinosiglip-384px-letterbox-7b.yaml"],
    "llava_v1": ["llava/v1/pretrain.yaml", "llava/v1/finetune.yaml"],
    "llava_v1_5": ["llava/v1_5/pretrain.yaml", "llava/v1_5/finetune.yaml"],
}  # fmt: skip
PAIRS = sorted(p.name for p in (CONFIGS / "tinyllava" / "models").glob("*.yaml"))
CASES = [
    ("tiny", None),
    *[("tinyllava", p) for p in PAIRS],
    ("onevision", None),
    ("tiny_ov", None),
    ("prismatic", None),
    ("llava_v1", None),
    ("llava_v1_5", None),
]
# The TinyLLaVA paper's share pretraining (share/pretrain.yaml's header): the Factory's stage with
# the tower tuned from block 12. Run for one pair: extra arguments per stage, and what it trains.
PAPER_SHARE = ["--model.freeze.vision", "partial", "--model.freeze.vision_from_layer", "12",
               "--model.optim.lr_vision", "2e-5"]  # fmt: skip


# Add-on trainer files (strategy, precision, fault tolerance): combined with any stage.
TRAINER_FILES = sorted(p.name for p in (CONFIGS / "trainer").glob("*.yaml"))


def test_every_config_file_is_covered():
    files = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    pair_files = {f"tinyllava/models/{p}" for p in PAIRS}
    trainer_files = {f"trainer/{p}" for p in TRAINER_FILES}
    assert set(STAGES) | pair_files | trainer_files == files, (
        "add new configs to STAGES / CHAINS in this test"
    )
    assert {s for chain in CHAINS.values() for s in chain} == set(STAGES)
    # {CLIP, SigLIP} x {TinyLlama, StableLM-2, Phi-2}, plus DINOv2 and MoF (CLIP+DINOv2) with TinyLlama
    assert len(PAIRS) == 8


@pytest.mark.parametrize("name", TRAINER_FILES)
def test_trainer_files_combine_with_a_recipe(name, capsys):
    """Each add-on parses on top of a TinyLLaVA stage + pair, and its settings win."""
    from lmm.train.cli import LMMCLI

    args = [
        "-c",
        str(CONFIGS / "tinyllava/base/finetune.yaml"),
        "-c",
        str(CONFIGS / "tinyllava/models" / PAIRS[0]),
        "-c",
        str(CONFIGS / "trainer" / name),
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exit_info:
        LMMCLI(args=args, run=False)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    wanted = yaml.safe_load((CONFIGS / "trainer" / name).read_text())["trainer"]
    for key, value in wanted.items():
        if key == "strategy":
            assert printed["strategy"]["class_path"] == value["class_path"]
        elif key == "callbacks":
            assert [c["class_path"] for c in printed["callbacks"]][-len(value) :] == [
                c["class_path"] for c in value
            ]
        else:
            assert printed[key] == value, key


# -- stand-ins -----------------------------------------------------------------------------------


def _deep_tower(kind: str, root: Path) -> str:
    """The ``lmm.standins`` tower of ``kind``, re-initialised with TOWER_LAYERS layers (same
    class, processor and sizes otherwise)."""
    from transformers import AutoConfig, AutoModel

    from lmm.standins.vision import build_tower

    dst = root / f"{kind}-{TOWER_LAYERS}"
    if dst.exists():  # two hub names with the same stand-in class share it
        return str(dst)
    src = Path(build_tower(kind, root / "shallow").name_or_path)
    shutil.copytree(src, dst)
    cfg = AutoConfig.from_pretrained(dst)
    getattr(cfg, "vision_config", cfg).num_hidden_layers = TOWER_LAYERS  # DINOv2: no text side
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModel.from_config(cfg).save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def standins(tmp_path_factory, tiny_models) -> dict[str, str]:
    """Recipe model name -> local stand-in directory (built once for every case)."""
    from lmm.standins.llm import build_llm
    from lmm.standins.vision import build_tower

    root = tmp_path_factory.mktemp("recipe_standins")
    out = {
        "artifacts/tiny/models/vision": str(tiny_models["vision"]),
        "artifacts/tiny/models/llm": str(tiny_models["llm"]),
        # The tiny pipeline's checkpoint directory holds the same architectures.
        "artifacts/tiny/finetune/vision": str(tiny_models["vision"]),
        "artifacts/tiny/finetune/llm": str(tiny_models["llm"]),
    }
    built: dict[tuple[str, str], str] = {}  # one stand-in per (what, kind), shared by hub names
    for hub, (what, kind) in HUB_STANDINS.items():
        if (what, kind) in built:
            pass
        elif what == "tower":
            built[what, kind] = _deep_tower(kind, root)
        elif what == "timm":  # recipes that freeze the tower: the stand-in's 3 layers do
            built[what, kind] = build_tower(kind, root / "timm").name_or_path
        else:
            built[what, kind] = str(build_llm(kind, root / kind))
        out[hub] = built[what, kind]
    return out


# -- the CLI with a rewritten config -------------------------------------------------------------


class RecipeCLI(LMMCLI):
    """LMMCLI that hands the parsed (and ``{variant}``-filled) config to ``rewrite`` before
    anything is built."""

    rewrite: Optional[Callable] = None

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        type(self).rewrite(self._stage_config())


def _walk_strings(node, fn):
    """Apply ``fn`` to every string in a parsed config (namespaces, dicts, lists), in place."""
    from jsonargparse import Namespace

    if isinstance(node, str):
        return fn(node)
    if isinstance(node, list):
        node[:] = [_walk_strings(v, fn) for v in node]
    elif isinstance(node, dict):
        for k in list(node):
            node[k] = _walk_strings(node[k], fn)
    elif isinstance(node, Namespace):
        for k, v in list(vars(node).items()):
            setattr(node, k, _walk_strings(v, fn))
    return node


def _patterns(item) -> list[str]:
    """Shard patterns of one ``data.train`` entry (a pattern or a weighted set)."""
    if isinstance(item, str):
        return [item]
    shards = item["shards"] if isinstance(item, dict) else item.shards
    return [shards] if isinstance(shards, str) else list(shards)


def make_rewrite(standins: dict[str, str], world: Path, out: Path, seen: dict) -> Callable:
    def rewrite(cfg) -> None:
        m, d, t = cfg.model, cfg.data, cfg.trainer
        towers = list(m.vision.fused.towers) if m.vision.kind == "fused" else [m.vision]
        for part in (*towers, m.llm):
            assert part.name_or_path in standins, (
                f"no stand-in for {part.name_or_path!r}: add it to HUB_STANDINS"
            )
            part.name_or_path = standins[part.name_or_path]
        for tower in towers:  # every stand-in takes its own (tiny) input size
            tower.image_size = None
        # Shards: where the converters write them (data/...) or the tiny world (artifacts/tiny/data).
        for pattern in (p for item in d.train for p in _patterns(item)):
            assert pattern.startswith(
                ("data/", "artifacts/tiny/data/", "artifacts/tiny_ov/data/")
            ), pattern
        d.train = [f"{world}/{'pretrain' if d.template == 'plain' else 'finetune'}/shard-*.tar"]
        _walk_strings(cfg, lambda s: s.replace("artifacts/tiny/data/", f"{world}/", 1))
        _walk_strings(cfg, lambda s: str(out / s) if s.startswith("artifacts/") else s)
        seen["global_batch_size"] = cfg.get("global_batch_size")
        if cfg.get("global_batch_size") is not None:
            cfg.global_batch_size = 4  # two micro-batches of 2 per step: accumulation is exercised
        d.batch_size, d.num_workers = 2, 0
        t.accelerator = (
            "cpu"  # devices (auto -> 1), num_nodes and precision (bf16-mixed) as written
        )
        # LightningCLI's config.yaml goes to the logger's dir, else here (never the cwd = the repo).
        t.default_root_dir = str(out)
        t.max_steps, t.limit_val_batches, t.num_sanity_val_steps = 1, 0, 0
        t.enable_progress_bar, t.log_every_n_steps = False, 1

    return rewrite


class GradRecorder(Callback):
    """Names of the parameters holding a gradient when the (first) optimizer step happens."""

    def __init__(self) -> None:
        self.with_grad: Optional[set[str]] = None
        self.nonzero: set[str] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.with_grad is None:
            named = list(pl_module.model.named_parameters())
            self.with_grad = {n for n, p in named if p.grad is not None}
            self.nonzero = {
                n for n, p in named if p.grad is not None and bool(p.grad.abs().sum() > 0)
            }


def _intended(model, intent: Intent) -> set[str]:
    names: set[str] = set()
    for comp, module in model.components().items():
        want = getattr(intent, comp)
        if want is True:
            names |= {f"{comp}.{n}" for n, _ in module.named_parameters()}
        elif want is not False:
            tuned = set()
            for tower in model.vision.sub_towers():  # a fused tower's towers: each from block k
                blocks = tower.blocks()
                assert len(blocks) > want, (
                    f"stand-in tower has {len(blocks)} blocks; the recipe tunes from block {want}"
                )
                tuned |= {id(p) for b in list(blocks)[want:] for p in b.parameters()}
            names |= {f"vision.{n}" for n, p in module.named_parameters() if id(p) in tuned}
    return names


def _run_stage(stage, pair, standins, world, tmp_path, extra=(), intent=None):
    """Train ``stage`` (+ ``pair``, + ``extra`` arguments) one step; check what got gradients."""
    seen: dict = {}
    RecipeCLI.rewrite = staticmethod(make_rewrite(standins, world, tmp_path, seen))
    args = ["--config", str(CONFIGS / stage)]
    if pair:
        args += ["--config", str(CONFIGS / "tinyllava" / "models" / pair)]
    cli = RecipeCLI(args=[*args, *extra], run=False)
    recorder = GradRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 1, stage
    if seen["global_batch_size"] is not None:
        assert cli.trainer.accumulate_grad_batches == 2, stage  # 4 / (1 device x batch 2)
    model = cli.model.model
    intent = intent or STAGES[stage]
    expected = _intended(model, intent)
    assert recorder.with_grad == expected, (stage, sorted(recorder.with_grad ^ expected)[:5])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected, stage
    # Gradients really flow into every trained component (not just zero tensors).
    for comp in ("vision", "connector", "llm"):
        if getattr(intent, comp) is not False:
            assert any(n.startswith(comp + ".") for n in recorder.nonzero), (stage, comp)
    # The stage's output exists for the next stage's init_from.
    assert Path(cli.model.save_weights_path).is_file(), stage


@pytest.mark.parametrize("family,pair", CASES, ids=[f"{f}-{p or ''}".rstrip("-") for f, p in CASES])
def test_recipe_trains_what_each_stage_intends(family, pair, standins, tiny_world, tmp_path):
    world, _ = tiny_world
    for stage in CHAINS[family]:
        _run_stage(stage, pair, standins, world, tmp_path)


def test_the_papers_share_variant_tunes_the_tower_from_block_12(standins, tiny_world, tmp_path):
    world, _ = tiny_world
    pair = "SigLIP-Phi-2.yaml"
    _run_stage("tinyllava/base/pretrain.yaml", pair, standins, world, tmp_path)
    paper = Intent(vision=12, connector=True, llm=True)
    _run_stage("tinyllava/share/pretrain.yaml", pair, standins, world, tmp_path, PAPER_SHARE, paper)
    header = (CONFIGS / "tinyllava/share/pretrain.yaml").read_text()
    assert " ".join(PAPER_SHARE) in header


# -- the global batch --------------------------------------------------------------------------


def test_accumulation_from_the_global_batch():
    assert accumulation_steps(256, devices=8, num_nodes=1, batch_size=32) == 1
    assert (
        accumulation_steps(256, devices=4, num_nodes=1, batch_size=32) == 2
    )  # TinyLLaVA's pretrain
    assert (
        accumulation_steps(128, devices=4, num_nodes=1, batch_size=8) == 4
    )  # TinyLLaVA's finetune
    assert accumulation_steps(256, devices=8, num_nodes=2, batch_size=8) == 2
    with pytest.raises(ConfigError) as err:
        accumulation_steps(256, devices=3, num_nodes=1, batch_size=32)
    assert "global_batch_size=256 is not a positive multiple of devices (3) x num_nodes (1) x " \
           "data.batch_size (32) = 96" in str(err.value)  # fmt: skip
    with pytest.raises(ConfigError):
        accumulation_steps(16, devices=1, num_nodes=1, batch_size=32)


def _cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        LMMCLI(args=args, run=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_global_batch_errors_name_the_fields(tiny_models, tmp_path, capsys):
    common = [
        "--model.vision.name_or_path", str(tiny_models["vision"]), "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]), "--trainer.logger", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    err = _cli_error(common + ["--global_batch_size", "10", "--data.batch_size", "4"], capsys)
    assert "error: global_batch_size=10 is not a positive multiple of devices (1) x num_nodes (1) x " \
           "data.batch_size (4)" in err  # fmt: skip
    err = _cli_error(common + ["--global_batch_size", "8", "--data.batch_size", "4",
                               "--trainer.accumulate_grad_batches", "3"], capsys)  # fmt: skip
    assert (
        "trainer.accumulate_grad_batches=3 contradicts global_batch_size=8 (which needs 2)" in err
    )
    cli = LMMCLI(args=common + ["--global_batch_size", "12", "--data.batch_size", "4"], run=False)
    assert cli.trainer.accumulate_grad_batches == 3


def test_stage_file_without_a_pair_says_what_is_missing(capsys):
    err = _cli_error(["--config", str(CONFIGS / "tinyllava" / "base" / "pretrain.yaml")], capsys)
    assert "uses {variant} but no variant is set" in err and "configs/tinyllava/models/" in err


# -- the recipes' numbers ------------------------------------------------------------------------


def _load(*names: str) -> dict:
    merged: dict = {}
    for name in names:
        _merge(merged, yaml.safe_load((CONFIGS / name).read_text()))
    return merged


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


# The reference scripts' numbers, written out: TinyLLaVA/TinyLLaVA_Factory@53f12c78
# scripts/train/{pretrain,finetune}.sh and share/{pretrain,finetune}_share.sh (4 GPUs, per-device
# batch x accumulation), MODEL_MAX_LENGTH 2048 (train_*.sh) / 3072 (share/train_phi_share.sh).
@pytest.mark.parametrize(
    "stage,lr,batch,freeze,max_length",
    [
        ("base/pretrain.yaml", {"lr_connector": 1e-3}, 4 * 32 * 2,
         {"vision": "frozen", "connector": "full", "llm": "frozen"}, 2048),
        ("base/finetune.yaml", {"lr_connector": 2e-5, "lr_llm": 2e-5}, 4 * 8 * 4,
         {"vision": "frozen", "connector": "full", "llm": "full"}, 2048),
        ("share/pretrain.yaml", {"lr_connector": 2e-5, "lr_llm": 2e-5}, 4 * 8 * 8,
         {"vision": "frozen", "connector": "full", "llm": "full"}, 3072),
        ("share/finetune.yaml", {"lr_connector": 2e-5, "lr_llm": 2e-5}, 4 * 8 * 4,
         {"vision": "frozen", "connector": "full", "llm": "full"}, 3072),
    ],
)  # fmt: skip
def test_tinyllava_hyperparameters(stage, lr, batch, freeze, max_length):
    """The Factory scripts' numbers, one epoch, cosine to zero after 3% warmup, square images."""
    cfg = _load(f"tinyllava/{stage}")
    assert cfg["global_batch_size"] == batch and cfg["trainer"]["max_epochs"] == 1
    assert {k: cfg["model"]["optim"][k] for k in lr} == lr
    assert (
        cfg["model"]["optim"]["warmup_ratio"] == 0.03
        and cfg["model"]["optim"]["min_lr_ratio"] == 0.0
    )
    assert cfg["model"]["freeze"] == freeze
    assert cfg["model"]["vision"] == {"image_preprocess": "square"}  # --image_aspect_ratio square
    assert cfg["data"]["max_length"] == max_length
    assert cfg["data"]["template"] == ("plain" if "pretrain" in stage else "vicuna")
    assert cfg["data"].get("group_by_length", False) == ("finetune" in stage)
    assert "gradient_clip_val" not in cfg["trainer"]  # zero3.json: no gradient_clipping
    recipe = stage.split("/")[0]
    for pair in PAIRS:
        variant = _load(f"tinyllava/models/{pair}")["variant"]
        assert pair == f"{variant}.yaml"
        assert (
            f"TinyLLaVA-{recipe}-{{variant}}/" in cfg["model"]["save_weights"]
        )  # TinyLLaVA-{recipe}-{vision}-{LLM}


def test_tinyllava_pairs_drop_the_first_token_as_the_factory():
    """TinyLLaVA_Factory's VisionTower.forward drops token 0 for every tower ("patch"): 728
    SigLIP tokens; CLIP's and DINOv2's first token is their CLS, which ``auto`` drops too."""
    for pair in PAIRS:
        vision = _load(f"tinyllava/models/{pair}")["model"]["vision"]
        for tower in vision["fused"]["towers"] if vision["kind"] == "fused" else [vision]:
            assert tower["feature_layer"] == -2
            siglip = "siglip" in tower["name_or_path"]
            assert tower["select"] == ("patch" if siglip else "auto"), pair


# haotian-liu/LLaVA@c121f043: scripts/pretrain.sh + finetune_full_schedule.sh (LLaVA v1) and
# scripts/v1_5/{pretrain,finetune}.sh (LLaVA-1.5); 8 GPUs x per-device batch (README).
@pytest.mark.parametrize(
    "stage,tower,llm,connector,lr,batch,epochs,freeze,preprocess,template,grouped",
    [
        ("v1/pretrain.yaml", "openai/clip-vit-large-patch14", "lmsys/vicuna-7b-v1.3", "linear",
         {"lr_connector": 2e-3}, 8 * 16, 1, ("frozen", "full", "frozen"), "square", "plain", False),
        ("v1/finetune.yaml", "openai/clip-vit-large-patch14", "lmsys/vicuna-7b-v1.3", "linear",
         {"lr_connector": 2e-5, "lr_llm": 2e-5}, 8 * 16, 3, ("frozen", "full", "full"), "square", "vicuna", False),
        ("v1_5/pretrain.yaml", "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", "mlp2x_gelu",
         {"lr_connector": 1e-3}, 8 * 32, 1, ("frozen", "full", "frozen"), "square", "plain", False),
        ("v1_5/finetune.yaml", "openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", "mlp2x_gelu",
         {"lr_connector": 2e-5, "lr_llm": 2e-5}, 8 * 16, 1, ("frozen", "full", "full"), "pad", "vicuna", True),
    ],
)  # fmt: skip
def test_llava_hyperparameters(
    stage, tower, llm, connector, lr, batch, epochs, freeze, preprocess, template, grouped
):
    cfg = _load(f"llava/{stage}")
    m, d = cfg["model"], cfg["data"]
    assert m["vision"] == {"kind": "hf", "name_or_path": tower, "feature_layer": -2, "select": "patch",
                           "image_preprocess": preprocess}  # fmt: skip
    assert m["llm"]["name_or_path"] == llm and m["connector"] == connector
    assert cfg["global_batch_size"] == batch and cfg["trainer"]["max_epochs"] == epochs
    assert {k: m["optim"][k] for k in lr} == lr and set(lr) <= set(m["optim"])
    assert (m["optim"]["weight_decay"], m["optim"]["warmup_ratio"], m["optim"]["min_lr_ratio"]) == (
        0,
        0.03,
        0,
    )
    assert (m["freeze"]["vision"], m["freeze"]["connector"], m["freeze"]["llm"]) == freeze
    assert d["template"] == template and d["max_length"] == 2048
    assert d.get("group_by_length", False) == grouped
    assert cfg["trainer"]["precision"] == "bf16-mixed" and "gradient_clip_val" not in cfg["trainer"]


def test_onevision_settings():
    """LLaVA-VL/LLaVA-NeXT@df179663 scripts/train/pretrain_siglip.sh and finetune_si.sh."""
    pre, fin = _load("onevision/pretrain.yaml"), _load("onevision/finetune.yaml")
    assert (
        pre["model"]["vision"]["image_preprocess"] == "square"
        and "anyres" not in pre["model"]["vision"]
    )
    assert pre["model"]["optim"]["lr_connector"] == 1e-3 and pre["data"]["template"] == "plain"
    v = fin["model"]["vision"]
    assert v["image_preprocess"] == "resize"  # the base view: image.resize((384, 384))
    assert v["anyres"] == {
        "max_grid": 6,
        "max_tiles": 9,
        "shrink_tolerance": 1.1,
    }  # black crops, padded multi
    assert v["video"] == {"max_frames": 32, "pool": 2}
    assert (fin["model"]["optim"]["lr_vision"], fin["model"]["optim"]["lr_llm"]) == (2e-6, 1e-5)
    assert (
        fin["data"]["image_placement"] == "llava_next" and fin["global_batch_size"] == 128 * 1 * 2
    )
    for cfg in (pre, fin):  # scripts/zero3.json: "gradient_clipping": "auto" -> max_grad_norm 1.0
        assert cfg["trainer"]["gradient_clip_val"] == 1.0
        assert (
            cfg["model"]["vision"]["feature_layer"] == -2 and "select" not in cfg["model"]["vision"]
        )


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_vicuna_is_tinyllavas_phi_template_for_phi_and_stablelm(family, standins):
    """The finetune stages use ``vicuna`` for every LLM: for Phi-2 and StableLM-2 it renders
    exactly TinyLLaVA's ``phi`` template (answers end with their eos ``<|endoftext|>``)."""
    from lmm.data.templates import get_template, parse_conversation
    from lmm.model.language import LanguageConfig, load_tokenizer

    hub = next(h for h, (what, kind) in HUB_STANDINS.items() if kind == family)
    tok = load_tokenizer(LanguageConfig(name_or_path=standins[hub]))
    turns = parse_conversation([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
                                {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Black."}])  # fmt: skip
    assert tok.eos_token == "<|endoftext|>"
    vicuna = get_template("vicuna").render(turns, tok.eos_token)
    assert vicuna == get_template("phi").render(turns, tok.eos_token)
    assert vicuna[0].count("<|endoftext|>") == 2
