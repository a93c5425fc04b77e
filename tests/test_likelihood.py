"""Likelihood scoring (lmm.inference.likelihood): which token stands for a candidate answer,
candidate probabilities against greedy decoding of a model trained to answer Yes/No, and the
``predict --scoring likelihood`` command."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_SPEC, make_processor
from PIL import Image

from lmm.data.collate import collate
from lmm.data.encode import SampleEncoder
from lmm.data.templates import get_template
from lmm.inference.likelihood import answer_token_ids, candidate_logprobs, candidates_for
from lmm.inference.predictor import Predictor
from lmm.model.lmm import GenerationConfig

TEMPLATE = replace(get_template("vicuna"), system="")
QUESTION = "Is the image red?"


def _image(red: float, seed: int) -> Image.Image:
    """Noise tinted towards red (``red`` near 1) or blue (near 0)."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.rand(TINY_SPEC.image_size, TINY_SPEC.image_size, 3, generator=g) * 0.3
    arr[..., 0] += 0.7 * red
    arr[..., 2] += 0.7 * (1 - red)
    return Image.fromarray((arr.clamp(0, 1) * 255).to(torch.uint8).numpy(), "RGB")


def _supervised(tokenizer, image_spec, answer: str) -> list[int]:
    """The tokens training supervises for ``answer`` (SampleEncoder's labels), end-of-turn dropped."""
    enc = SampleEncoder(make_processor(tokenizer, image_spec), TEMPLATE, 256)
    conv = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}]
    labels = enc.encode_train({"id": "x", "conversations": conv}, [])["labels"]
    return labels[labels != -100].tolist()[:-1]


def _sentencepiece_tokenizer():
    from lmm.standins.llm import FAMILIES, build_family_tokenizer

    corpus = [f"USER: {QUESTION} ASSISTANT: Yes", "USER: Is it blue? ASSISTANT: No"] * 5
    corpus += ["USER: Which? A. red B. blue C. green D. cyan ASSISTANT: B"] * 5
    return build_family_tokenizer(FAMILIES["llama"], corpus)


@pytest.mark.parametrize("kind", ["byte-level BPE", "SentencePiece-like"])
def test_candidate_tokens_are_the_answer_tokens_training_supervises(kind, tokenizer, image_spec):
    tok = tokenizer if kind == "byte-level BPE" else _sentencepiece_tokenizer()
    yes, no = _supervised(tok, image_spec, "Yes"), _supervised(tok, image_spec, "No")
    c = candidates_for(tok, TEMPLATE, ["Yes", "No"])
    for i, answer in enumerate((yes, no)):  # shared prefix, then the candidate's own token
        assert answer[: len(c.shared) + 1] == [*c.shared, c.token_ids[i]]
    assert answer_token_ids(tok, TEMPLATE, "Yes") == yes
    pieces = tok.convert_ids_to_tokens([*c.shared, *c.token_ids])
    if kind == "byte-level BPE":  # the tiny BPE writes vicuna's space as a token of its own
        assert pieces == ["Ġ", "Yes", "No"]
    else:  # SentencePiece marks the word: one token per answer, nothing shared
        assert pieces == ["▁Yes", "▁No"]
    letters = candidates_for(tok, TEMPLATE, ["A", "B"])
    assert len(set(letters.token_ids)) == 2


def test_candidates_that_one_distribution_cannot_separate_are_refused(tokenizer):
    with pytest.raises(ValueError, match="prefix of another"):
        candidates_for(tokenizer, TEMPLATE, ["Yes", "Yes no"])
    with pytest.raises(ValueError, match="two or more distinct"):
        candidates_for(tokenizer, TEMPLATE, ["Yes", "Yes"])


@pytest.fixture(scope="module")
def yes_no_model(_session_lmm, tokenizer, image_spec):
    """The tiny model trained for a few steps to answer whether the image is red."""
    torch.manual_seed(0)
    model = copy.deepcopy(_session_lmm).train()
    enc = SampleEncoder(make_processor(tokenizer, image_spec), TEMPLATE, 256)
    samples = [
        enc.encode_train(
            {
                "id": str(i),
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTION}"},
                    {"from": "gpt", "value": "Yes" if i % 2 else "No"},
                ],
            },
            [_image(float(i % 2), seed=100 + i)],
        )
        for i in range(16)
    ]
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1
    return model.eval()


def test_argmax_likelihood_is_the_greedy_answer(yes_no_model):
    m = yes_no_model
    predictor = Predictor(m, TEMPLATE, GenerationConfig(max_new_tokens=3), max_length=256)
    shades = [0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 0.45]
    prompts = [
        predictor.encode_question(QUESTION, [_image(r, seed=200 + i)]) for i, r in enumerate(shades)
    ]
    probs = predictor.score_candidates(prompts, [("Yes", "No")] * len(prompts), batch_size=3)
    greedy = predictor.generate_all(prompts)
    argmax = [max(p, key=p.get) for p in probs]
    assert argmax == greedy and {"Yes", "No"} <= set(greedy)
    # Token level: greedy writes the shared space token, then the candidate's token.
    c = predictor.candidates(("Yes", "No"))
    batch = collate(prompts, pad_id=m.tokenizer.pad_token_id, left=True)
    ids = m.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=2
    )
    assert ids[:, 0].tolist() == [c.shared[0]] * len(prompts)
    assert ids[:, 1].tolist() == [c.token_ids[("Yes", "No").index(a)] for a in argmax]
    # The probabilities are the renormalised next-token probabilities of one unpadded forward.
    for prompt, p in zip(prompts, probs):
        ids = torch.cat([prompt["input_ids"], torch.tensor(c.shared)])[None]
        with torch.no_grad():
            logits = m.llm(inputs_embeds=m.embed(ids, prompt["pixel_values"])).logits[0, -1]
        expected = torch.softmax(logits[list(c.token_ids)], 0)
        assert [p["Yes"], p["No"]] == pytest.approx(expected.tolist(), abs=1e-5)
    # Batching and padding side do not change them.
    assert predictor.score_candidates(prompts, [("Yes", "No")] * len(prompts), batch_size=1) == [
        pytest.approx(p, abs=1e-5) for p in probs
    ]
    right = collate(prompts, pad_id=m.tokenizer.pad_token_id, left=False)
    lp = candidate_logprobs(
        m, right["input_ids"], right["attention_mask"], right["pixel_values"], [c] * len(prompts)
    )
    assert [torch.softmax(x, 0)[0].item() for x in lp] == pytest.approx(
        [p["Yes"] for p in probs], abs=1e-5
    )


def test_predict_scores_by_likelihood(yes_no_model, tiny_models, tmp_path, capsys):
    from lmm.checkpoints.directory import save_checkpoint_dir
    from lmm.commands.predict import main as predict_main
    from lmm.eval.ranking import auc_roc
    from lmm.model.language import LanguageConfig
    from lmm.model.towers import VisionConfig

    ckpt = save_checkpoint_dir(
        yes_no_model, tmp_path / "ckpt",
        vision=VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        llm=LanguageConfig(name_or_path=str(tiny_models["llm"])), connector="mlp2x_gelu",
        template=TEMPLATE, max_length=256, generation=GenerationConfig(max_new_tokens=3),
    )  # fmt: skip
    shades = [0.1, 0.9, 0.4, 0.7, 0.55, 0.3]
    rows = []
    for i, r in enumerate(shades):
        _image(r, seed=300 + i).save(tmp_path / f"{i}.png")
        label = "yes" if r > 0.5 else "no"
        rows.append({"question_id": i, "image": f"{i}.png", "text": QUESTION, "label": label})
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "answers.jsonl"
    argv = ["--ckpt", str(ckpt), "--questions", str(pope), "--answers", str(answers),
            "--scoring", "likelihood", "--benchmark", "pope", "--annotations", str(pope),
            "--batch-size", "4"]  # fmt: skip
    assert predict_main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = [json.loads(line) for line in answers.read_text().splitlines()]
    assert all(r["text"] == max(r["probs"], key=r["probs"].get) for r in recs)
    assert all(sum(r["probs"].values()) == pytest.approx(1.0) for r in recs)
    expected = auc_roc([r["label"] == "yes" for r in rows], [r["probs"]["Yes"] for r in recs])
    assert metrics["auc_roc"] == pytest.approx(expected)
    assert metrics["splits"]["random"]["auc_roc"] == pytest.approx(expected)
    # Multiple choice: the letters each question shows.
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        json.dumps(
            {"question_id": 0, "image": "0.png", "text": "Which?\nA. red\nB. blue\nC. green"}
        )
        + "\n"
    )
    argv = ["--ckpt", str(ckpt), "--questions", str(mc), "--answers", str(tmp_path / "mc_answers.jsonl"),
            "--scoring", "likelihood", "--candidates", "letters"]  # fmt: skip
    assert predict_main(argv) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "mc_answers.jsonl").read_text().splitlines()]
    assert set(rec["probs"]) == {"A", "B", "C"} and rec["text"] in "ABC"
    # Generation-only benchmarks need explicit candidates.
    argv = ["--ckpt", str(ckpt), "--questions", str(mc), "--answers", str(tmp_path / "x.jsonl"),
            "--scoring", "likelihood", "--benchmark", "gqa", "--annotations", str(mc)]  # fmt: skip
    assert predict_main(argv) == 2
    assert "needs --candidates" in capsys.readouterr().err


def test_eval_set_scoring_options_are_checked():
    from lmm.data.datamodule import EvalSet
    from lmm.errors import ConfigError

    assert EvalSet("p", "x", kind="pope", scoring="likelihood").scoring_options()["candidates"] == [
        "Yes",
        "No",
    ]
    with pytest.raises(ConfigError, match="needs candidates"):
        EvalSet("s", "x", kind="short_answer", scoring="likelihood")
    with pytest.raises(ConfigError, match="scoring: generate"):
        EvalSet("c", "x", kind="chair", scoring="likelihood")
    with pytest.raises(ConfigError, match="for scoring: likelihood"):
        EvalSet("s", "x", candidates=["red", "blue"])
