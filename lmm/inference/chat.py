"""``python -m lmm chat --ckpt DIR --image FILE``: a multi-turn conversation in the terminal.

Each line read from stdin is a user turn; the answer is printed on its own line. The whole
conversation is re-rendered with the checkpoint's template every turn (the image goes in the
first user turn, before or after the question as the checkpoint's ``image_position`` says), so
the model sees exactly the format it was trained on.

Commands: ``/image FILE`` switches to another image and starts a new conversation,
``/reset`` starts over with the same image, ``/help`` lists these, ``/quit`` or end of input
(Ctrl-D, or the end of a piped file) exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, TextIO

from PIL import Image

from lmm.data.prompts import PromptConventions
from lmm.errors import SampleError
from lmm.inference.predictor import Predictor

HELP = "commands: /image FILE (new image, new conversation), /reset, /help, /quit (or end of input)"


def load_image(path: str) -> Image.Image:
    """Read an image file fully (errors name the file)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path!r} does not exist") from None
    except OSError as err:
        raise OSError(f"image {path!r} is not readable ({err})") from None


@dataclass
class Conversation:
    """The turns so far (LLaVA schema) and the image they are about."""

    image: Optional[Image.Image] = None
    turns: list[dict] = field(default_factory=list)

    def with_question(self, text: str, conventions: PromptConventions) -> list[dict]:
        """The turns plus a new question; the first one carries the image, placed as the
        checkpoint's ``image_position`` says."""
        first = not self.turns
        value = conventions.question_turn(text, 1) if first and self.image is not None else text
        return self.turns + [{"from": "human", "value": value}]

    @property
    def images(self) -> list[Image.Image]:
        return [self.image] if self.image is not None else []


def chat_loop(
    predictor: Predictor,
    image: Optional[Image.Image],
    inp: TextIO,
    out: TextIO,
    err: TextIO,
    prompt: str = "",
) -> int:
    """Run the conversation until ``/quit`` or end of input; returns the number of answers.

    Answers go to ``out`` (one per line), notices to ``err``; ``prompt`` is written to ``out``
    before each read (an interactive terminal gets ``"USER: "``).
    """
    conv = Conversation(image)
    answered = 0
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        line = inp.readline()
        if not line:  # end of input
            if prompt:
                out.write("\n")
            return answered
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/quit", "/exit"):
                return answered
            if command == "/reset":
                conv.turns = []
                print("(conversation reset)", file=err, flush=True)
            elif command == "/image":
                if not arg.strip():
                    print("(usage: /image FILE)", file=err, flush=True)
                    continue
                try:
                    conv = Conversation(load_image(arg.strip()))
                except OSError as exc:
                    print(f"(error: {exc}; keeping the current image)", file=err, flush=True)
                    continue
                print(f"(image {arg.strip()}; new conversation)", file=err, flush=True)
            elif command == "/help":
                print(f"({HELP})", file=err, flush=True)
            else:
                print(f"(unknown command {command!r}; {HELP})", file=err, flush=True)
            continue
        turns = conv.with_question(text, predictor.conventions)
        try:
            sample = predictor.encode(turns, conv.images)
        except SampleError as exc:
            print(f"(cannot answer: {exc}; /reset to start over)", file=err, flush=True)
            continue
        answer = predictor.generate([sample])[0]
        print(answer, file=out, flush=True)
        conv.turns = turns + [{"from": "gpt", "value": answer}]
        answered += 1
