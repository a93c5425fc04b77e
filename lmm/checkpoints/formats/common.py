"""What every import format shares: reading a released model's files (raw JSON, safetensors or
``.bin`` shards loaded without unpickling code), the parts a reader returns, and writing them
as an ordinary lmm checkpoint directory.

A reader turns SRC into an :class:`ImportedModel`: the tower and the LM as a transformers
config plus a state dict in that class's own key names, the connector as lmm's connector
state, the tokenizer, and how the model is asked (template, prompt conventions). Nothing a
source repository ships as code is ever run: configs are read as data, weights as tensors.
:func:`write_checkpoint` then writes ``vision/`` (the whole tower; lmm.json names the feature
layer) and ``llm/`` exactly as given, builds the lmm model from them, loads the connector and
writes the directory with :func:`lmm.checkpoints.directory.save_checkpoint_dir`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from lmm.checkpoints.hf_files import state_mismatch, write_safetensors
from lmm.constants import IMAGE_TOKEN
from lmm.data.prompts import PromptConventions
from lmm.errors import ImportFormatError
from lmm.model.lmm import GenerationConfig
from lmm.model.towers import VisionConfig

# Written by ``lmm export`` beside the Hugging Face files: the lmm checkpoint's template,
# prompt conventions and image handling, so importing an export gives the checkpoint back.
PROMPTING_FILE = "lmm_prompting.json"
# The LM family (text model_type) -> the template its LLaVA-style releases are asked with.
# Llama/Mistral: LLaVA-1.5's vicuna_v1; Qwen2: OneVision's qwen_1_5 (ChatML).
_HF_TEMPLATES = {"llama": "vicuna", "mistral": "vicuna", "qwen2": "chatml"}


@dataclass
class ImportOptions:
    """What ``lmm import`` lets the user set over what SRC's files say.

    Args:
        vision_tower: Folder of the vision tower (a transformers CLIP / SigLIP checkpoint with its
            ``preprocessor_config.json``): the original LLaVA's ``mm_vision_tower``, TinyLLaVA's
            ``vision_model_name_or_path``, whose released checkpoints do not contain it whole.
        tokenizer: Folder with the tokenizer files, when SRC has none (TinyLLaVA's
            ``tokenizer_name_or_path``).
        template: ``data.template`` to record (default: the one the reference asks with).
        system_prompt: System prompt to record (default: the template's / the reference's).
        max_length: Token budget to record (default: what the reference trained with).
        image_placement: Override the recorded ``image_placement``.
        tokenization: Override the recorded ``tokenization``.
        image_position: Override the recorded ``image_position``.
    """

    vision_tower: Optional[str] = None
    tokenizer: Optional[str] = None
    template: Optional[str] = None
    system_prompt: Optional[str] = None
    max_length: Optional[int] = None
    image_placement: Optional[str] = None
    tokenization: Optional[str] = None
    image_position: Optional[str] = None


@dataclass
class ImportedModel:
    """A released model read into parts lmm can write.

    Attributes:
        vision_config: The tower's transformers config (all its layers).
        vision_state: The tower's tensors under its transformers class's key names.
        image_processor: ``preprocessor_config.json`` content for ``vision/`` (mean, std), or None.
        text_config: The causal LM's transformers config.
        llm_state: The causal LM's tensors under its transformers class's key names.
        tokenizer: The LM's tokenizer (``<image>`` is added if it lacks one).
        connector: lmm connector name or config.
        connector_state: The connector's tensors under lmm's connector key names.
        vision: How lmm reads the tower (feature layer, token select, image preprocess, AnyRes,
            video); ``name_or_path`` is set when written.
        template: ``data.template`` name (None: unknown for this LM; ``--template`` must say).
        system_prompt: System prompt (None: the template's).
        max_length: Token budget.
        conventions: Prompt conventions.
        generation: Decoding defaults.
        source: Where it came from (recorded in lmm.json).
        notes: Things the user should know (printed by the command).
    """

    vision_config: Any
    vision_state: dict[str, torch.Tensor]
    image_processor: Optional[dict]
    text_config: Any
    llm_state: dict[str, torch.Tensor]
    tokenizer: Any
    connector: Any
    connector_state: dict[str, torch.Tensor]
    vision: VisionConfig
    template: Optional[str]
    system_prompt: Optional[str]
    max_length: int
    conventions: PromptConventions
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=128)
    )
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- reading -------------------------------------------------------------------------------------


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object from ``path`` (as data: a config's ``model_type`` is never interpreted by
    transformers here), with an error naming the file."""
    if not path.is_file():
        raise ImportFormatError(f"{path}: no such file{f' ({what})' if what else ''}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ImportFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path}: expected a JSON object")
    return data


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled PyTorch state dict, loaded with ``weights_only=True``: tensors only, no code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a pre-zipfile file cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends: the file holds more than tensors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next(
            (line for line in lines if "Unsupported global" in line), lines[0] if lines else ""
        )
        raise ImportFormatError(
            f"{path}: refused by torch.load(weights_only=True) ({reason}); lmm never unpickles code. "
            "Convert the file to safetensors where you trust it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportFormatError(f"{path}: expected a dict of tensors")
    return state


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder: ``model.safetensors``, sharded safetensors (with their
    index), ``pytorch_model.bin`` or its shards (with their index; loaded weights-only)."""
    from safetensors.torch import load_file

    def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))

    for index_name, loader in (
        ("model.safetensors.index.json", load_safetensors),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not files:
                raise ImportFormatError(f"{index}: empty weight_map")
            state: dict[str, torch.Tensor] = {}
            for name in files:
                if not (folder / name).is_file():
                    raise ImportFormatError(f"{index} lists {name}, which is not in {folder}")
                state.update(loader(folder / name))
            return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise ImportFormatError(
        f"{folder}: no weights found (model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def take(state: dict[str, torch.Tensor], prefix: str, drop: str = "") -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (removed from ``state``), renamed without it and without a
    following ``drop`` (e.g. the ``vision_model.`` of transformers 4.x towers)."""
    out = {}
    for key in [k for k in state if k.startswith(prefix)]:
        name = key[len(prefix) :]
        out[name[len(drop) :] if drop and name.startswith(drop) else name] = state.pop(key)
    return out


def vision_config_from(config: Any):
    """A CLIP / SigLIP vision config from a dict or a full CLIP / SigLIP config (its vision part)."""
    from transformers import AutoConfig, PretrainedConfig

    from lmm.model.towers.hf import HF_VISION_MODELS

    if isinstance(config, dict):
        kind = config.get("model_type")
        if kind not in HF_VISION_MODELS:
            raise ImportFormatError(
                f"vision config of model type {kind!r}: lmm imports towers of types "
                f"{', '.join(sorted(HF_VISION_MODELS))}"
            )
        fields = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(kind, **fields)
    if not isinstance(config, PretrainedConfig):
        raise ImportFormatError(f"not a transformers config: {type(config).__name__}")
    return getattr(config, "vision_config", None) or config


def tower_folder(path: Optional[str], option: str, default: Optional[str]) -> Path:
    """The local folder of a vision tower named by ``option`` (or the source's own ``default``)."""
    name = path or default
    if not name or not Path(name).is_dir():
        raise ImportFormatError(
            f"the vision tower {name!r} is not a local folder; download it (e.g. `hf download "
            f"{name or 'ORG/TOWER'} --local-dir DIR`) and pass {option} DIR"
        )
    return Path(name)


def load_tokenizer_from(*candidates: Optional[str]):
    """The tokenizer of the first candidate folder that holds one (``AutoTokenizer``; no remote code)."""
    from transformers import AutoTokenizer

    tried = [c for c in candidates if c]
    for folder in tried:
        if Path(folder).is_dir() and any(
            (Path(folder) / f).is_file()
            for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        ):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    raise ImportFormatError(
        f"no tokenizer files in {tried}; pass --tokenizer DIR (the LM's tokenizer, e.g. the folder of "
        "`hf download microsoft/phi-2`)"
    )


def image_processor_config(folder: Path) -> dict:
    """A folder's image processor settings: ``preprocessor_config.json``, or the
    ``image_processor`` section of ``processor_config.json`` (where transformers 5 writes it)."""
    if (folder / "preprocessor_config.json").is_file():
        return read_json(folder / "preprocessor_config.json")
    nested = read_json(folder / "processor_config.json", "the processor").get("image_processor")
    if not isinstance(nested, dict):
        raise ImportFormatError(
            f"{folder}: neither preprocessor_config.json nor an image_processor in processor_config.json"
        )
    return nested


def square_preprocess(processor: dict, notes: list[str]) -> str:
    """lmm's ``image_preprocess`` for a CLIP-style image processor config: ``pad`` when it pads
    to a square first (LLaVA-1.5), else ``resize``. A processor that resizes the shortest edge
    and centre-crops differs from ``resize`` on non-square images only (noted)."""
    if processor.get("do_pad"):
        return "pad"
    size = processor.get("size") or {}
    if isinstance(size, dict) and "shortest_edge" in size and processor.get("do_center_crop", True):
        notes.append(
            "the reference image processor resizes the shortest edge and centre-crops; lmm has no such mode, "
            "so non-square images are squashed to the tower's square (square images are the same)"
        )
    return "resize"


def projector_connector(
    layers: list[tuple[torch.Tensor, Optional[torch.Tensor]]], where: str
) -> tuple[str, dict[str, torch.Tensor]]:
    """lmm's ``linear`` / ``mlp{N}x_gelu`` connector state from a stack of (weight, bias) linear
    layers with exact GELU between them (LLaVA's ``mm_projector``, TinyLLaVA's connector)."""
    if not 1 <= len(layers) <= 4 or any(b is None for _, b in layers):
        raise ImportFormatError(
            f"{where}: a projector of {len(layers)} linear layers (biases: "
            f"{[b is not None for _, b in layers]}) has no lmm connector; lmm has linear and "
            "mlp2x/3x/4x_gelu with biases"
        )
    name = "linear" if len(layers) == 1 else f"mlp{len(layers)}x_gelu"
    state = {}
    for i, (w, b) in enumerate(layers):
        state[f"layers.{2 * i}.weight"], state[f"layers.{2 * i}.bias"] = w, b
    return name, state


def sequential_projector(
    proj: dict[str, torch.Tensor], kind: str, where: str, field: str
) -> tuple[str, dict[str, torch.Tensor]]:
    """An ``nn.Sequential`` projector's tensors (``0.weight``, ``2.weight``, ... with GELUs
    between; ``linear``: ``weight``, ``bias``) named by ``field`` = ``kind`` -> lmm's connector."""
    depth = {"linear": 1, "mlp2x_gelu": 2, "mlp3x_gelu": 3, "mlp4x_gelu": 4}.get(kind)
    if depth is None:
        raise ImportFormatError(
            f"{where}: {field} {kind!r} has no lmm connector (lmm reads linear, mlp2x/3x/4x_gelu)"
        )
    prefixes = [""] if depth == 1 else [f"{i}." for i in range(0, 2 * depth, 2)]
    layers = [(proj.pop(f"{p}weight", None), proj.pop(f"{p}bias", None)) for p in prefixes]
    if proj or any(w is None for w, _ in layers):
        raise ImportFormatError(
            f"{where}: projector tensors {sorted(proj) or 'missing'} do not fit {field} {kind!r}"
        )
    return projector_connector(layers, where)


def hf_template(text_model_type: str) -> Optional[str]:
    """The template LLaVA-style releases of an LM family are asked with (None: unknown)."""
    return _HF_TEMPLATES.get(text_model_type)


def apply_prompting_file(model: ImportedModel, src: Path) -> None:
    """Take the template, conventions, max_length and image handling ``lmm export`` recorded."""
    path = src / PROMPTING_FILE
    if not path.is_file():
        return
    saved = read_json(path)
    data = saved.get("data", {})
    model.template = data.get("template", model.template)
    model.system_prompt = data.get("system_prompt", model.system_prompt)
    model.max_length = int(data.get("max_length", model.max_length))
    model.conventions = PromptConventions.from_info({**model.conventions.to_info(), **data})
    if "generation" in saved:
        model.generation = GenerationConfig(**saved["generation"])
    vision = saved.get("vision", {})
    model.vision = replace(
        model.vision,
        **{
            k: v
            for k, v in vision.items()
            if k in ("image_preprocess", "select", "anyres", "video")
        },
    )
    model.vision.__post_init__()  # nested settings come as plain dicts
    model.source["lmm_export"] = True


def prompting_record(ckpt, vision: VisionConfig) -> dict:
    """What :func:`apply_prompting_file` reads back (written by ``lmm export``)."""
    from dataclasses import asdict

    return {
        "data": {
            "template": ckpt.template.name,
            "system_prompt": ckpt.template.system,
            "max_length": ckpt.max_length,
            **ckpt.conventions.to_info(),
        },
        "generation": asdict(ckpt.generation),
        "vision": {
            "image_preprocess": vision.image_preprocess,
            "select": vision.select,
            "anyres": asdict(vision.anyres) if vision.anyres else None,
            "video": asdict(vision.video) if vision.video else None,
        },
    }


# -- writing -------------------------------------------------------------------------------------


def _check_keys(state: dict, expected: dict, what: str, tied: set[str] = frozenset()) -> None:
    """``state`` must hold exactly the tensors the transformers class declares, with its shapes."""
    want = {k: v for k, v in expected.items() if k not in tied}
    missing, unexpected, bad = state_mismatch(
        {k: v for k, v in state.items() if k not in tied}, want
    )
    if missing or unexpected:
        raise ImportFormatError(
            f"{what}: the weights do not match the transformers class (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the checkpoint's config and weights disagree"
        )
    if bad:
        raise ImportFormatError(
            f"{what}: tensor {bad[0]!r} has shape {tuple(state[bad[0]].shape)}, the config gives "
            f"{tuple(want[bad[0]].shape)}"
        )


def _meta_model(factory, config):
    """The transformers model of ``config`` without memory (to read its key names and shapes)."""
    with torch.device("meta"):
        return factory(config)


def _weight_key(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(f"{n}.weight" for n, m in model.named_modules() if m is module)


def _add_image_token(model: ImportedModel) -> None:
    """``<image>`` (and a pad token) in the tokenizer; embedding rows for every token id.

    New rows are the mean of the existing ones (input embedding and LM head alike): the image
    row is overwritten by image features on input, and a head row equal to the mean makes its
    logit the mean of the real logits, so it never wins greedy decoding."""
    from transformers import AutoModelForCausalLM

    from lmm.model.language import prepare_tokenizer

    tok = prepare_tokenizer(model.tokenizer, "the imported model")
    lm = _meta_model(AutoModelForCausalLM.from_config, model.text_config)
    embed_key = _weight_key(lm, lm.get_input_embeddings())
    if len(tok) <= model.llm_state[embed_key].shape[0]:
        return
    rows = -(-len(tok) // 64) * 64  # lmm's LanguageConfig.pad_to_multiple_of
    for key in {embed_key, _weight_key(lm, lm.get_output_embeddings())}:
        if key not in model.llm_state:  # a tied head has no tensor of its own
            continue
        w = model.llm_state[key]
        fill = w.float().mean(0, keepdim=True).to(w.dtype).expand(rows - w.shape[0], -1)
        model.llm_state[key] = torch.cat([w, fill])
    model.text_config.vocab_size = rows


def _write_parts(model: ImportedModel, staging: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from lmm.model.towers.hf import HF_VISION_MODELS

    class_name, _ = HF_VISION_MODELS[model.vision_config.model_type]
    tower = _meta_model(getattr(transformers, class_name), model.vision_config)
    _check_keys(model.vision_state, tower.state_dict(), "vision tower")
    lm = _meta_model(AutoModelForCausalLM.from_config, model.text_config)
    head = _weight_key(lm, lm.get_output_embeddings())
    # A tied head is the input embedding: transformers neither stores nor expects it.
    tied = {head} if getattr(model.text_config, "tie_word_embeddings", False) else set()
    state = {k: v for k, v in model.llm_state.items() if k not in tied}
    _check_keys(state, lm.state_dict(), "language model", tied)

    model.vision_config.architectures = [class_name]
    model.vision_config.save_pretrained(staging / "vision")
    write_safetensors(model.vision_state, staging / "vision")
    if model.image_processor is not None:
        (staging / "vision" / "preprocessor_config.json").write_text(
            json.dumps(model.image_processor, indent=2) + "\n", encoding="utf-8"
        )
    model.text_config.architectures = [type(lm).__name__]
    model.text_config.save_pretrained(staging / "llm")
    write_safetensors(state, staging / "llm")
    model.tokenizer.save_pretrained(staging / "llm")


def write_checkpoint(model: ImportedModel, out: str | Path, options: ImportOptions) -> Path:
    """Write ``model`` as an lmm checkpoint directory at ``out`` (``options`` override what the
    source said); returns ``out``."""
    from lmm.checkpoints.directory import save_checkpoint_dir
    from lmm.data.templates import TEMPLATES, get_template
    from lmm.model.language import LanguageConfig
    from lmm.model.lmm import LMM

    name = options.template or model.template
    if name is None:
        raise ImportFormatError(
            f"no conversation template is known for a {model.text_config.model_type!r} language model; "
            f"pass --template NAME ({', '.join(TEMPLATES.names())})"
        )
    template = get_template(name)
    system = options.system_prompt if options.system_prompt is not None else model.system_prompt
    if system is not None:
        template = replace(template, system=system)
    overrides = {
        k: getattr(options, k)
        for k in ("image_placement", "tokenization", "image_position")
        if getattr(options, k) is not None
    }
    conventions = replace(model.conventions, **overrides)
    _add_image_token(model)
    template.bind(
        model.tokenizer
    )  # the template's end-of-turn must be a token: fail before writing

    out = Path(out)
    staging = out.with_name(out.name + ".parts")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_parts(model, staging)
        dtype = next(iter(model.connector_state.values())).dtype
        vision = replace(model.vision, kind="hf", name_or_path=str(staging / "vision"))
        llm = LanguageConfig(name_or_path=str(staging / "llm"))
        model.vision_state.clear()
        model.llm_state.clear()  # the parts are on disk now: do not hold them twice
        lmm_model = LMM(vision, llm, model.connector, dtype=dtype)
        if lmm_model.image_token_id != model.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
            raise ImportFormatError("the written tokenizer lost its <image> token")
        missing, unexpected = lmm_model.connector.load_state_dict(
            model.connector_state, strict=False
        )
        if missing or unexpected:
            raise ImportFormatError(
                f"connector {model.connector!r}: lmm's connector has tensors {missing[:3]} the source lacks "
                f"and the source has {unexpected[:3]} it does not"
            )
        return save_checkpoint_dir(
            lmm_model,
            out,
            vision=vision,
            llm=llm,
            connector=model.connector,
            template=template,
            max_length=options.max_length or model.max_length,
            generation=model.generation,
            conventions=conventions,
            source=model.source,
            parts_dir=staging,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
