"""SampleEncoder: labels from assistant spans, <image> expansion, truncation, error reasons.

Expected token positions are computed here independently of the encoder: the text is
assembled by hand from its pieces, and the index of a character position is the number of
tokens the tokenizer gives for the text before it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    TOKENS_PER_IMAGE,
    VICUNA_SYSTEM,
    json_bytes,
    make_processor,
    png_bytes,
)
from PIL import Image

from lmm.data.encode import IGNORE_INDEX, SampleEncoder
from lmm.data.templates import Template, get_template
from lmm.errors import SampleError, TemplateMismatchError, UnsafeShardError

EOS = "</s>"


def red_image(size: int = 20) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 30, 30))


def conv(*pairs, first_image: bool = True):
    """LLaVA conversation from (question, answer) pairs; answer None leaves the turn out."""
    out = []
    for i, (q, a) in enumerate(pairs):
        out.append({"from": "human", "value": (f"<image>\n{q}" if i == 0 and first_image else q)})
        if a is not None:
            out.append({"from": "gpt", "value": a})
    return out


def n_tokens(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def expected_encoding(tok, pieces: list[tuple[str, bool]], image_id: int, n_image: int):
    """Independent reference: ids/labels of the hand-assembled text; returns also the
    [start, end) token ranges (after image expansion) of each supervised piece."""
    text = "".join(p for p, _ in pieces)
    ids = tok(text)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    ranges = []
    pos = 0
    for piece, supervised in pieces:
        if supervised:
            a, b = n_tokens(tok, text[:pos]), n_tokens(tok, text[: pos + len(piece)])
            # Sanity of the method: the prefix tokenizes to the first tokens of the whole text.
            assert ids[:a] == tok(text[:pos])["input_ids"]
            labels[a:b] = ids[a:b]
            ranges.append((a, b))
        pos += len(piece)
    # Expand every <image> id to n_image ids (labels stay ignored), shifting later ranges.
    out_ids, out_labels, shift_at = [], [], []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if t == image_id:
            out_ids += [t] * n_image
            out_labels += [IGNORE_INDEX] * n_image
            shift_at.append(i)
        else:
            out_ids.append(t)
            out_labels.append(lab)
    shifted = [
        (
            a + (n_image - 1) * sum(i < a for i in shift_at),
            b + (n_image - 1) * sum(i < b for i in shift_at),
        )
        for a, b in ranges
    ]
    return out_ids, out_labels, shifted


@pytest.fixture(scope="module")
def proc(tokenizer, image_spec):
    return make_processor(tokenizer, image_spec)


@pytest.fixture(scope="module")
def proc4(tokenizer, image_spec):
    """A processor with 4 tokens per image: small numbers for the truncation tests."""
    return make_processor(tokenizer, image_spec, num_image_tokens=4)


# -- labels and image expansion ----------------------------------------------------------------


def test_vicuna_labels_cover_exactly_the_answers(proc, tokenizer):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    meta = {
        "id": "s1",
        "conversations": conv(("What color is the circle?", "red"), ("Is there a square?", "No")),
    }
    out = enc.encode_train(meta, [red_image()])
    pieces = [
        (VICUNA_SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT:", False),
        (" red</s>", True),
        ("USER: Is there a square? ASSISTANT:", False),
        (" No</s>", True),
    ]
    ids, labels, ranges = expected_encoding(
        tokenizer, pieces, proc.image_token_id, TOKENS_PER_IMAGE
    )
    assert out["id"] == "s1"
    assert out["input_ids"].dtype == torch.int64 and out["labels"].dtype == torch.int64
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == labels
    # Each supervised range decodes to the answer (with its leading space) plus eos, and is
    # the only place where labels are set.
    lab = out["labels"].numpy()
    assert [tokenizer.decode(out["input_ids"][a:b]) for a, b in ranges] == [" red</s>", " No</s>"]
    supervised = np.flatnonzero(lab != IGNORE_INDEX).tolist()
    assert supervised == [i for a, b in ranges for i in range(a, b)]
    assert all(out["input_ids"][a:b].tolist()[-1] == tokenizer.eos_token_id for a, b in ranges)
    assert (lab[supervised] == out["input_ids"].numpy()[supervised]).all()
    # Two answers of one word + eos each: " red" / " No" are single tokens after ":".
    assert sum(b - a for a, b in ranges) == len(supervised) >= 4


def test_plain_eos_labels_cover_caption_and_eos(proc, tokenizer):
    enc = SampleEncoder(proc, get_template("plain_eos"), max_length=512)
    caption = "a red circle in the center."
    meta = {"id": "p1", "conversations": conv(("Describe the image briefly.", caption))}
    out = enc.encode_train(meta, [red_image()])
    ids, labels, ranges = expected_encoding(
        tokenizer,
        [("<image>", False), (caption + EOS, True)],
        proc.image_token_id,
        TOKENS_PER_IMAGE,
    )
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == labels
    N = TOKENS_PER_IMAGE
    # Layout: <s>, N image ids, caption tokens, </s>; everything but the caption and eos ignored.
    assert out["input_ids"][0] == tokenizer.bos_token_id
    assert out["input_ids"][1 : 1 + N].tolist() == [proc.image_token_id] * N
    assert ranges == [(1 + N, len(ids))]
    assert (out["labels"][: 1 + N] == IGNORE_INDEX).all()
    assert (out["labels"][1 + N :] == out["input_ids"][1 + N :]).all()
    assert tokenizer.decode(out["input_ids"][1 + N :]) == caption + EOS


def test_plain_labels_cover_caption_and_newline_without_eos(proc, tokenizer):
    """LLaVA train.py::preprocess_plain (conv_llava_plain, sep "\n") and TinyLLaVA
    pretrain_template.py: the text is "<image>" + caption + "\n", tokenized piece by piece
    around the image (mm_utils.py::tokenizer_image_token: one bos), and every token after the
    image is supervised; no eos."""
    enc = SampleEncoder(proc, get_template("plain"), max_length=512)
    caption = "a red circle in the center."
    meta = {"id": "p1", "conversations": conv(("Describe the image briefly.", caption))}
    out = enc.encode_train(meta, [red_image()])
    N = TOKENS_PER_IMAGE
    after = tokenizer(caption + "\n")["input_ids"]
    assert after[0] == tokenizer.bos_token_id  # the piece's own bos, dropped by the reference
    ids = [tokenizer.bos_token_id] + [proc.image_token_id] * N + after[1:]
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == [IGNORE_INDEX] * (1 + N) + after[1:]
    assert tokenizer.decode(out["input_ids"][1 + N :]) == caption + "\n"
    assert tokenizer.eos_token_id not in out["input_ids"].tolist()


def test_image_expands_to_n_ids_at_its_position(proc, tokenizer, image_spec):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    meta = {"id": "s2", "conversations": conv(("What color is the circle?", "red"))}
    out = enc.encode_train(meta, [red_image()])
    ids = out["input_ids"]
    N = TOKENS_PER_IMAGE
    p = n_tokens(tokenizer, VICUNA_SYSTEM + " USER: ")  # tokens before the <image>
    is_img = (ids == proc.image_token_id).nonzero().flatten().tolist()
    assert is_img == list(range(p, p + N))
    assert (out["labels"][p : p + N] == IGNORE_INDEX).all()
    # The tokens around the span are the text's own neighbours of "<image>".
    assert tokenizer.decode(ids[:p]).endswith("USER: ")
    assert tokenizer.decode(ids[p + N : p + N + 1]) == "\n"
    # Pixels: one image, resized to the tower's size and normalised with its mean/std (0.5/0.5).
    pv = out["pixel_values"]
    assert pv.shape == (1, 3, image_spec.size, image_spec.size)
    expected = [(c / 255 - 0.5) / 0.5 for c in (200, 30, 30)]
    for ch in range(3):
        assert torch.allclose(pv[0, ch], torch.full_like(pv[0, ch], expected[ch]), atol=1e-6)


def test_image_count_mismatch(proc):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    meta = {"id": "m1", "conversations": conv(("q", "a"))}  # one <image>
    for images in ([], [red_image(), red_image()]):
        with pytest.raises(SampleError) as info:
            enc.encode_train(meta, images)
        assert info.value.reason == "image_count"
        assert "'m1'" in str(info.value)
    # A text-only sample with an image attached is a mismatch too.
    with pytest.raises(SampleError) as info:
        enc.encode_train(
            {"id": "m2", "conversations": conv(("q", "a"), first_image=False)}, [red_image()]
        )
    assert info.value.reason == "image_count"
    # ... while a text-only sample without images is fine and has no pixels.
    out = enc.encode_train({"id": "m3", "conversations": conv(("q", "a"), first_image=False)}, [])
    assert out["pixel_values"].shape[0] == 0
    assert (out["input_ids"] != proc.image_token_id).all()


# -- truncation ------------------------------------------------------------------------------


def _second_turn_image(answer2: str = "red", q2: str = "<image>\nWhat color?"):
    return {
        "id": "t1",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": q2},
            {"from": "gpt", "value": answer2},
        ],
    }


def _first_image_pos(ids: torch.Tensor, image_id: int) -> int:
    return int((ids == image_id).nonzero()[0])


@pytest.mark.parametrize("into_span", [1, 2, 3])
def test_cut_inside_image_moves_to_span_start_and_drops_image(proc4, into_span):
    N = proc4.num_image_tokens
    full = SampleEncoder(proc4, get_template("vicuna"), max_length=10_000).encode_train(
        _second_turn_image(), [red_image()]
    )
    p = _first_image_pos(full["input_ids"], proc4.image_token_id)
    assert full["input_ids"][p : p + N].eq(proc4.image_token_id).all()
    out = SampleEncoder(proc4, get_template("vicuna"), max_length=p + into_span).encode_train(
        _second_turn_image(), [red_image()]
    )
    assert out["input_ids"].tolist() == full["input_ids"][:p].tolist()
    assert out["labels"].tolist() == full["labels"][:p].tolist()
    assert out["pixel_values"].shape == (0, 3, proc4.image_spec.size, proc4.image_spec.size)
    assert (out["input_ids"] != proc4.image_token_id).all()
    # The first answer (" Yes</s>") is still supervised.
    assert proc4.tokenizer.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == " Yes</s>"


def test_cut_at_span_end_keeps_image(proc4):
    N = proc4.num_image_tokens
    full = SampleEncoder(proc4, get_template("vicuna"), max_length=10_000).encode_train(
        _second_turn_image(), [red_image()]
    )
    p = _first_image_pos(full["input_ids"], proc4.image_token_id)
    for max_length in (p, p + N, p + N + 2):
        out = SampleEncoder(proc4, get_template("vicuna"), max_length=max_length).encode_train(
            _second_turn_image(), [red_image()]
        )
        assert out["input_ids"].tolist() == full["input_ids"][:max_length].tolist()
        assert out["labels"].tolist() == full["labels"][:max_length].tolist()
        assert out["pixel_values"].shape[0] == (0 if max_length == p else 1)


def test_cut_in_text_after_image_keeps_whole_span(proc4, tokenizer):
    N = proc4.num_image_tokens
    caption = "a red circle in the center and a blue square at the top left."
    meta = {"id": "c1", "conversations": conv(("Describe the image briefly.", caption))}
    full = SampleEncoder(proc4, get_template("plain"), max_length=10_000).encode_train(
        meta, [red_image()]
    )
    assert len(full["input_ids"]) > 1 + N + 3
    out = SampleEncoder(proc4, get_template("plain"), max_length=1 + N + 3).encode_train(
        meta, [red_image()]
    )
    assert len(out["input_ids"]) == 1 + N + 3
    assert out["input_ids"].tolist() == full["input_ids"][: 1 + N + 3].tolist()
    assert out["input_ids"][1 : 1 + N].eq(proc4.image_token_id).all()
    assert out["pixel_values"].shape[0] == 1
    # Only the first 3 caption tokens remain supervised.
    assert (out["labels"] != IGNORE_INDEX).sum() == 3
    assert caption.startswith(tokenizer.decode(out["labels"][1 + N :]))


def test_cut_inside_only_image_with_nothing_left_is_overlong(proc4):
    meta = {"id": "o1", "conversations": conv(("Describe.", "a red circle."))}
    with pytest.raises(SampleError) as info:
        SampleEncoder(proc4, get_template("plain"), max_length=3).encode_train(meta, [red_image()])
    assert info.value.reason == "overlong"
    assert "'o1'" in str(info.value)


def test_cut_between_adjacent_images_keeps_the_first(proc4):
    """Two images back to back form one run of 2N image ids; a cut in the second image
    must fall back to the boundary between them, not to the start of the first."""
    N = proc4.num_image_tokens
    meta = _second_turn_image(q2="<image><image>\nSame?", answer2="No")
    images = [red_image(), red_image()]
    # As written: LLaVA's placement would put a newline between the two images.
    kw = dict(image_placement="as_written")
    full = SampleEncoder(proc4, get_template("vicuna"), max_length=10_000, **kw).encode_train(
        meta, images
    )
    p = _first_image_pos(full["input_ids"], proc4.image_token_id)
    assert full["input_ids"][p : p + 2 * N].eq(proc4.image_token_id).all()
    assert full["pixel_values"].shape[0] == 2
    for max_length, kept_len, kept_images in (
        (p + N, p + N, 1),
        (p + N + 2, p + N, 1),
        (p + 2, p, 0),
        (p + 2 * N, p + 2 * N, 2),
    ):
        out = SampleEncoder(
            proc4, get_template("vicuna"), max_length=max_length, **kw
        ).encode_train(meta, images)
        assert len(out["input_ids"]) == kept_len, max_length
        assert out["input_ids"].tolist() == full["input_ids"][:kept_len].tolist()
        assert out["pixel_values"].shape[0] == kept_images
        assert int(out["input_ids"].eq(proc4.image_token_id).sum()) == kept_images * N


# -- template / tokenizer mismatch --------------------------------------------------------------


def test_slow_tokenizer_stops_the_stage_before_any_sample(tmp_path, image_spec):
    """A tokenizer with no fast version (transformers' CTRLTokenizer, a Python BPE loaded by
    AutoTokenizer) cannot give character offsets: the stage stops when its data is set up,
    naming the option, not on the first sample."""
    import json

    from transformers import CTRLTokenizer

    from lmm.data.datamodule import LMMDataModule
    from lmm.errors import ConfigError
    from lmm.model.language import LanguageConfig, load_tokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    CTRLTokenizer(vocab, merges, eos_token="</s>").save_pretrained(tmp_path / "slow")
    slow = load_tokenizer(LanguageConfig(name_or_path=str(tmp_path / "slow")))
    assert not hasattr(slow, "backend_tokenizer")
    proc = make_processor(slow, image_spec)
    with pytest.raises(ConfigError) as info:
        SampleEncoder(proc, get_template("plain"), max_length=64)
    msg = str(info.value)
    assert msg.startswith("model.llm.name_or_path: ") and str(tmp_path / "slow") in msg
    assert "no fast version" in msg and "tokenizer.json" in msg
    dm = LMMDataModule(train=[str(tmp_path / "none/shard-*.tar")], processor=proc)
    with pytest.raises(ConfigError, match="model.llm.name_or_path"):
        dm.train_dataloader()


def test_token_straddling_answer_boundary_raises_with_sample_id(proc):
    # The opener ends in the middle of a word: "ASSISTANT: cir" + "cle" tokenizes as one
    # token " circle", half prompt and half answer; no labelling can be right.
    assert proc.tokenizer.tokenize(": circle") == [":", "Ġcircle"]
    bad = Template(
        name="split", user_format="USER: {text} ", assistant_open="ASSISTANT: cir", answer_prefix=""
    )
    enc = SampleEncoder(proc, bad, max_length=512)
    meta = {"id": "sample-42", "conversations": conv(("Which shape?", "cle"), first_image=False)}
    with pytest.raises(TemplateMismatchError) as info:
        enc.encode_train(meta, [])
    msg = str(info.value)
    assert "'sample-42'" in msg and "'split'" in msg and "circle" in msg


def test_matching_boundaries_do_not_raise(proc, tokenizer):
    # Same words but the boundary at a space: " circle" is entirely the answer.
    ok = Template(
        name="ok", user_format="USER: {text} ", assistant_open="ASSISTANT:", answer_prefix=""
    )
    out = SampleEncoder(proc, ok, max_length=512).encode_train(
        {"id": "fine", "conversations": conv(("Which shape?", " circle"), first_image=False)}, []
    )
    assert tokenizer.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == " circle</s>"


# -- raw shard samples ---------------------------------------------------------------------------


def _raw(meta, **members):
    return {
        "__key__": meta.get("id", "k"),
        "__url__": "shard-x.tar",
        "json": json_bytes(meta),
        **members,
    }


def test_pickled_member_is_refused(proc):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    meta = {"id": "evil", "conversations": conv(("q", "a"))}
    for member in ("x.pyd", "pth", "weights.PKL"):
        with pytest.raises(UnsafeShardError) as info:
            enc.train_sample(_raw(meta, png=png_bytes(), **{member: b"\x80\x04K\x01."}))
        assert "'evil'" in str(info.value) and member in str(info.value)
    # The same sample without the pickled member encodes.
    assert enc.train_sample(_raw(meta, png=png_bytes()))["id"] == "evil"


@pytest.mark.parametrize(
    "png, reason",
    [
        (b"definitely not an image", "image_decode"),
        (png_bytes(size=64)[:60], "image_decode"),  # truncated file
        (b"", "image_decode"),
    ],
)
def test_corrupt_image_bytes(proc, png, reason):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    with pytest.raises(SampleError) as info:
        enc.train_sample(_raw({"id": "bad-img", "conversations": conv(("q", "a"))}, png=png))
    assert info.value.reason == reason
    assert "'bad-img'" in str(info.value)


def test_malformed_and_no_assistant_reasons(proc):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    cases = [
        ({"__key__": "k1", "png": png_bytes()}, "malformed"),  # no json member
        ({"__key__": "k2", "json": b"{not json", "png": png_bytes()}, "malformed"),
        ({"__key__": "k3", "json": b"[1, 2]", "png": png_bytes()}, "malformed"),
        (_raw({"id": "k4", "conversations": "hello"}, png=png_bytes()), "malformed"),
        (
            _raw({"id": "k5", "conversations": [{"from": "gpt", "value": "a"}]}, png=png_bytes()),
            "malformed",
        ),
        (_raw({"id": "k6", "conversations": conv(("q", None))}, png=png_bytes()), "no_assistant"),
    ]
    for raw, reason in cases:
        with pytest.raises(SampleError) as info:
            enc.train_sample(raw)
        assert info.value.reason == reason, raw["__key__"]
        assert raw["__key__"] in str(info.value)


def test_sample_id_defaults_to_key_and_images_sorted_by_member_name(proc):
    enc = SampleEncoder(proc, get_template("plain"), max_length=512)
    raw = {
        "__key__": "two",
        "json": json_bytes(
            {
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "x"},
                ]
            }
        ),
        "1.png": png_bytes((0, 0, 255)),
        "0.png": png_bytes((255, 0, 0)),
    }
    out = enc.train_sample(raw)
    assert out["id"] == "two"
    # 0.png (red) comes first: channel 0 is +1 (255 -> (1 - .5) / .5), blue -1.
    assert out["pixel_values"].shape[0] == 2
    assert torch.allclose(out["pixel_values"][0, 0], torch.ones(1)) and torch.allclose(
        out["pixel_values"][0, 2], -torch.ones(1)
    )
    assert torch.allclose(out["pixel_values"][1, 2], torch.ones(1)) and torch.allclose(
        out["pixel_values"][1, 0], -torch.ones(1)
    )


# -- prompts ------------------------------------------------------------------------------------


def test_prompt_is_everything_before_the_last_answer(proc, tokenizer):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512)
    meta = {
        "id": "q1",
        "conversations": conv(("What color is the circle?", "red")),
        "answer": "red",
    }
    out = enc.encode_prompt(meta, [red_image()])
    text = VICUNA_SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT:"
    ids, _, _ = expected_encoding(tokenizer, [(text, False)], proc.image_token_id, TOKENS_PER_IMAGE)
    assert out["input_ids"].tolist() == ids
    assert "labels" not in out
    assert out["meta"] is meta and out["pixel_values"].shape[0] == 1
    # A question-only sample gives the same prompt.
    meta2 = {"id": "q2", "conversations": conv(("What color is the circle?", None))}
    assert enc.encode_prompt(meta2, [red_image()])["input_ids"].tolist() == ids
    with pytest.raises(SampleError) as info:
        SampleEncoder(proc, get_template("vicuna"), max_length=len(ids) - 1).encode_prompt(
            meta2, [red_image()]
        )
    assert info.value.reason == "overlong"
    # The full prompt fits exactly at max_length == its length.
    assert len(
        SampleEncoder(proc, get_template("vicuna"), max_length=len(ids)).encode_prompt(
            meta2, [red_image()]
        )["input_ids"]
    ) == len(ids)


def test_blank_images_are_zero_pixels(proc):
    enc = SampleEncoder(proc, get_template("vicuna"), max_length=512, blank_images=True)
    out = enc.encode_train({"id": "b", "conversations": conv(("q", "a"))}, [red_image()])
    assert out["pixel_values"].shape[0] == 1 and out["pixel_values"].abs().sum() == 0
