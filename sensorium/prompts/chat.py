"""Wrapping a rating prompt the way the model was tuned to read it.

Instruct models answer reliably only in the conversation format they were tuned on; the same
text given raw tends to be continued rather than answered. Base models have no chat template
and get the text unchanged.
"""

from __future__ import annotations

from typing import Any

from sensorium.errors import InvalidArgument
from sensorium.prompts.template import PromptTemplate

# Stands in for the word while the chat template is applied; no tokenizer template contains it.
_SENTINEL = "@@SENSORIUM_WORD_9c41e7@@"


def chat_prompt(text: str, tokenizer: Any) -> str:
    """``text`` as a single user turn followed by the assistant's cue, or unchanged without a chat template.

    ``tokenizer`` is duck-typed (a transformers tokenizer, or ``None``) so that this module never
    imports transformers.
    """
    if not getattr(tokenizer, "chat_template", None):
        return text
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(out, str):
        raise InvalidArgument(f"the tokenizer's chat template returned {type(out).__name__}, expected text")
    return out


def split_for_prefix(template: PromptTemplate, tokenizer: Any) -> tuple[str, str]:
    """The full model input before and after the word, chat formatting included.

    The part before the word is the same for every word, so the extractor tokenises and encodes
    it once. It is found by rendering a sentinel rather than formatting the template's own prefix,
    because a chat template wraps the whole message and may add text on both sides.
    """
    full = chat_prompt(template.render(_SENTINEL), tokenizer)
    pieces = full.split(_SENTINEL)
    if len(pieces) != 2:
        raise InvalidArgument(
            f"the chat template repeats or drops the message text ({len(pieces) - 1} copies of the word); "
            "cannot split it around the word"
        )
    return pieces[0], pieces[1]
