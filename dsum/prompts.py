"""Prompt templates per model family, rendered in three parts so that only the dialogue is ever cut."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from dsum.config import PromptConfig
from dsum.data import Example


@dataclass(frozen=True)
class PromptParts:
    """A prompt is `prefix + dialogue + suffix`: the prefix holds the instruction (and system prompt), the suffix
    cues the summary. Features tokenize the parts separately and shorten the dialogue alone. A few-shot prompt
    puts solved examples (the same template, followed by their summary) before it."""

    prefix: str
    dialogue: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.dialogue + self.suffix


# The course notebooks' FLAN-T5 prompt, word for word.
T5 = ("{instruction}\n\n", "\n\nSummary: ")
# Llama-2 chat format; the tokenizer adds <s> itself.
LLAMA2 = ("[INST] {instruction}\n\n", " [/INST] ")
LLAMA2_SYSTEM = ("[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction}\n\n", " [/INST] ")
PLAIN = ("{instruction}\n\n", "\n\nSummary:")


def render(template: str, prompt: PromptConfig, dialogue: str) -> PromptParts:
    """The prompt for one dialogue under `template` (t5, llama2 or plain)."""
    if template == "t5":
        prefix, suffix = T5
    elif template == "llama2":
        prefix, suffix = LLAMA2_SYSTEM if prompt.system else LLAMA2
    elif template == "plain":
        prefix, suffix = PLAIN
    else:  # the schema admits no other value
        raise ValueError(f"unknown prompt template {template!r}")
    return PromptParts(prefix.format(instruction=prompt.instruction, system=prompt.system or ""), dialogue, suffix)


def pick_shots(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """K solved examples for few-shot prompts: the same for every dialogue, fixed by the seed."""
    return [train[i] for i in random.Random(seed).sample(range(len(train)), min(k, len(train)))]


def summary_text(template: str, summary: str) -> str:
    """The target as it follows the prompt: causal templates that end without a space get one."""
    return " " + summary if template == "plain" else summary
