"""Conversation templates: render turns to text plus the character spans the loss covers.

Labels are derived from these spans after tokenization (see ``lmm.data.encode``), so a
template only has to say where each assistant answer starts and ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmm.registry import Registry

IMAGE_TOKEN = "<image>"
Role = Literal["system", "user", "assistant"]
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A conversation does not have the LLaVA schema or the turn structure a template needs."""


class NoAssistantTurnError(ConversationError):
    """A training conversation without any answer to learn from."""


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
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str) or msg.get("from") not in _ROLES:
            raise ConversationError(f"turn {i} must be {{'from': human|gpt|system, 'value': str}}, got {msg!r:.80}")
        turns.append(Turn(_ROLES[msg["from"]], msg["value"]))
    body = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ConversationError(f"turn {i} is {turn.role!r}, expected {expected!r} (turns must alternate)")
    return turns


@dataclass(frozen=True)
class Template:
    """A chat format given by a few strings.

    ``{eos}`` in ``end_of_turn`` is replaced by the tokenizer's eos token. The supervised
    span of an answer is ``assistant_open`` .. ``end_of_turn`` exclusive of the opener,
    i.e. the answer text and the end-of-turn string.

    Attributes:
        name: Registry name.
        system: Default system prompt (empty: none).
        system_format: How the system prompt is written.
        user_format: How a user turn is written (``{text}``).
        assistant_open: Text that starts an assistant turn (also the generation prompt).
        answer_prefix: Text between ``assistant_open`` and the answer; supervised.
        end_of_turn: Text that ends an assistant turn; supervised.
        images_only_prompt: Drop the user's words and keep only its ``<image>`` tokens
            (the ``plain`` pretraining format).
    """

    name: str
    system: str = ""
    system_format: str = "{text} "
    user_format: str = "{text}"
    assistant_open: str = ""
    answer_prefix: str = ""
    end_of_turn: str = "{eos}"
    images_only_prompt: bool = False

    def render(self, turns: list[Turn], eos: str, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
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

        system = turns[0].text if turns and turns[0].role == "system" else self.system
        if system and not self.images_only_prompt:
            emit(self.system_format.format(text=system))
        for turn in turns:
            if turn.role == "user":
                text = IMAGE_TOKEN * turn.text.count(IMAGE_TOKEN) if self.images_only_prompt else turn.text
                emit(self.user_format.format(text=text))
                emit(self.assistant_open)
            elif turn.role == "assistant":
                emit(self.answer_prefix + turn.text + self.end_of_turn.format(eos=eos), supervised=True)
        if not add_generation_prompt and not spans:
            raise NoAssistantTurnError("conversation has no assistant turn to learn from")
        if add_generation_prompt and turns[-1].role != "user":
            raise ConversationError("a generation prompt must end with a user turn")
        return "".join(parts), spans

    def stop_string(self, eos: str) -> str:
        return self.end_of_turn.format(eos=eos)


TEMPLATES: Registry[Template] = Registry("template")

# LLaVA's pretraining format: the image, then the caption; the prompt's words are dropped.
TEMPLATES.add("plain", Template(name="plain", images_only_prompt=True))

# Vicuna v1 format used by LLaVA-1.5 and TinyLLaVA's Llama recipes.
TEMPLATES.add(
    "vicuna",
    Template(
        name="vicuna",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        user_format="USER: {text} ",
        assistant_open="ASSISTANT:",
        answer_prefix=" ",
        end_of_turn="{eos}",
    ),
)


def get_template(name: str) -> Template:
    return TEMPLATES.get(name, option="data.template")
