"""Conversation templates: render turns to text plus the character spans the loss covers.

Labels are derived from these spans after tokenization (see ``lmm.data.encode``), so a
template only has to say where each assistant answer starts and ends.

Registry ``TEMPLATES`` (exact names): ``plain`` (pretraining as LLaVA and TinyLLaVA: caption
and newline) and ``plain_eos`` (caption and eos), the Vicuna-style chat format with each
family's end-of-turn (``vicuna`` = eos, for Llama; ``phi`` for Phi-2 and StableLM-2;
``gemma``; ``qwen2_base``; ``qwen2_instruct``), ``chatml`` (Qwen2-Instruct; answer and
``<|im_end|>`` supervised), ``chatml_onevision`` (LLaVA-OneVision's supervision of the same
text) and ``tokenizer`` (the tokenizer's own chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lmm.constants import IMAGE_TOKEN
from lmm.errors import ConversationError, NoAssistantTurnError, TemplateMismatchError
from lmm.registry import Registry

Role = Literal["system", "user", "assistant"]
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


def parse_conversation(conversations: object) -> list[Turn]:
    """LLaVA schema (``[{"from": "human"|"gpt", "value": str}, ...]``) -> turns.

    A leading system turn is allowed; after it user and assistant turns alternate,
    starting with the user.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("'conversations' must be a non-empty list")
    turns = []
    for i, msg in enumerate(conversations):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("value"), str)
            or msg.get("from") not in _ROLES
        ):
            raise ConversationError(
                f"turn {i} must be {{'from': human|gpt|system, 'value': str}}, got {msg!r:.80}"
            )
        turns.append(Turn(_ROLES[msg["from"]], msg["value"]))
    body = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ConversationError(
                f"turn {i} is {turn.role!r}, expected {expected!r} (turns must alternate)"
            )
    return turns


@dataclass(frozen=True)
class Template:
    """A chat format given by a few strings.

    ``{eos}`` in ``end_of_turn`` is replaced by the tokenizer's eos token. The supervised
    span of an answer is ``answer_prefix`` + answer + ``end_of_turn``: the opener before it
    and ``after_turn`` after it are not supervised (unless ``supervise_message``). The
    end-of-turn must be one token of the tokenizer (checked by :meth:`bind`), the token
    generation stops at (unless ``stop_at_end_of_turn`` is off).

    Attributes:
        name: Registry name.
        system: Default system prompt (empty: none).
        system_format: How the system prompt is written.
        user_format: How a user turn is written (``{text}``).
        assistant_open: Text that starts an assistant turn (also the generation prompt).
        answer_prefix: Text between ``assistant_open`` and the answer; supervised.
        end_of_turn: Text that ends an assistant turn; supervised.
        after_turn: Text after ``end_of_turn`` before the next turn (ChatML's newline); not
            supervised: the model stops at ``end_of_turn`` and never has to produce it.
        images_only_prompt: Drop the user's words and keep only its ``<image>`` tokens
            (the ``plain`` pretraining format).
        stop_at_end_of_turn: The end-of-turn is the token generation stops at, and must be
            one token. Off for ``plain``, whose captions end with a supervised newline that is
            no stop token: generation stops at eos only.
        supervise_message: Supervise the whole assistant message, ``assistant_open`` and
            ``after_turn`` included (LLaVA-NeXT's ``preprocess_qwen``).
        always_supervised: Texts of single tokens supervised wherever they occur, in every
            turn (LLaVA-NeXT's ``preprocess_qwen``: newline, ``<|im_start|>``, ``<|im_end|>``).
    """

    name: str
    system: str = ""
    system_format: str = "{text} "
    user_format: str = "{text}"
    assistant_open: str = ""
    answer_prefix: str = ""
    end_of_turn: str = "{eos}"
    after_turn: str = ""
    images_only_prompt: bool = False
    stop_at_end_of_turn: bool = True
    supervise_message: bool = False
    always_supervised: tuple[str, ...] = ()

    def bind(self, tokenizer: Any) -> Template:
        """This template checked against ``tokenizer`` (and, for templates that render with the
        tokenizer, holding it). Called once when a stage's encoder is built."""
        stop = self.stop_string(tokenizer.eos_token)
        if stop not in tokenizer.get_vocab():
            raise TemplateMismatchError(
                f"data.template: template {self.name!r} ends each answer with {stop!r}, which is not a "
                f"token of the tokenizer of {_tokenizer_name(tokenizer)!r} (its eos is {tokenizer.eos_token!r}); "
                f"choose the template of this model's family: {', '.join(TEMPLATES.names())}"
            )
        self.always_supervised_ids(tokenizer)
        return self

    def always_supervised_ids(self, tokenizer: Any) -> list[int]:
        """The ids of ``always_supervised``; each text must be one token of ``tokenizer``."""
        ids = []
        for text in self.always_supervised:
            one = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(one) != 1:
                raise TemplateMismatchError(
                    f"data.template: template {self.name!r} supervises {text!r} everywhere, but the tokenizer "
                    f"of {_tokenizer_name(tokenizer)!r} makes it {len(one)} tokens; it is meant for Qwen2's tokenizer"
                )
            ids.append(one[0])
        return ids

    def render(
        self, turns: list[Turn], eos: str, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render ``turns``; returns the text and the ``[start, end)`` spans to supervise."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0

        def emit(text: str, supervised: bool = False) -> None:
            nonlocal length
            if supervised:
                spans.append((length, length + len(text)))
            parts.append(text)
            length += len(text)

        opened = 0  # where the last assistant turn opened
        system = turns[0].text if turns and turns[0].role == "system" else self.system
        if system and not self.images_only_prompt:
            emit(self.system_format.format(text=system))
        for turn in turns:
            if turn.role == "user":
                text = (
                    IMAGE_TOKEN * turn.text.count(IMAGE_TOKEN)
                    if self.images_only_prompt
                    else turn.text
                )
                emit(self.user_format.format(text=text))
                opened = length
                emit(self.assistant_open)
            elif turn.role == "assistant":
                answer = self.answer_prefix + turn.text + self.end_of_turn.format(eos=eos)
                if self.supervise_message:
                    emit(answer + self.after_turn)
                    spans.append((opened, length))
                else:
                    emit(answer, supervised=True)
                    emit(self.after_turn)
        _check_roles(spans, turns, add_generation_prompt)
        return "".join(parts), spans

    def stop_string(self, eos: str) -> str:
        """What generation stops at: the end-of-turn, or eos where it is not a stop token."""
        return self.end_of_turn.format(eos=eos) if self.stop_at_end_of_turn else eos

    def end_of_turn_offset(self) -> int:
        """Characters between the end-of-turn and the end of a supervised span."""
        return len(self.after_turn) if self.supervise_message else 0


def _check_roles(
    spans: list[tuple[int, int]], turns: list[Turn], add_generation_prompt: bool
) -> None:
    if not add_generation_prompt and not spans:
        raise NoAssistantTurnError("conversation has no assistant turn to learn from")
    if add_generation_prompt and (not turns or turns[-1].role != "user"):
        raise ConversationError("a generation prompt must end with a user turn")


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# Two probe conversations: the end-of-turn of a chat template is what follows each answer.
_PROBE = [
    Turn("user", "Is it red?"),
    Turn("assistant", "yes"),
    Turn("user", "And now?"),
    Turn("assistant", "no"),
]


@dataclass(frozen=True)
class TokenizerChatTemplate(Template):
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``).

    An answer's supervised span is found by rendering prefixes of the conversation: it starts
    where the rendering of the turns before it with a generation prompt ends, and ends where
    the rendering through it ends, less trailing whitespace (so ChatML supervises
    ``answer<|im_end|>`` but not the newline after it, like the ``chatml`` template). This
    needs a prefix-stable chat template: rendering fewer turns must give a prefix of the
    rendering of more. A template that is not (e.g. one that rewrites earlier turns) is a
    ``TemplateMismatchError``. The end-of-turn is what the template writes after an answer,
    found once in :meth:`bind` from a probe conversation.

    ``system`` is empty by default, so the chat template's own default system prompt (if it
    has one) applies; a ``data.system_prompt`` is passed to it as a system message.
    A leading bos that the chat template writes is dropped from the text when the tokenizer
    adds bos itself, so the sequence does not start with two.

    Attributes:
        tokenizer: The bound tokenizer (None until :meth:`bind`).
        drop_bos: Remove a leading bos string from the rendering (set by :meth:`bind`).
    """

    tokenizer: Any = field(default=None, repr=False, compare=False)
    drop_bos: bool = False

    def bind(self, tokenizer: Any) -> TokenizerChatTemplate:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateMismatchError(
                f"data.template: template {self.name!r} renders with the tokenizer's chat template, but the "
                f"tokenizer of {_tokenizer_name(tokenizer)!r} has none; choose a named template: "
                f"{', '.join(n for n in TEMPLATES.names() if n != self.name)}"
            )
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        bound = replace(self, tokenizer=tokenizer, drop_bos=adds_bos)
        text, spans = bound.render(_PROBE, tokenizer.eos_token)
        answers = [t.text for t in _PROBE if t.role == "assistant"]
        ends = {
            text[s:e][text[s:e].find(a) + len(a) :].strip() for (s, e), a in zip(spans, answers)
        }
        if len(ends) != 1 or not next(iter(ends)):
            raise TemplateMismatchError(
                f"data.template: template {self.name!r}: the chat template of {_tokenizer_name(tokenizer)!r} "
                f"does not end every answer with the same non-empty end-of-turn (found {sorted(ends)!r}); "
                "a model trained on it could not learn where to stop"
            )
        # The derived end-of-turn must be one token, as for every template.
        return Template.bind(replace(bound, end_of_turn=ends.pop()), tokenizer)

    def stop_string(self, eos: str) -> str:
        if self.tokenizer is None:  # unbound: only eos is known to stop; bind() finds the real one
            return eos
        # The literal text the chat template writes after an answer (no {eos} field to fill).
        return self.end_of_turn

    def _chat(self, messages: list[dict[str, str]], generation: bool) -> str:
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except (
            TemplateError
        ) as err:  # the template's own raise_exception, e.g. "System role not supported"
            raise ConversationError(
                f"the tokenizer's chat template (template {self.name!r}) rejected the conversation: {err}"
            ) from None
        bos = self.tokenizer.bos_token
        if self.drop_bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    def render(
        self, turns: list[Turn], eos: str, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        if self.tokenizer is None:
            raise RuntimeError(
                f"template {self.name!r} must be bound to a tokenizer first: template.bind(tokenizer)"
            )
        messages = [{"role": t.role, "content": t.text} for t in turns]
        if self.system and (not turns or turns[0].role != "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        full = self._chat(messages, add_generation_prompt)
        spans: list[tuple[int, int]] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._chat(messages[:k], generation=True)
            through = self._chat(messages[: k + 1], generation=False)
            n = len(spans) + 1
            checks = (
                (before, through, f"the turns before answer {n}", f"the turns through answer {n}"),
                (through, full, f"the turns through answer {n}", "the whole conversation"),
            )
            for shorter, longer, short_name, long_name in checks:
                if not longer.startswith(shorter):
                    at = next(
                        (i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), len(longer)
                    )
                    raise TemplateMismatchError(
                        f"template {self.name!r}: the tokenizer's chat template is not prefix-stable: its rendering "
                        f"of {short_name} is not a prefix of its rendering of {long_name} (they differ at char {at}: "
                        f"{shorter[at : at + 20]!r} vs {longer[at : at + 20]!r}), so the answer cannot be located; "
                        "use a named template instead"
                    )
            start, end = len(before), len(through.rstrip())
            if message["content"].strip() not in through[start:end]:
                raise TemplateMismatchError(
                    f"template {self.name!r}: answer {n} does not appear where the tokenizer's chat "
                    f"template renders the assistant turn ({through[start:end]!r})"
                )
            spans.append((start, end))
        _check_roles(spans, turns, add_generation_prompt)
        return full, spans


TEMPLATES: Registry[Template] = Registry("template")

# Pretraining: the image, then the caption; the prompt's words are dropped. The caption is
# followed by a supervised newline and no eos (LLaVA conversation.py::conv_llava_plain with
# train.py::preprocess_plain; TinyLLaVA pretrain_template.py).
TEMPLATES.add(
    "plain",
    Template(name="plain", images_only_prompt=True, end_of_turn="\n", stop_at_end_of_turn=False),
)
# lmm's own pretraining target: caption + eos, so a stage-1 model learns where to stop.
TEMPLATES.add("plain_eos", Template(name="plain_eos", images_only_prompt=True))

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_style(name: str, end_of_turn: str) -> Template:
    """The Vicuna v1 format LLaVA-1.5 and TinyLLaVA use (``SYSTEM USER: q ASSISTANT: a<end>``),
    with a family's own end-of-turn token."""
    return Template(
        name=name,
        system=VICUNA_SYSTEM,
        user_format="USER: {text} ",
        assistant_open="ASSISTANT:",
        answer_prefix=" ",
        end_of_turn=end_of_turn,
    )


# Vicuna with the tokenizer's eos: Llama / TinyLlama (TinyLLaVA's "llama" template, "</s>").
TEMPLATES.add("vicuna", vicuna_style("vicuna", "{eos}"))
# TinyLLaVA's per-family variants: the same turns, each family's end-of-turn token.
TEMPLATES.add("phi", vicuna_style("phi", "<|endoftext|>"))  # Phi-2 and StableLM-2
TEMPLATES.add("gemma", vicuna_style("gemma", "<eos>"))
TEMPLATES.add("qwen2_base", vicuna_style("qwen2_base", "<|endoftext|>"))
TEMPLATES.add("qwen2_instruct", vicuna_style("qwen2_instruct", "<|im_end|>"))

# ChatML as Qwen2/Qwen2.5-Instruct are trained on; the newline after <|im_end|> is not supervised.
TEMPLATES.add(
    "chatml",
    Template(
        name="chatml",
        system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{text}<|im_end|>\n",
        user_format="<|im_start|>user\n{text}<|im_end|>\n",
        assistant_open="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        after_turn="\n",
    ),
)

# LLaVA-OneVision's Qwen turns (LLaVA-NeXT train.py::preprocess_qwen): the same text as
# `chatml`, but each whole assistant message is supervised (header and trailing newline too),
# and every newline, <|im_start|> and <|im_end|> token in every turn.
TEMPLATES.add(
    "chatml_onevision",
    replace(
        TEMPLATES.get("chatml"),
        name="chatml_onevision",
        supervise_message=True,
        always_supervised=("\n", "<|im_start|>", "<|im_end|>"),
    ),
)

# Whatever the tokenizer's chat_template says (Qwen2-Instruct, Gemma-it, TinyLlama-Chat, ...).
TEMPLATES.add("tokenizer", TokenizerChatTemplate(name="tokenizer"))


def get_template(name: str) -> Template:
    return TEMPLATES.get(name, option="data.template")


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """The template's end-of-turn token id (besides eos), e.g. ``<|im_end|>`` for ChatML.

    The template is bound to ``tokenizer`` here (binding a bound template is harmless), since
    only a bound ``tokenizer`` template knows its end-of-turn (e.g. Gemma-it's ``<end_of_turn>``);
    unbound it would give eos alone."""
    stop = template.bind(tokenizer).stop_string(tokenizer.eos_token)
    if stop and stop != tokenizer.eos_token and stop in tokenizer.get_vocab():
        return [tokenizer.convert_tokens_to_ids(stop)]
    return []
