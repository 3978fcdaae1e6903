"""Rating prompts shared by the extractor (which asks a model to rate words) and the trainer.

Both sides must build exactly the same text for a word, so the templates, their placeholder
rules and the chat formatting live in one place.
"""

from __future__ import annotations

from sensorium.prompts.builtin import available, default_template
from sensorium.prompts.chat import chat_prompt, split_for_prefix
from sensorium.prompts.files import PLACEHOLDERS, load_template, load_template_set
from sensorium.prompts.template import PromptTemplate

__all__ = [
    "PLACEHOLDERS", "PromptTemplate", "available", "chat_prompt", "default_template", "load_template",
    "load_template_set", "split_for_prefix",
]
