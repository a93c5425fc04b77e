"""Batched generation (left padding, KV cache, sampling options) and result order across ranks."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest
import torch
from conftest import TINY_SPEC
from PIL import Image

from lmm.data.collate import collate
from lmm.data.shards import ShardStream
from lmm.data.templates import get_template
from lmm.inference.ordering import gather_in_order, sort_by_order
from lmm.inference.predictor import Predictor
from lmm.model.lmm import GenerationConfig

QUESTIONS = [
    "What color is the circle?",
    "How many shapes are there? Count every shape in the image, including the small ones near the edges.",
    "Yes?",
    "Describe the image.",
    "Is there a red square at the top left of the image, next to a blue triangle?",
]


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (
        (torch.rand(TINY_SPEC.image_size, TINY_SPEC.image_size, 3, generator=g) * 255)
        .to(torch.uint8)
        .numpy()
    )
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="module")
def predictor(lmm_model) -> Predictor:
    return Predictor(
        lmm_model, get_template("vicuna"), GenerationConfig(max_new_tokens=8), max_length=256
    )


@pytest.fixture(scope="module")
def prompts(predictor) -> list[dict]:
    """Mixed lengths: one to three turns, with an image, and one text-only prompt."""
    out = [predictor.encode_question(q, [_image(i)], f"q{i}") for i, q in enumerate(QUESTIONS)]
    multi = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Which color?"},
    ]
    out.append(predictor.encode(multi, [_image(9)], "multi"))
    out.append(predictor.encode_question("No image here, just text.", [], "text-only"))
    assert len({len(p["input_ids"]) for p in out}) == len(out)  # all lengths differ
    return out


def test_batched_greedy_equals_batch_size_one(predictor, prompts):
    one_by_one = [predictor.generate([p])[0] for p in prompts]
    assert predictor.generate(prompts) == one_by_one  # one left-padded batch, input order
    assert predictor.generate_all(prompts, batch_size=3) == one_by_one  # length-sorted batches
    assert any(one_by_one) and len(set(one_by_one)) > 1  # real, distinct answers


def test_batched_greedy_token_ids_equal_single(lmm_model, prompts):
    m = lmm_model
    batch = collate(prompts, pad_id=m.tokenizer.pad_token_id, left=True)
    out = m.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=6
    )
    eos, pad = m.tokenizer.eos_token_id, m.tokenizer.pad_token_id
    for row, p in enumerate(prompts):
        ids = p["input_ids"][None]
        single = m.generate(ids, torch.ones_like(ids), p["pixel_values"], max_new_tokens=6)[
            0
        ].tolist()
        got = out[row].tolist()
        if eos in single:  # after eos a finished row is padded
            cut = single.index(eos) + 1
            assert got[:cut] == single[:cut] and all(t == pad for t in got[cut:]), row
        else:
            assert got == single, row


def test_sampling_is_seeded_and_leaves_global_rng_alone(lmm_model, prompts):
    m = lmm_model
    b = collate(prompts[:3], pad_id=m.tokenizer.pad_token_id, left=True)
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=5.0, top_p=1.0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = m.generate(*args, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # seeded sampling uses a forked RNG
    assert torch.equal(m.generate(*args, seed=7, **kw), first)
    assert not torch.equal(m.generate(*args, seed=8, **kw), first)
    greedy = m.generate(*args, max_new_tokens=8)
    assert not torch.equal(first, greedy)  # temperature 5 over a random LM: not the argmax path
    # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
    assert torch.equal(
        m.generate(*args, seed=1, max_new_tokens=8, do_sample=True, top_p=1e-9), greedy
    )


def test_stop_token_ends_generation(lmm_model, prompts):
    m = lmm_model
    p = prompts[0]
    ids = p["input_ids"][None]
    greedy = m.generate(ids, torch.ones_like(ids), p["pixel_values"], max_new_tokens=8)[0].tolist()
    first = greedy[0]
    stopped = m.generate(
        ids, torch.ones_like(ids), p["pixel_values"], max_new_tokens=8, stop_token_ids=[first]
    )
    assert stopped[0].tolist() == [first]


def test_generate_rejects_bad_inputs(lmm_model, prompts):
    m = lmm_model
    b = collate(prompts[:2], pad_id=m.tokenizer.pad_token_id, left=False)  # right padded
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(b["input_ids"], b["attention_mask"], b["pixel_values"])
    b = collate(prompts[:2], pad_id=m.tokenizer.pad_token_id, left=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        m.generate(
            b["input_ids"], b["attention_mask"], b["pixel_values"], do_sample=True, temperature=0.0
        )


# -- original order across ranks and workers -------------------------------------------------------


def _tag(raw: dict) -> dict:
    return {"id": raw["__key__"]}


def _ids(samples: list[dict]) -> dict:
    return {"ids": [s["id"] for s in samples], "order": [s["order"] for s in samples]}


def test_two_rank_gather_restores_the_original_order(tiny_world):
    root, manifest = tiny_world
    shards = [str(root / s) for s in manifest["splits"]["test/pope_random"]["shards"]]
    assert len(shards) == 2
    single = [
        k
        for b in ShardStream(shards, _tag, _ids, batch_size=5, index_samples=True)
        for k in b["ids"]
    ]
    per_rank = []
    for rank in range(2):
        stream = ShardStream(
            shards, _tag, _ids, batch_size=5, rank=rank, world_size=2, index_samples=True
        )
        per_rank.append(
            [{"order": o, "question_id": k} for b in stream for k, o in zip(b["ids"], b["order"])]
        )
    assert per_rank[0] and per_rank[1]
    interleaved = [r["question_id"] for r in per_rank[1] + per_rank[0]]
    assert interleaved != single  # what a plain concatenation of rank results gives
    merged = sort_by_order([per_rank[1], per_rank[0]])
    assert [r["question_id"] for r in merged] == single
    assert all("order" not in r for r in merged)


def _gather_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    records = [{"order": (0, i), "question_id": f"q{i}", "rank": rank} for i in range(rank, 7, 2)]
    merged = gather_in_order(records)
    if rank == 1:
        with open(out_file, "w") as f:
            json.dump(merged, f)
    torch.distributed.destroy_process_group()


def test_gather_in_order_across_two_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")  # children reuse this process's imports: fast
    out = tmp_path / "merged.json"
    procs = [
        ctx.Process(target=_gather_worker, args=(r, str(tmp_path / "init"), str(out)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    merged = json.loads(out.read_text())
    assert [r["question_id"] for r in merged] == [f"q{i}" for i in range(7)]
    assert [r["rank"] for r in merged] == [i % 2 for i in range(7)]


def test_lmm_test_writes_predictions_in_set_order_with_two_workers(
    tiny_models, tiny_world, tmp_path
):
    """Two dataloader workers interleave the two shards' batches; the prediction file and the
    scored records still follow the set's order."""
    from lmm.train.cli import LMMCLI

    root, manifest = tiny_world
    shards = [str(root / s) for s in manifest["splits"]["test/pope_random"]["shards"]]
    single = [
        k
        for b in ShardStream(shards, _tag, _ids, batch_size=4, index_samples=True)
        for k in b["ids"]
    ]
    args = [
        "test",
        "--model.vision.name_or_path", str(tiny_models["vision"]), "--model.vision.feature_layer", "-1",
        "--model.llm.name_or_path", str(tiny_models["llm"]),
        "--model.generation.max_new_tokens", "1", "--model.results_dir", str(tmp_path),
        "--data.template", "vicuna",
        "--data.test",
        json.dumps([{"name": "pope_random", "shards": f"{root}/test/pope_random/shard-*.tar", "kind": "pope"}]),
        "--data.eval_batch_size", "4", "--data.num_workers", "2",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),  # where LightningCLI saves its config.yaml
    ]  # fmt: skip
    LMMCLI(args=args)
    lines = [
        json.loads(line)
        for line in (tmp_path / "predictions_pope_random.jsonl").read_text().splitlines()
    ]
    ids_by_key = {}
    for b in ShardStream(
        shards,
        lambda raw: {"id": raw["__key__"], "qid": json.loads(raw["json"])["question_id"]},
        lambda s: {"pairs": [(x["id"], x["qid"]) for x in s]},
        batch_size=100,
    ):
        ids_by_key.update(dict(b["pairs"]))
    assert [r["question_id"] for r in lines] == [ids_by_key[k] for k in single]
    assert all("order" not in r for r in lines)


# -- lmms-eval adapter -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_model(lmm_model, tiny_models, tmp_path_factory):
    from dataclasses import replace as dc_replace

    from lmm.checkpoints.directory import save_checkpoint_dir
    from lmm.eval.lmms_eval_model import LMMEvalModel
    from lmm.model.language import LanguageConfig
    from lmm.model.towers import VisionConfig

    out = save_checkpoint_dir(
        lmm_model, tmp_path_factory.mktemp("lmms_eval") / "ckpt",
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])), connector="mlp2x_gelu",
        template=dc_replace(get_template("vicuna"), system=""), max_length=256,
    )  # fmt: skip
    model = LMMEvalModel(ckpt=str(out), batch_size=2, device="cpu")
    docs = [{"question": q, "image": _image(i)} for i, q in enumerate(QUESTIONS)]
    model.task_dict = {"toy": {"test": docs}}
    return model


def _doc_to_visual(doc):
    return [doc["image"]]


def _request(kind: str, i: int, second, instance_cls=None):
    """A request as lmms-eval builds it:
    ``args`` = (context, gen_kwargs | target, doc_to_visual, doc_id, task, split)."""
    from types import SimpleNamespace

    args = (QUESTIONS[i], second, _doc_to_visual, i, "toy", "test")
    if instance_cls is None:
        return SimpleNamespace(request_type=kind, args=args)
    return instance_cls(kind, args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})


def test_lmms_eval_generate_until_matches_lmm_answers(eval_model):
    ref = Predictor(
        eval_model.model,
        eval_model.predictor.template,
        GenerationConfig(max_new_tokens=6),
        max_length=256,
    )
    expected = [
        ref.generate([ref.encode_question(q, [_image(i)])])[0] for i, q in enumerate(QUESTIONS)
    ]
    # Two gen_kwargs groups interleaved: answers still come back in request order.
    reqs = [
        _request(
            "generate_until",
            i,
            {"max_new_tokens": 6, "until": []} if i % 2 else {"max_new_tokens": 6},
        )
        for i in range(len(QUESTIONS))
    ]
    assert eval_model.generate_until(reqs) == expected
    # `until` cuts the answer at the first stop string.
    k = next(i for i, a in enumerate(expected) if len(a) >= 4)
    stop = expected[k][2:4]
    got = eval_model.generate_until(
        [_request("generate_until", k, {"max_new_tokens": 6, "until": [stop]})]
    )
    assert got == [expected[k][: expected[k].index(stop)]]


def test_lmms_eval_loglikelihood(eval_model, fresh_lmm):
    import copy
    from dataclasses import replace as dc_replace

    import numpy as np

    m = eval_model.model
    targets = ["red", " zebra violin", "Yes, two."]
    got = eval_model.loglikelihood([_request("loglikelihood", i, t) for i, t in enumerate(targets)])
    for i, target in enumerate(targets):  # by hand, one unpadded sequence at a time
        sample = eval_model.predictor.encode_question(QUESTIONS[i], [_image(i)])
        cont = eval_model._continuation_ids(
            [{"from": "human", "value": "<image>\n" + QUESTIONS[i]}], target
        )
        # vicuna's answer prefix, then the target; lmms-eval's leading delimiter is not doubled
        assert m.tokenizer.decode(cont) == " " + target.lstrip()
        ids = torch.cat([sample["input_ids"], torch.tensor(cont)])[None]
        with torch.no_grad():
            logp = torch.log_softmax(
                m.llm(inputs_embeds=m.embed(ids, sample["pixel_values"])).logits[0], -1
            )
        rows = logp[ids.shape[1] - len(cont) - 1 : -1]
        by_hand = float(rows.gather(-1, torch.tensor(cont)[:, None]).sum())
        # lmms-eval's convention: a loss (lower = more likely), the negative log-probability
        assert got[i][0] == pytest.approx(-by_hand, abs=1e-4), target
        assert got[i][1] == bool((rows.argmax(-1) == torch.tensor(cont)).all())
    # multiple_choice requests carry f"{target_delimiter}{choice}" = " A": the same tokens as "A"
    turns = [{"from": "human", "value": "<image>\n" + QUESTIONS[0]}]
    assert eval_model._continuation_ids(turns, " A") == eval_model._continuation_ids(turns, "A")
    # ... and lmms-eval picks the answer by argmin (api/task.py, ConfigurableTask.process_results,
    # OUTPUT_TYPE multiple_choice: pred = np.argmin(lls)): the most likely choice.
    choices = ["red", "blue", "green", "circle"]
    lls = [
        ll
        for ll, _ in eval_model.loglikelihood(
            [_request("loglikelihood", 0, " " + c) for c in choices]
        )
    ]
    logprobs = []
    for c in choices:
        sample = eval_model.predictor.encode_question(QUESTIONS[0], [_image(0)])
        cont = eval_model._continuation_ids(turns, c)
        ids = torch.cat([sample["input_ids"], torch.tensor(cont)])[None]
        with torch.no_grad():
            logp = torch.log_softmax(
                m.llm(inputs_embeds=m.embed(ids, sample["pixel_values"])).logits[0], -1
            )
        logprobs.append(
            float(
                logp[ids.shape[1] - len(cont) - 1 : -1]
                .gather(-1, torch.tensor(cont)[:, None])
                .sum()
            )
        )
    assert int(np.argmin(lls)) == int(np.argmax(logprobs))
    # A model whose every next-token distribution is uniform (final norm zeroed): greedy
    # decoding picks id 0 ('<unk>'), and every token costs log(V).
    with torch.no_grad():
        fresh_lmm.llm.get_decoder().norm.weight.zero_()
    flat = copy.copy(eval_model)
    flat.predictor = Predictor(
        fresh_lmm, dc_replace(eval_model.predictor.template, answer_prefix=""), max_length=256
    )
    vocab = fresh_lmm.llm.get_output_embeddings().weight.shape[0]
    unk = fresh_lmm.tokenizer.convert_ids_to_tokens(0)
    (score, greedy), (score2, greedy2) = flat.loglikelihood(
        [_request("loglikelihood", 0, unk * 2), _request("loglikelihood", 1, "red")]
    )
    assert greedy and score == pytest.approx(2 * math.log(vocab), abs=1e-4)
    assert not greedy2


def test_lmms_eval_real_interface(eval_model, tmp_path):
    """Against the installed lmms-eval: the base class, its Instance, its registry and its
    ``create_from_arg_string`` constructor path."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from lmm.eval.lmms_eval_model import LMMEvalModel, manifest

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    assert registry.get_model_class("lmm") is LMMEvalModel
    assert isinstance(eval_model, lmms) and eval_model.is_simple
    ckpt_dir = str(eval_model.checkpoint.path)
    built = LMMEvalModel.create_from_arg_string(
        f"ckpt={ckpt_dir},dtype=float32,max_new_tokens=6",
        {"batch_size": "2", "max_batch_size": None, "device": "cpu"},
    )
    built.task_dict = eval_model.task_dict
    assert built.batch_size == 2
    reqs = [_request("generate_until", i, {"until": ["\n\n"]}, Instance) for i in range(3)]
    assert [r.args for r in reqs] == [
        _request("generate_until", i, {"until": ["\n\n"]}).args for i in range(3)
    ]
    fake = [
        _request("generate_until", i, {"max_new_tokens": 6, "until": ["\n\n"]}) for i in range(3)
    ]
    assert built.generate_until(reqs) == eval_model.generate_until(fake)
    ll = built.loglikelihood([_request("loglikelihood", 0, "red", Instance)])
    assert isinstance(ll[0][0], float) and isinstance(ll[0][1], bool)
    with pytest.raises(ValueError, match="unknown option"):
        LMMEvalModel.create_from_arg_string(
            f"ckpt={ckpt_dir},temprature=0", {"batch_size": 1, "device": "cpu"}
        )


def test_lmms_eval_finds_lmm_through_the_declared_entry_point(monkeypatch):
    """pyproject's ``lmms_eval.models`` entry point, loaded the way lmms-eval loads entry points
    (``ModelRegistryV2.load_entrypoint_manifests``: ``ep.load()``, called, a ModelManifest)."""
    pytest.importorskip("lmms_eval")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from importlib.metadata import EntryPoint
    from pathlib import Path

    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from lmm.eval.lmms_eval_model import LMMEvalModel

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"lmm": "lmm.eval.lmms_eval_model:manifest"}
    eps = [EntryPoint(name=n, value=v, group="lmms_eval.models") for n, v in declared.items()]
    registry = ModelRegistryV2()
    monkeypatch.setattr(
        registry, "_select_entry_points", lambda group: eps if group == "lmms_eval.models" else []
    )
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("lmm") is LMMEvalModel
    assert "lmm" in registry.list_canonical_model_ids()
