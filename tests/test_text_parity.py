"""Text parity with the reference code: token ids and labels of multi-turn conversations equal
what LLaVA, TinyLLaVA_Factory and LLaVA-NeXT compute, on real tokenizers.

The reference rules are written out below from the reference code (repository, file and
function cited at each): ``<image>`` placement, the prompt strings, LLaVA's
``tokenizer_image_token`` and the label-mask arithmetic of each template (round lengths,
``-2`` / ``-1`` corrections, the legacy switch), LLaVA-NeXT's per-message ChatML
tokenization with its unmasked tokens. lmm's encoder, with its defaults, must give the same
ids and labels. Tokenizers: Llama-2's real vocabulary in its hub (legacy) pipeline, and as
transformers 5 loads it for lmm (non-legacy); GPT-2's (Phi-2's BPE); Qwen2's
(``tests/real_tokenizers.py``). Gemma's rule runs on the Gemma stand-in (no real Gemma
tokenizer ships in a small registry package).

Commits read: haotian-liu/LLaVA c121f04, TinyLLaVA/TinyLLaVA_Factory 53f12c7,
LLaVA-VL/LLaVA-NeXT df17966.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import real_tokenizers
from PIL import Image

from lmm.constants import IMAGE_TOKEN
from lmm.data.encode import Processor, SampleEncoder
from lmm.data.templates import get_template
from lmm.model.language import LanguageConfig, load_tokenizer, prepare_tokenizer
from lmm.visual.image_spec import ImageSpec

IMAGE_TOKEN_INDEX = -200  # llava/constants.py (same in TinyLLaVA and LLaVA-NeXT)
IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# LLaVA-schema conversations: the image written after the question (LLaVA-Instruct style),
# before it, glued to the text; answers with digits, a newline and trailing punctuation.
CONVERSATIONS = [
    [
        ("What color is the circle?\n<image>", "The circle is red."),
        ("How many shapes are there?", "There are 3 shapes.\nTwo of them are blue."),
        ("Is there a square at the top left?", "No, there is not."),
    ],
    [("<image>\nDescribe the image briefly.", "A red circle and 2 blue squares on white.")],
    [("<image>Where is the square?", "Top left."), ("Are you sure?", "Yes: 100%.")],
]
CAPTIONS = ["a red circle next to two blue squares", "3 cats on a mat.", "Top: a sky; bottom: sea"]


def llava_conv(pairs) -> list[dict]:
    return [
        m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})
    ]


# -- the reference rules ----------------------------------------------------------------------------


def ref_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA ``llava/mm_utils.py::tokenizer_image_token`` (TinyLLaVA ``base.py``
    ``Template.tokenizer_image_token`` and LLaVA-NeXT's copy are the same): every piece between
    ``<image>`` tokenized alone with special tokens; if the first piece starts with bos, that
    bos is kept once and the first token of every piece is dropped; ``<image>`` -> -200."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<image>")]
    bos_first = bool(pieces and pieces[0] and pieces[0][0] == tokenizer.bos_token_id)
    out = pieces[0][:1] if bos_first else []
    for k, piece in enumerate(pieces):
        if k:
            out.append(IMAGE_TOKEN_INDEX)
        out += piece[1:] if bos_first else piece
    return out


def ref_llava_multimodal(value: str) -> str:
    """LLaVA ``llava/train/train.py::preprocess_multimodal`` (``mm_use_im_start_end`` False)."""
    if "<image>" in value:
        value = ("<image>" + "\n" + value.replace("<image>", "").strip()).strip()
    return value


def ref_next_multimodal(value: str) -> str:
    """LLaVA-NeXT ``llava/train/train.py::preprocess_multimodal``: only one ``<image>`` that is not
    already first is moved."""
    if value.count("<image>") == 1 and not value.startswith("<image>"):
        value = ("<image>" + "\n" + value.replace("<image>", "").strip()).strip()
    return value


def ref_mask_rounds(prompt, tokenizer, end, start, round_extra, instruction_cut, fix_after_first):
    """The round-by-round label masking of LLaVA ``preprocess_v1`` and TinyLLaVA
    ``Template.make_labels`` / ``_make_masks``: the prompt is split at the end-of-turn ``end``,
    each round at ``" ASSISTANT: "``; ``start`` leading tokens (bos) are masked; each
    instruction's tokens (``tokenizer_image_token`` of it, less ``instruction_cut``) are masked
    and the position moves on by the round's tokens (plus ``round_extra``); rounds after the
    first count one token less each when ``fix_after_first`` (the non-legacy fix). Returns ids,
    labels and whether the final position missed the length (the reference then masks all;
    TinyLLaVA counts eos tokens back in when pad == eos)."""
    ids = ref_tokenizer_image_token(prompt, tokenizer)
    labels = list(ids)
    total_len = sum(t != tokenizer.pad_token_id for t in labels)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        total_len += prompt.count(end)
    sep = " ASSISTANT: "
    cur_len = start
    labels[:start] = [IGNORE_INDEX] * start
    for i, rou in enumerate(prompt.split(end)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(ref_tokenizer_image_token(rou, tokenizer)) + round_extra
        instruction_len = len(ref_tokenizer_image_token(parts[0], tokenizer)) - instruction_cut
        if i != 0 and fix_after_first:
            round_len -= 1
            instruction_len -= 1
        labels[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * (len(labels) - cur_len)
    return ids, labels, cur_len != total_len


def ref_llava_v1(conv: list[dict], tokenizer, legacy: bool):
    """LLaVA ``llava/train/train.py::preprocess_v1`` (``--version v1``, has_image) with
    ``conversation.py::conv_vicuna_v1`` (sep_style TWO, sep " ", sep2 "</s>"): bos masked,
    ``round_len = len(rou)``, ``instruction_len = len(parts[0]) - 2``, both one less after the
    first round when ``not tokenizer.legacy`` (and tokenizers >= 0.14; 0.23 here). Its length
    check has no pad == eos case (Llama pads with unk)."""
    conv = [dict(m, value=ref_llava_multimodal(m["value"])) for m in conv]
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    prompt = VICUNA_SYSTEM + " "
    for i, m in enumerate(conv):  # Conversation.get_prompt, SeparatorStyle.TWO
        prompt += roles[m["from"]] + ": " + m["value"] + [" ", "</s>"][i % 2]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return ref_mask_rounds(prompt, tokenizer, "</s>", 1, 0, 2, not legacy)


# TinyLLaVA tinyllava/data/template/<name>_template.py: format_assistant's end, separator.
TLF_END = {
    "llama": "</s>",
    "phi": "<|endoftext|>",
    "gemma": "<eos>",
    "qwen2_base": "<|endoftext|>",
    "qwen2_instruct": "<|im_end|>",
}


def ref_tinyllava(conv: list[dict], tokenizer, name: str, legacy: bool = True):
    """TinyLLaVA ``tinyllava/data/template/base.py::Template.encode``: ``_prompt`` (system
    ``SYSTEM + " "``, ``"USER: {q} "``, ``"ASSISTANT: {a}" + end``; an image question becomes
    ``("<image>\\n" + q.replace("<image>", "").strip()).strip()``), ``tokenizer_image_token``,
    ``make_labels`` with the template's ``_make_masks``: ``llama_template.py`` and
    ``gemma_template.py`` mask the bos, ``round_len = len(rou) + 1 - 1``, ``instruction_len =
    len(parts[0]) - 1 - 1``, and ``llama`` has the non-legacy ``-1``; ``base.py`` (the others)
    starts at 0 with ``round_len = len(rou) + len(encode(end))``, ``instruction_len =
    len(parts[0]) - 1``."""
    end = TLF_END[name]
    questions = [m["value"] for m in conv if m["from"] == "human"]
    answers = [m["value"] for m in conv if m["from"] == "gpt"]
    prompt = ""
    for i, (q, a) in enumerate(zip(questions, answers)):
        if i == 0:
            prompt += VICUNA_SYSTEM + " "
        if "<image>" in q:
            q = ("<image>\n" + q.replace("<image>", "").strip()).strip()
        prompt += "USER: " + q + " " + "ASSISTANT: " + a + end
    if name in ("llama", "gemma"):
        return ref_mask_rounds(prompt, tokenizer, end, 1, 0, 2, name == "llama" and not legacy)
    return ref_mask_rounds(prompt, tokenizer, end, 0, len(tokenizer.encode(end)), 1, False)


def ref_plain(caption: str, tokenizer):
    """LLaVA ``llava/train/train.py::preprocess_plain`` with ``conv_llava_plain`` (sep "\\n"),
    = TinyLLaVA ``pretrain_template.py``: ``"<image>" + caption + "\\n"``, everything after the
    image supervised."""
    ids = ref_tokenizer_image_token("<image>" + caption + "\n", tokenizer)
    masked = len(ref_tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE_INDEX] * masked + ids[masked:], False


NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ref_preprocess_qwen(conv: list[dict], tokenizer):
    """LLaVA-NeXT ``llava/train/train.py::preprocess_qwen`` (``--version qwen_1_5``) after its
    ``preprocess_multimodal``: the system message "You are a helpful assistant.", each message
    tokenized alone by a plain ChatML chat template; assistant messages supervised whole; then
    every token 198 (newline), ``<|im_start|>`` and ``<|im_end|>`` supervised wherever it is.
    (``im_start, im_end = tokenizer.additional_special_tokens_ids`` there: Qwen2's two.)"""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NEXT_CHAT_TEMPLATE
    image_id = tok.convert_tokens_to_ids("<image>")
    unmask = [198, *tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])]

    def chat(role: str, content: str) -> list[int]:
        return tok.apply_chat_template(
            [{"role": role, "content": content}], tokenize=True, return_dict=False
        )

    ids = chat("system", "You are a helpful assistant.")
    labels = [IGNORE_INDEX] * len(ids)
    for m in conv:
        role = {"human": "user", "gpt": "assistant"}[m["from"]]
        part = chat(role, ref_next_multimodal(m["value"]))
        ids += part
        labels += [IGNORE_INDEX] * len(part) if role == "user" else part
    labels = [t if t in unmask else lab for t, lab in zip(ids, labels)]
    ids = [IMAGE_TOKEN_INDEX if t == image_id else t for t in ids]
    return ids, labels, False


# -- lmm ----------------------------------------------------------------------------------------


def lmm_encode(tokenizer, template: str, conv: list[dict], **options):
    """lmm's ids and labels, one id per image, the image id written as the reference's -200."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    spec = ImageSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    enc = SampleEncoder(
        Processor(tokenizer, spec, 1, image_id), get_template(template), 4096, **options
    )
    n_images = sum(m["value"].count(IMAGE_TOKEN) for m in conv if m["from"] == "human")
    out = enc.encode_train(
        {"id": "parity", "conversations": conv}, [Image.new("RGB", (8, 8))] * n_images
    )
    ids = [IMAGE_TOKEN_INDEX if t == image_id else t for t in out["input_ids"].tolist()]
    return ids, out["labels"].tolist()


def assert_same(tokenizer, ref, mine) -> None:
    ref_ids, ref_labels, mismatch = ref
    assert not mismatch, "the reference rule itself flagged a tokenization mismatch"
    ids, labels = mine
    show = lambda xs: tokenizer.convert_ids_to_tokens([x for x in xs if x >= 0])  # noqa: E731
    assert ids == ref_ids, (show(ids), show(ref_ids))
    sup = lambda labs: [t for t in labs if t != IGNORE_INDEX]  # noqa: E731
    assert labels == ref_labels, (show(sup(labels)), show(sup(ref_labels)))
    assert any(lab != IGNORE_INDEX for lab in labels)


PLACEMENT_CASES = [
    "What is this?\n<image>",
    "<image>\nWhat is this?",
    "<image>What is this?",
    "  What <image> is this?  ",
    "<image>",
    "\n<image>\n",
    "No image here.",
    "<image>\n<image>\nCompare them.",
    "Compare <image> and <image>.",
]


@pytest.mark.parametrize("text", PLACEMENT_CASES)
def test_image_placement_equals_the_references(text):
    from lmm.data.placement import place_images
    from lmm.data.templates import Turn

    turns = [Turn("user", text), Turn("assistant", "ok <image>")]
    next_ = place_images(turns, "llava_next")
    assert next_ == [Turn("user", ref_next_multimodal(text)), turns[1]]
    assert place_images(turns, "as_written") == turns
    llava = place_images(turns, "llava")[0].text
    if text.count("<image>") <= 1:
        assert llava == ref_llava_multimodal(text)
    else:  # LLaVA collapses them into one; lmm keeps one placeholder per image
        assert (
            llava == ("<image>\n" * text.count("<image>") + ref_llava_multimodal(text)[8:]).strip()
        )


# -- tokenizers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real tokenizers, ``<image>`` and pad added by lmm's own code."""
    missing = real_tokenizers.problems()
    if missing:
        pytest.skip(
            f"real tokenizers not fetched ({'; '.join(missing)}): run python tests/real_tokenizers.py --fetch"
        )
    # Llama-2 as transformers 5 loads a hub directory for lmm (tokenizer.json + config): its
    # LlamaTokenizer rebuilds the pipeline without the legacy prefix after special tokens.
    hub = tmp_path_factory.mktemp("llama2_hub")
    shutil.copy(real_tokenizers.CACHE / "llama2/tokenizer.json", hub / "tokenizer.json")
    (hub / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "legacy": False,
            }
        )
    )
    return {
        "llama2_legacy": prepare_tokenizer(real_tokenizers.llama2(), "llama2"),
        "llama2_v5": load_tokenizer(LanguageConfig(name_or_path=str(hub))),
        "gpt2": prepare_tokenizer(real_tokenizers.gpt2(), "gpt2"),
        "qwen2_instruct": prepare_tokenizer(real_tokenizers.qwen2(), "qwen2"),
        "qwen2_base": prepare_tokenizer(real_tokenizers.qwen2(instruct=False), "qwen2"),
    }


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The Gemma stand-in's tokenizer (SentencePiece kind, bos added, no prefix space)."""
    from lmm.standins.llm import build_llm

    path = build_llm("gemma", tmp_path_factory.mktemp("gemma"))
    return load_tokenizer(LanguageConfig(name_or_path=str(path)))


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["three_turns", "one_turn", "glued_image"])
def test_gemma_ids_and_labels_equal_tinyllavas_gemma_template(gemma, conv):
    conv = llava_conv(conv)
    assert_same(gemma, ref_tinyllava(conv, gemma, "gemma"), lmm_encode(gemma, "gemma", conv))


def test_real_tokenizers_are_the_known_vocabularies(real):
    """Ids everyone quotes: LLaVA-1.5's ``<image>``, ``▁``, ``<0x0A>`` after an image; GPT-2's and
    Qwen2's "Hello world" and newline; Qwen2's ChatML ids; OneVision's ``<image>`` id."""
    llama = real["llama2_legacy"]
    assert llama("Hello world").input_ids == [1, 15043, 3186]
    assert llama("USER: <image>\nWhat").input_ids[-4:] == [32000, 29871, 13, 5618]
    assert real["gpt2"]("Hello world\n").input_ids == [15496, 995, 198]
    qwen = real["qwen2_instruct"]
    assert qwen("Hello world\n").input_ids == [9707, 1879, 198]
    assert qwen.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    ) == [
        151643,
        151644,
        151645,
        151646,
    ]


# (lmm template, tokenizer, reference rule, legacy) per LLM family TinyLLaVA and LLaVA train.
CHAT_CASES = [
    ("vicuna", "llama2_legacy", "llava_v1", True),  # LLaVA-1.5 (Vicuna-v1.5)
    ("vicuna", "llama2_legacy", "llama", True),  # TinyLLaVA TinyLlama / OpenELM
    ("vicuna", "llama2_v5", "llava_v1", False),
    ("vicuna", "llama2_v5", "llama", False),
    ("phi", "gpt2", "phi", True),  # TinyLLaVA Phi-2 (and StableLM-2, same template)
    ("qwen2_base", "qwen2_base", "qwen2_base", True),
    ("qwen2_instruct", "qwen2_instruct", "qwen2_instruct", True),
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["three_turns", "one_turn", "glued_image"])
@pytest.mark.parametrize(
    "template, tokenizer, rule, legacy",
    CHAT_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CHAT_CASES],
)
def test_chat_ids_and_labels_equal_the_reference(real, conv, template, tokenizer, rule, legacy):
    tok = real[tokenizer]
    conv = llava_conv(conv)
    ref = (
        ref_llava_v1(conv, tok, legacy)
        if rule == "llava_v1"
        else ref_tinyllava(conv, tok, rule, legacy)
    )
    assert_same(tok, ref, lmm_encode(tok, template, conv))


@pytest.mark.parametrize("caption", CAPTIONS)
@pytest.mark.parametrize("tokenizer", ["llama2_legacy", "llama2_v5", "gpt2", "qwen2_instruct"])
def test_plain_ids_and_labels_equal_the_reference(real, caption, tokenizer):
    tok = real[tokenizer]
    conv = [
        {"from": "human", "value": "Describe the image.\n<image>"},
        {"from": "gpt", "value": caption},
    ]
    assert_same(tok, ref_plain(caption, tok), lmm_encode(tok, "plain", conv))


ONEVISION_CONVERSATIONS = [
    *CONVERSATIONS,
    [("<image>\n<image>\nWhich image has more circles?", "The first."), ("Why?", "It has 3.")],
    [("Compare <image> with <image>.", "Both are red.")],
]


@pytest.mark.parametrize("conv", ONEVISION_CONVERSATIONS)
def test_onevision_chatml_equals_preprocess_qwen(real, conv):
    tok = real["qwen2_instruct"]
    conv = llava_conv(conv)
    mine = lmm_encode(tok, "chatml_onevision", conv, image_placement="llava_next")
    assert_same(tok, ref_preprocess_qwen(conv, tok), mine)
