"""Conversation parsing and template rendering: exact text and exact supervised character spans."""

from __future__ import annotations

import pytest
from conftest import VICUNA_SYSTEM

from lmm.data.templates import (
    TEMPLATES,
    Template,
    Turn,
    get_template,
    parse_conversation,
)
from lmm.errors import ConversationError, UnknownComponentError

EOS = "</s>"

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Is there a square?"},
    {"from": "gpt", "value": "No"},
]


def test_parse_conversation_maps_llava_roles():
    turns = parse_conversation(CONV)
    assert turns == [
        Turn("user", "<image>\nWhat color is the circle?"),
        Turn("assistant", "red"),
        Turn("user", "Is there a square?"),
        Turn("assistant", "No"),
    ]
    with_system = parse_conversation([{"from": "system", "value": "Be brief."}, *CONV[:2]])
    assert [t.role for t in with_system] == ["system", "user", "assistant"]
    # "user"/"assistant" are accepted as synonyms of "human"/"gpt".
    assert parse_conversation(
        [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]
    ) == [
        Turn("user", "q"),
        Turn("assistant", "a"),
    ]


def test_plain_eos_render_exact_text_and_spans():
    text, spans = get_template("plain_eos").render(parse_conversation(CONV), EOS)
    # The prompt's words are dropped: only its <image> survives; answers follow directly, each ended by eos.
    assert text == "<image>red</s>No</s>"
    # "<image>" is 7 chars; "red</s>" 7 chars; "No</s>" 6 chars.
    assert spans == [(7, 14), (14, 20)]
    assert [text[s:e] for s, e in spans] == ["red</s>", "No</s>"]


def test_plain_eos_render_ignores_system_prompt():
    conv = [{"from": "system", "value": "You are terse."}, *CONV[:2]]
    text, spans = get_template("plain_eos").render(parse_conversation(conv), EOS)
    assert text == "<image>red</s>"
    assert spans == [(7, 14)]


def test_plain_render_is_image_caption_newline():
    """LLaVA preprocess_plain: "<image>" + caption + conv_llava_plain.sep ("\n"), the caption and
    the newline supervised; generation stops at eos only (no stop token of its own)."""
    conv = [{"from": "system", "value": "You are terse."}, *CONV[:2]]
    text, spans = get_template("plain").render(parse_conversation(conv), EOS)
    assert text == "<image>red\n"
    assert [text[s:e] for s, e in spans] == ["red\n"]
    assert get_template("plain").stop_string(EOS) == EOS


def test_chatml_onevision_supervises_whole_assistant_messages():
    """LLaVA-NeXT preprocess_qwen: the text of ``chatml``; each assistant message from its
    ``<|im_start|>`` through the newline after ``<|im_end|>`` is supervised."""
    text, spans = get_template("chatml_onevision").render(parse_conversation(CONV), EOS)
    assert text == get_template("chatml").render(parse_conversation(CONV), EOS)[0]
    assert [text[s:e] for s, e in spans] == [
        "<|im_start|>assistant\nred<|im_end|>\n",
        "<|im_start|>assistant\nNo<|im_end|>\n",
    ]
    assert spans[-1][1] == len(text)
    assert get_template("chatml_onevision").stop_string(EOS) == "<|im_end|>"


def test_vicuna_render_exact_text_and_spans():
    text, spans = get_template("vicuna").render(parse_conversation(CONV), EOS)
    prefix1 = VICUNA_SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT:"
    middle = "USER: Is there a square? ASSISTANT:"
    assert text == prefix1 + " red</s>" + middle + " No</s>"
    s1 = len(prefix1)
    e1 = s1 + len(" red</s>")
    s2 = e1 + len(middle)
    e2 = s2 + len(" No</s>")
    assert e2 == len(text)
    assert spans == [(s1, e1), (s2, e2)]
    # The supervised text is exactly the answer prefix, the answer and the end of turn.
    assert [text[s:e] for s, e in spans] == [" red</s>", " No</s>"]
    # Nothing of the user turns or the "ASSISTANT:" opener is supervised.
    supervised = "".join(text[s:e] for s, e in spans)
    assert "USER" not in supervised and "ASSISTANT" not in supervised


def test_vicuna_explicit_system_turn_replaces_default():
    conv = [{"from": "system", "value": "Be brief."}, *CONV[:2]]
    text, spans = get_template("vicuna").render(parse_conversation(conv), EOS)
    assert text == "Be brief. USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"
    assert [text[s:e] for s, e in spans] == [" red</s>"]


def test_generation_prompt_ends_with_assistant_opener():
    turns = parse_conversation(CONV[:3])  # ends with a user turn
    text, spans = get_template("vicuna").render(turns, EOS, add_generation_prompt=True)
    assert text.endswith("USER: Is there a square? ASSISTANT:")
    assert spans == [
        (
            len(VICUNA_SYSTEM) + len(" USER: <image>\nWhat color is the circle? ASSISTANT:"),
            len(VICUNA_SYSTEM)
            + len(" USER: <image>\nWhat color is the circle? ASSISTANT: red</s>"),
        )
    ]
    with pytest.raises(ConversationError, match="end with a user turn"):
        get_template("vicuna").render(parse_conversation(CONV), EOS, add_generation_prompt=True)


def test_stop_string_is_the_end_of_turn():
    assert get_template("vicuna").stop_string(EOS) == EOS
    assert Template(name="x", end_of_turn="###{eos}").stop_string(EOS) == "###</s>"


@pytest.mark.parametrize(
    "conv, message",
    [
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
            "turn 1 is 'user', expected 'assistant'",
        ),
        (
            [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
            "turn 0 is 'assistant', expected 'user'",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}],
            "turn 1 is 'system', expected 'assistant'",
        ),
        ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "turn 1 must be"),
        ([{"from": "human"}], "turn 0 must be"),
        ([{"from": "human", "value": 3}], "turn 0 must be"),
        (["human: hi"], "turn 0 must be"),
        ([], "non-empty list"),
        ({"from": "human", "value": "a"}, "non-empty list"),
        (None, "non-empty list"),
    ],
)
def test_parse_conversation_errors(conv, message):
    with pytest.raises(ConversationError) as info:
        parse_conversation(conv)
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["plain", "vicuna"])
def test_conversation_without_assistant_turn_is_an_error(name):
    turns = parse_conversation([{"from": "human", "value": "<image>\nDescribe."}])
    with pytest.raises(ConversationError, match="no assistant turn"):
        get_template(name).render(turns, EOS)
    # A system turn alone has nothing to learn from either.
    with pytest.raises(ConversationError, match="no assistant turn"):
        get_template(name).render(parse_conversation([{"from": "system", "value": "s"}]), EOS)


def test_unknown_template_lists_known_ones():
    with pytest.raises(UnknownComponentError) as info:
        get_template("vicunaa")
    msg = str(info.value)
    assert "data.template" in msg and "'vicunaa'" in msg
    expected = [
        "chatml",
        "chatml_onevision",
        "gemma",
        "phi",
        "plain",
        "plain_eos",
        "qwen2_base",
        "qwen2_instruct",
        "tokenizer",
        "vicuna",
    ]
    assert "known: " + ", ".join(expected) in msg
    assert TEMPLATES.names() == expected


def test_datamodule_system_prompt_replaces_the_default():
    from lmm.data.datamodule import LMMDataModule

    turns = parse_conversation([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}])
    default, _ = LMMDataModule(template="vicuna").template.render(turns, "</s>")
    assert default.startswith("A chat between")
    none, spans = LMMDataModule(template="vicuna", system_prompt="").template.render(turns, "</s>")
    assert none == "USER: hi ASSISTANT: yo</s>" and [none[s:e] for s, e in spans] == [" yo</s>"]
    custom, _ = LMMDataModule(template="vicuna", system_prompt="Be brief.").template.render(
        turns, "</s>"
    )
    assert custom == "Be brief. USER: hi ASSISTANT: yo</s>"


@pytest.mark.parametrize(
    "name, end",
    [
        ("phi", "<|endoftext|>"),
        ("gemma", "<eos>"),
        ("qwen2_base", "<|endoftext|>"),
        ("qwen2_instruct", "<|im_end|>"),
    ],
)
def test_family_vicuna_variants_differ_only_in_end_of_turn(name, end):
    """TinyLLaVA's per-family templates: Vicuna turns, each family's own end-of-turn token."""
    text, spans = get_template(name).render(parse_conversation(CONV), EOS)
    vicuna_text, vicuna_spans = get_template("vicuna").render(parse_conversation(CONV), EOS)
    assert text == vicuna_text.replace(EOS, end)
    assert [text[s:e] for s, e in spans] == [" red" + end, " No" + end]
    shift = len(end) - len(EOS)
    assert spans == [
        (vicuna_spans[0][0], vicuna_spans[0][1] + shift),
        (vicuna_spans[1][0] + shift, vicuna_spans[1][1] + 2 * shift),
    ]
    # The literal end token, whatever the tokenizer's eos is.
    assert get_template(name).stop_string("</s>") == end


def test_chatml_render_exact_text_and_spans():
    text, spans = get_template("chatml").render(parse_conversation(CONV), EOS)
    p1 = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\n"
    )
    p2 = "\n<|im_start|>user\nIs there a square?<|im_end|>\n<|im_start|>assistant\n"
    assert text == p1 + "red<|im_end|>" + p2 + "No<|im_end|>\n"
    # The answer and <|im_end|> are supervised; the newline after <|im_end|> is not.
    s1 = len(p1)
    s2 = s1 + len("red<|im_end|>") + len(p2)
    assert spans == [(s1, s1 + len("red<|im_end|>")), (s2, s2 + len("No<|im_end|>"))]
    prompt, _ = get_template("chatml").render(
        parse_conversation(CONV[:3]), EOS, add_generation_prompt=True
    )
    assert prompt == p1 + "red<|im_end|>" + p2
    assert get_template("chatml").stop_string(EOS) == "<|im_end|>"


def test_tokenizer_template_needs_binding(tokenizer):
    template = get_template("tokenizer")
    with pytest.raises(RuntimeError, match="must be bound to a tokenizer"):
        template.render(parse_conversation(CONV), EOS)
    # Unbound, only eos is known to stop generation.
    assert template.stop_string(EOS) == EOS
    # The tiny Llama tokenizer has no chat template of its own.
    from lmm.errors import TemplateMismatchError

    with pytest.raises(
        TemplateMismatchError,
        match="has none; choose a named template: chatml, chatml_onevision, gemma",
    ):
        template.bind(tokenizer)
