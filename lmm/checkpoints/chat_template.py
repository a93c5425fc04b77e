"""The Jinja chat template an export writes: it renders messages as lmm's template does.

Message content may be a string (with ``<image>`` where the image goes) or a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts, the standard form processors
and serving frameworks send. Parts are joined with a newline, an image part being ``<image>``:
``[image, text]`` -> ``<image>\\ntext`` (LLaVA's placement), ``[text, image]`` ->
``text\\n<image>``, as ``PromptConventions.question_turn`` places images.
"""

from __future__ import annotations

import json

from lmm.constants import IMAGE_TOKEN
from lmm.data.templates import Template, TokenizerChatTemplate
from lmm.errors import ExportError

# Jinja: a message's content as one string (a string stays as it is; parts are joined).
_CONTENT_TEXT = (
    "{%- macro content_text(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if part['type'] == 'image' -%}{{ " + json.dumps(IMAGE_TOKEN) + " }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _lit(text: str) -> str:
    """A Jinja string literal (JSON escapes are Jinja escapes)."""
    return json.dumps(text)


def _emit(fmt: str, var: str) -> str:
    """Jinja that writes ``fmt`` with ``{text}`` replaced by the variable ``var``."""
    before, sep, after = fmt.partition("{text}")
    parts = [_lit(before)] + ([var, _lit(after)] if sep else [])
    return "{{ " + " + ".join(parts) + " }}"


def accepting_parts(chat_template: str) -> str:
    """A tokenizer's own chat template, preceded by a step that turns list content into the
    string it expects (such templates write ``message['content']`` as a string and fail on
    the parts list with ``TypeError: can only concatenate str (not "list") to str``)."""
    if chat_template.startswith(_CONTENT_TEXT):  # already converted (an export of an import)
        return chat_template
    return (
        _CONTENT_TEXT + "{%- set ns_parts = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- set ns_parts.messages = ns_parts.messages + [dict(message, content=content_text(message['content']))] -%}"
        "{%- endfor -%}"
        "{%- set messages = ns_parts.messages -%}" + chat_template
    )


def chat_template_for(template: Template, tokenizer=None) -> str:
    """A Jinja chat template that renders messages exactly as ``template.render`` does.

    The ``tokenizer`` template renders with the tokenizer's own chat template, which is kept
    (made to accept list content, see :func:`accepting_parts`). A ``system`` message replaces
    the default system prompt.
    """
    if isinstance(template, TokenizerChatTemplate):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ExportError(
                "data.template 'tokenizer': the tokenizer has no chat template to export"
            )
        return accepting_parts(tokenizer.chat_template)
    eot_before, eos_sep, eot_after = template.end_of_turn.partition("{eos}")
    end_of_turn = _lit(eot_before) + (" + eos_token + " + _lit(eot_after) if eos_sep else "")
    end_of_turn += " + " + _lit(template.after_turn)
    user_text = (
        _lit(IMAGE_TOKEN) + " * (text.split(" + _lit(IMAGE_TOKEN) + ") | length - 1)"
        if template.images_only_prompt
        else "text"
    )
    system = (
        ""
        if template.images_only_prompt
        else ("{%- if ns.system -%}" + _emit(template.system_format, "ns.system") + "{%- endif -%}")
    )
    return (
        _CONTENT_TEXT + "{%- set ns = namespace(system=" + _lit(template.system) + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = content_text(messages[0]['content']) -%}{%- endif -%}"
        + system
        + "{%- for message in messages -%}"
        "{%- set text = content_text(message['content']) -%}"
        "{%- if message['role'] == 'user' -%}"
        + _emit(template.user_format, user_text)
        + "{%- if not loop.last or add_generation_prompt -%}{{ "
        + _lit(template.assistant_open)
        + " }}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ " + _lit(template.answer_prefix) + " + text + " + end_of_turn + " }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
