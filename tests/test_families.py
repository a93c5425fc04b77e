"""LLM families (Llama, Phi, StableLM, Qwen2, Gemma): stand-ins of the real classes loaded through
lmm's own loading path, <image> token, pad token, embedding resize, per-family templates and
label masks on multi-turn conversations, and one training step inside the LMM.

Expected texts are written out by hand per format and expected token positions come from
tokenizing prefixes of that text, independently of the template and encoder code.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import VICUNA_SYSTEM
from PIL import Image

from lmm.constants import IMAGE_TOKEN
from lmm.data.collate import collate
from lmm.data.encode import IGNORE_INDEX, Processor, SampleEncoder
from lmm.data.templates import Template, get_template
from lmm.errors import TemplateMismatchError
from lmm.model.language import LanguageConfig, load_language_model, load_tokenizer
from lmm.standins.llm import FAMILIES, build_llm
from lmm.visual.image_spec import ImageSpec

N_IMAGE = 4  # tokens per image in the label tests: small, but a real expansion
SPEC = ImageSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# Facts about the real checkpoints lmm has to cope with: which token lmm pads with.
EXPECTED_PAD = {
    "llama": "<unk>",
    "phi": "<|endoftext|>",
    "stablelm": "<|endoftext|>",
    "qwen2": "<|endoftext|>",
    "gemma": "<pad>",
}

QUESTIONS = [
    "<image>\nWhat color is the circle?",
    "How many shapes are there?",
    "Is there a square at the top left?",
]
ANSWERS = ["The circle is red.", "There are three shapes.", "No, there is not."]
CONVERSATION = [
    m
    for q, a in zip(QUESTIONS, ANSWERS)
    for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})
]


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llm_standins")
    return {name: build_llm(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def toks(standins) -> dict:
    """lmm's tokenizers (``<image>`` added, pad set), loaded from the saved directories."""
    return {
        name: load_tokenizer(LanguageConfig(name_or_path=str(path)))
        for name, path in standins.items()
    }


def processor(tok) -> Processor:
    return Processor(tok, SPEC, N_IMAGE, tok.convert_tokens_to_ids(IMAGE_TOKEN))


def red_image() -> Image.Image:
    return Image.new("RGB", (20, 20), (200, 30, 30))


# -- loading: classes, special tokens, pad, <image>, embedding rows ------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standin_is_the_real_class_loaded_through_lmm(standins, toks, family):
    import transformers
    from tokenizers import Tokenizer

    fam, path = FAMILIES[family], standins[family]
    assert json.loads((path / "config.json").read_text())["architectures"] == [fam.model_class]
    assert (
        json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"]
        == fam.tokenizer_class
    )
    tok = toks[family]
    # AutoTokenizer may rebuild the pipeline through the family's class; it must still
    # tokenize exactly like the saved tokenizer.json.
    saved = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "USER: Is there a blue square?\nASSISTANT: Yes, at the top left.  Two  spaces, é, 12."
    assert tok(text)["input_ids"] == saved.encode(text).ids
    assert (tok.bos_token, tok.eos_token) == (fam.bos, fam.eos)
    model = load_language_model(LanguageConfig(name_or_path=str(path)), tok)
    assert type(model) is getattr(transformers, fam.model_class)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pad_token(standins, toks, family):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(standins[family]))
    assert (
        raw.pad_token == FAMILIES[family].pad
    )  # as the real tokenizer ships it (None for llama/phi/stablelm)
    tok = toks[family]
    assert tok.pad_token == EXPECTED_PAD[family]
    assert tok.pad_token_id == raw.convert_tokens_to_ids(EXPECTED_PAD[family])
    # Phi/StableLM pad with their eos; this is safe because collate builds the attention mask
    # from lengths and labels padding with IGNORE_INDEX: eos stays attended and supervised.
    eos = tok.eos_token_id
    a = {
        "id": "a",
        "input_ids": torch.tensor([5, 6, eos]),
        "labels": torch.tensor([-100, 6, eos]),
        "pixel_values": torch.zeros(0, 3, 16, 16),
    }
    b = {
        "id": "b",
        "input_ids": torch.tensor([5]),
        "labels": torch.tensor([5]),
        "pixel_values": torch.zeros(0, 3, 16, 16),
    }
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, eos], [5, -100, -100]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_token_is_one_special_token(standins, toks, family):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(standins[family]))
    assert IMAGE_TOKEN not in raw.get_vocab()  # the real tokenizers do not have it either
    tok = toks[family]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(raw) and len(tok) == len(raw) + 1
    for text in ("USER: <image>\nWhat is it?", "a<image>b", "<image><image> two"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(image_id) == text.count(IMAGE_TOKEN)
        assert IMAGE_TOKEN not in tok.decode(ids, skip_special_tokens=True)
    assert IMAGE_TOKEN in tok.all_special_tokens
    # The family's own extra special tokens stay special (added to, not replaced).
    assert set(FAMILIES[family].specials) <= set(tok.all_special_tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_embeddings_cover_image_token_in_multiples_of_64(standins, toks, family):
    fam, tok = FAMILIES[family], toks[family]
    rows_saved = json.loads((standins[family] / "config.json").read_text())["vocab_size"]
    model = load_language_model(LanguageConfig(name_or_path=str(standins[family])), tok)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    rows = emb.shape[0]
    assert rows % 64 == 0 and rows >= len(tok) and head.shape == emb.shape
    if fam.spare_rows:  # Phi-2 / StableLM-2 / Qwen2: room already there, nothing resized
        assert rows == rows_saved and rows_saved >= len(tok)
    else:  # Llama / Gemma: one row per token, <image> forces a resize
        assert rows_saved == len(tok) - 1 and rows > rows_saved
    # Gemma and small Qwen2 tie the LM head to the embeddings; the resize keeps them tied.
    assert (head.data_ptr() == emb.data_ptr()) == fam.tie_word_embeddings
    assert model.config.vocab_size == rows
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([[tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.eos_token_id]])
        ).logits
    assert logits.shape == (1, 2, rows) and torch.isfinite(logits).all()


def test_build_is_deterministic(tmp_path, standins):
    again = build_llm("qwen2", tmp_path / "again")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (standins["qwen2"] / name).read_bytes(), name
    # Kept, not rebuilt, when asked again.
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert (
        build_llm("qwen2", again) == again
        and (again / "model.safetensors").stat().st_mtime_ns == stamp
    )
    with pytest.raises(
        ValueError, match="unknown LLM family 'qwen'; known: gemma, llama, phi, qwen2, stablelm"
    ):
        build_llm("qwen", tmp_path / "x")


# -- label masks on multi-turn conversations ------------------------------------------------------


def vicuna_pieces(end: str) -> list[tuple[str, bool]]:
    pieces = [(VICUNA_SYSTEM + " ", False)]
    for q, a in zip(QUESTIONS, ANSWERS):
        pieces += [(f"USER: {q} ASSISTANT:", False), (f" {a}{end}", True)]
    return pieces


def chatml_pieces() -> list[tuple[str, bool]]:
    pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False)]
    for q, a in zip(QUESTIONS, ANSWERS):
        pieces += [
            (f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{a}<|im_end|>", True),
            ("\n", False),
        ]
    return pieces


def gemma_chat_pieces() -> list[tuple[str, bool]]:
    # The tokenizer adds <bos> itself, so the "tokenizer" template drops the chat template's.
    pieces = []
    for q, a in zip(QUESTIONS, ANSWERS):
        pieces += [
            (f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n", False),
            (f"{a}<end_of_turn>", True),
            ("\n", False),
        ]
    return pieces


CASES = [
    ("llama", "vicuna", vicuna_pieces("</s>")),
    ("phi", "phi", vicuna_pieces("<|endoftext|>")),
    ("stablelm", "phi", vicuna_pieces("<|endoftext|>")),
    ("qwen2", "qwen2_base", vicuna_pieces("<|endoftext|>")),
    ("qwen2", "qwen2_instruct", vicuna_pieces("<|im_end|>")),
    ("qwen2", "chatml", chatml_pieces()),
    ("qwen2", "tokenizer", chatml_pieces()),
    ("gemma", "gemma", vicuna_pieces("<eos>")),
    ("gemma", "tokenizer", gemma_chat_pieces()),
]


def expected_labels(tok, pieces, image_id):
    """Reference ids/labels (after expanding each <image> to N_IMAGE ids) and the token range
    of each supervised piece, from tokenizing prefixes of the hand-written text."""
    text = "".join(p for p, _ in pieces)
    ids = tok(text)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    ranges, pos = [], 0
    for piece, supervised in pieces:
        if supervised:
            a, b = (
                len(tok(text[:pos])["input_ids"]),
                len(tok(text[: pos + len(piece)])["input_ids"]),
            )
            assert (
                ids[:b] == tok(text[: pos + len(piece)])["input_ids"]
            )  # prefixes tokenize as in the whole
            labels[a:b] = ids[a:b]
            ranges.append((a, b))
        pos += len(piece)
    images = [i for i, t in enumerate(ids) if t == image_id]
    shift = lambda i: i + (N_IMAGE - 1) * sum(j < i for j in images)  # noqa: E731
    out_ids = [t for t in ids for _ in range(N_IMAGE if t == image_id else 1)]
    out_labels = [
        lab for t, lab in zip(ids, labels) for _ in range(N_IMAGE if t == image_id else 1)
    ]
    return text, out_ids, out_labels, [(shift(a), shift(b)) for a, b in ranges]


@pytest.mark.parametrize("family, template, pieces", CASES, ids=[f"{f}-{t}" for f, t, _ in CASES])
def test_labels_are_exactly_answers_and_end_of_turn(toks, family, template, pieces):
    tok = toks[family]
    proc = processor(tok)
    # The expected positions come from tokenizing the whole text: single_pass (chunked is
    # compared with LLaVA's and TinyLLaVA's own rules in test_text_parity.py).
    enc = SampleEncoder(proc, get_template(template), max_length=4096, tokenization="single_pass")
    # The rendering is the hand-written text (for "tokenizer": the chat template's own).
    text, _ = enc.template.render(
        enc._turns({"id": "x", "conversations": CONVERSATION}), tok.eos_token
    )
    ref_text, ids, labels, ranges = expected_labels(tok, pieces, proc.image_token_id)
    assert text == ref_text
    out = enc.encode_train(
        {"id": f"{family}-{template}", "conversations": CONVERSATION}, [red_image()]
    )
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == labels
    lab = out["labels"].numpy()
    supervised = np.flatnonzero(lab != IGNORE_INDEX)
    assert supervised.tolist() == [i for a, b in ranges for i in range(a, b)]
    # Decoded, each supervised run is one answer and its end-of-turn, and nothing else.
    runs = np.split(supervised, np.flatnonzero(np.diff(supervised) != 1) + 1)
    expected = [p for p, sup in pieces if sup]
    assert len(runs) == len(ANSWERS) == len(expected)
    decoded = [tok.decode(out["input_ids"][r].tolist()) for r in runs]
    assert [d.strip() for d in decoded] == [e.strip() for e in expected]
    stop_id = tok.convert_tokens_to_ids(enc.template.stop_string(tok.eos_token))
    assert all(int(out["input_ids"][r[-1]]) == stop_id for r in runs)
    # The image span and everything that is not an answer stays unsupervised.
    assert (lab[out["input_ids"].numpy() == proc.image_token_id] == IGNORE_INDEX).all()
    assert int((out["input_ids"] == proc.image_token_id).sum()) == N_IMAGE


def test_chatml_and_tokenizer_template_agree_for_qwen2(toks):
    """The hand-written ChatML template and Qwen2's own chat template give the same text,
    spans and generation prompt."""
    tok = toks["qwen2"]
    turns = SampleEncoder(processor(tok), get_template("chatml"), 4096)._turns(
        {"id": "x", "conversations": CONVERSATION}
    )
    chatml, chat = get_template("chatml").bind(tok), get_template("tokenizer").bind(tok)
    assert chatml.render(turns, tok.eos_token) == chat.render(turns, tok.eos_token)
    prompt = turns[:-1]
    assert chatml.render(prompt, tok.eos_token, True) == chat.render(prompt, tok.eos_token, True)
    assert chat.render(prompt, tok.eos_token, True)[0].endswith("<|im_start|>assistant\n")
    assert chat.stop_string(tok.eos_token) == "<|im_end|>"


def test_gemma_chat_template_generation_prompt_and_single_bos(toks):
    tok = toks["gemma"]
    enc = SampleEncoder(processor(tok), get_template("tokenizer"), max_length=4096)
    out = enc.encode_prompt({"id": "p", "conversations": CONVERSATION[:3]}, [red_image()])
    ids = out["input_ids"].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids).endswith(
        "How many shapes are there?<end_of_turn>\n<start_of_turn>model\n"
    )
    # Gemma's chat template has no system role: a system turn is a malformed sample.
    from lmm.errors import SampleError

    with pytest.raises(SampleError, match="System role not supported") as info:
        enc.encode_train(
            {
                "id": "sys",
                "conversations": [{"from": "system", "value": "Be brief."}, *CONVERSATION],
            },
            [red_image()],
        )
    assert info.value.reason == "malformed" and "'sys'" in str(info.value)


@pytest.mark.parametrize(
    "family, end_of_turn", [("gemma", "<end_of_turn>"), ("qwen2", "<|im_end|>")]
)
def test_generation_stops_at_the_chat_templates_end_of_turn(toks, family, end_of_turn):
    """With the ``tokenizer`` template, generation (predict, chat, export, ``lmm test``) stops at
    the end-of-turn the chat template writes, not at eos alone; the datamodule's template is
    unbound and still gives it."""
    from types import SimpleNamespace

    from lmm.data.templates import stop_token_ids
    from lmm.train.module import LMMModule

    tok = toks[family]
    eot = tok.convert_tokens_to_ids(end_of_turn)
    assert eot != tok.unk_token_id
    # Gemma-it's eos is <eos>, so <end_of_turn> is an extra stop id; Qwen2-Instruct's eos is
    # <|im_end|> itself, so eos alone already stops there (no duplicate).
    expected = [] if eot == tok.eos_token_id else [eot]
    assert family != "gemma" or expected == [eot]
    unbound = get_template("tokenizer")
    assert stop_token_ids(tok, unbound) == expected
    assert stop_token_ids(tok, unbound.bind(tok)) == expected
    # The LightningModule's stop ids for validation/test, from the datamodule's (unbound) template.
    module = SimpleNamespace(
        model=SimpleNamespace(tokenizer=tok),
        trainer=SimpleNamespace(datamodule=SimpleNamespace(template=unbound)),
    )
    assert LMMModule._stop_token_ids(module) == expected


# -- mismatches --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_answer_boundary_inside_a_token_raises_naming_the_sample(toks, family):
    tok = toks[family]
    # " circle" is one token for every stand-in; an opener ending in "cir" splits it.
    assert len(tok("a circle", add_special_tokens=False)["input_ids"]) == 2
    bad = Template(
        name="split",
        user_format="USER: {text} ",
        assistant_open="ASSISTANT: cir",
        end_of_turn=tok.eos_token,
    )
    conv = [
        {"from": "human", "value": "<image>\nWhich shape?"},
        {"from": "gpt", "value": "cle"},
    ] + CONVERSATION[2:]
    with pytest.raises(TemplateMismatchError) as info:
        SampleEncoder(processor(tok), bad, max_length=4096).encode_train(
            {"id": f"bad-{family}", "conversations": conv}, [red_image()]
        )
    assert f"'bad-{family}'" in str(info.value) and "'split'" in str(info.value)


@pytest.mark.parametrize(
    "family, template",
    [("llama", "phi"), ("gemma", "chatml"), ("phi", "gemma"), ("llama", "qwen2_instruct")],
)
def test_end_of_turn_must_be_a_token_of_the_tokenizer(toks, family, template):
    # Caught once when the stage's encoder is built, before any sample is read.
    with pytest.raises(
        TemplateMismatchError, match=f"data.template: template '{template}' ends each answer with"
    ):
        SampleEncoder(processor(toks[family]), get_template(template), 4096)


@pytest.mark.parametrize("family", ["llama", "phi", "stablelm"])
def test_tokenizer_template_needs_a_chat_template(toks, family):
    with pytest.raises(
        TemplateMismatchError,
        match="template 'tokenizer' renders with the tokenizer's chat template.*has none",
    ):
        SampleEncoder(processor(toks[family]), get_template("tokenizer"), 4096)


CHATML_BODY = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_prefix_unstable_chat_template_is_an_error(toks):
    tok = copy.deepcopy(toks["qwen2"])
    # The header counts the turns: every longer rendering differs from the shorter ones.
    tok.chat_template = "{{ messages | length }} turns\n" + CHATML_BODY
    with pytest.raises(
        TemplateMismatchError,
        match="template 'tokenizer': the tokenizer's chat template is not prefix-stable",
    ):
        SampleEncoder(processor(tok), get_template("tokenizer"), 4096)
    # Unstable only from the third answer on (the check at bind time sees two): the sample is named.
    tok.chat_template = "{% if messages | length > 4 %}long\n{% endif %}" + CHATML_BODY
    enc = SampleEncoder(processor(tok), get_template("tokenizer"), 4096)
    short = enc.encode_train({"id": "two", "conversations": CONVERSATION[:4]}, [red_image()])
    assert (
        tok.decode(short["labels"][short["labels"] != IGNORE_INDEX])
        == "The circle is red.<|im_end|>There are three shapes.<|im_end|>"
    )
    with pytest.raises(
        TemplateMismatchError, match="sample 'three-turns': template 'tokenizer'.*not prefix-stable"
    ):
        enc.encode_train({"id": "three-turns", "conversations": CONVERSATION}, [red_image()])


# -- one training step of each family inside the LMM -----------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_backward_in_lmm(standins, tiny_models, family):
    from lmm.model.lmm import LMM
    from lmm.model.towers import VisionConfig

    torch.manual_seed(0)
    model = LMM(
        VisionConfig(name_or_path=str(tiny_models["vision"]), feature_layer=-1),
        LanguageConfig(name_or_path=str(standins[family])),
        connector="mlp2x_gelu",
    )
    tok = model.tokenizer
    proc = Processor(tok, model.vision.image_spec, model.num_image_tokens, model.image_token_id)
    enc = SampleEncoder(proc, get_template(FAMILIES[family].template), max_length=512)
    samples = [
        enc.encode_train({"id": "long", "conversations": CONVERSATION}, [red_image()]),
        enc.encode_train(
            {"id": "short", "conversations": CONVERSATION[:2]},
            [Image.new("RGB", (20, 20), (0, 0, 255))],
        ),
    ]
    batch = collate(samples, pad_id=tok.pad_token_id)
    loss = model(
        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
    )
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Gradient reaches the connector (through the image positions) and the LM's embeddings.
    assert model.connector.layers[0].weight.grad.abs().sum() > 0
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
