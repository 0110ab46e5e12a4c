"""Token features for training and generation: prompt tokens, label masks, truncation counts, padding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dsum import prompts
from dsum.config import Recipe, RecipeError
from dsum.data import Example

IGNORE_INDEX = -100
TOKENIZE_BATCH = 1024  # texts per tokenizer call


@dataclass
class Feature:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TruncationStats:
    examples: int = 0
    dialogues_truncated: int = 0
    summaries_truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "examples": self.examples,
            "dialogues_truncated": self.dialogues_truncated,
            "summaries_truncated": self.summaries_truncated,
        }


@dataclass
class Featurizer:
    """Turns examples into token ids under one recipe's template and budgets.

    Seq2seq: the encoder reads the prompt (+ EOS); the labels are the summary (+ EOS). Causal: one row reads
    BOS + prompt + summary + EOS; labels copy it with the BOS and prompt set to -100, so the loss falls on
    summary tokens alone. When a prompt is over budget only the dialogue is cut; when a summary is, its end is
    cut, never its start.

    `shots` are solved examples for few-shot prompts: as many as fit, in order, go before the prompt,
    and a dialogue that does not fit even alone is cut and gets none.
    """

    recipe: Recipe
    tokenizer: object
    shots: Sequence[Example] = ()
    stats: TruncationStats = field(default_factory=TruncationStats)

    def __post_init__(self) -> None:
        self.family = self.recipe.model.family
        self.template = self.recipe.template
        self.bos = [self.tokenizer.bos_token_id] if self.family == "causal" and self.tokenizer.bos_token_id is not None else []
        self.eos = self.tokenizer.eos_token_id
        if self.eos is None:
            raise RecipeError("tokenizer: it has no EOS token; summaries need one to end")
        self.shot_ids = self._ids_many([prompts.render(self.template, self.recipe.prompt, shot.dialogue).text
                                        + prompts.summary_text(self.template, shot.references[0]) + "\n\n\n"
                                        for shot in self.shots])

    def _ids_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text: each distinct text once, in batched tokenizer calls. A call per text
        costs about as much again in Python as the tokenizing itself, and every prompt repeats the same
        instruction and cue."""
        distinct = list(dict.fromkeys(t for t in texts if t))
        ids: dict[str, list[int]] = {}
        for start in range(0, len(distinct), TOKENIZE_BATCH):
            chunk = distinct[start : start + TOKENIZE_BATCH]
            ids.update(zip(chunk, self.tokenizer(chunk, add_special_tokens=False)["input_ids"]))
        return [ids[t] if t else [] for t in texts]

    def prompt_ids(self, dialogue: str) -> list[int]:
        """Prompt tokens with the dialogue cut to fit tokenizer.max_source_length, plus the family's specials."""
        return self.prompts_ids([dialogue])[0]

    def prompts_ids(self, dialogues: Sequence[str]) -> list[list[int]]:
        """`prompt_ids` of each dialogue, tokenized together."""
        parts = [prompts.render(self.template, self.recipe.prompt, d) for d in dialogues]
        prefixes, bodies, suffixes = (self._ids_many([getattr(p, name) for p in parts])
                                      for name in ("prefix", "dialogue", "suffix"))
        return [self._prompt(*row) for row in zip(prefixes, bodies, suffixes)]

    def _prompt(self, prefix: list[int], body: list[int], suffix: list[int]) -> list[int]:
        specials = len(self.bos) + (1 if self.family == "seq2seq" else 0)
        budget = self.recipe.tokenizer.max_source_length - len(prefix) - len(suffix) - specials
        if budget < 1:
            raise RecipeError(
                f"tokenizer.max_source_length: {self.recipe.tokenizer.max_source_length} tokens leave no room for the "
                f"dialogue after the {len(prefix) + len(suffix)}-token instruction; raise it"
            )
        if len(body) > budget:
            body = body[:budget]
            self.stats.dialogues_truncated += 1
        shots: list[int] = []
        for shot in self.shot_ids:
            if len(shots) + len(shot) > budget - len(body):
                break
            shots += shot
        ids = self.bos + shots + prefix + body + suffix
        return ids + [self.eos] if self.family == "seq2seq" else ids

    def summaries_ids(self, summaries: Sequence[str]) -> list[list[int]]:
        """Target tokens of each summary, cut to fit tokenizer.max_target_length with its EOS."""
        keep = self.recipe.tokenizer.max_target_length - 1
        out = []
        for ids in self._ids_many([prompts.summary_text(self.template, s) for s in summaries]):
            if len(ids) > keep:
                ids = ids[:keep]
                self.stats.summaries_truncated += 1
            out.append(ids + [self.eos])
        return out

    def training_feature(self, example: Example) -> Feature:
        return self.training_features([example])[0]

    def training_features(self, examples: Sequence[Example]) -> list[Feature]:
        self.stats.examples += len(examples)
        sources = self.prompts_ids([e.dialogue for e in examples])
        targets = self.summaries_ids([e.references[0] for e in examples])
        if self.family == "seq2seq":
            return [Feature(input_ids=source, labels=target) for source, target in zip(sources, targets)]
        return [Feature(input_ids=source + target, labels=[IGNORE_INDEX] * len(source) + target)
                for source, target in zip(sources, targets)]


@dataclass
class MicroBatch:
    """One micro-batch as the training loop takes it: the model's tensors, built on the host, and what
    the loop counts of it, worked out from the features in Python. Nothing here reads a tensor's value,
    which on a GPU would wait for the device to finish its queue."""

    tensors: dict[str, torch.Tensor]
    targets: int  # tokens the loss is taken over
    real_tokens: int  # non-padding positions computed: encoder + decoder targets (seq2seq), the row (causal)
    processed_tokens: int  # positions computed, padding included: the denominator of padding efficiency
    lengths: list[int]  # per example: its prompt (seq2seq encoder) or whole row (causal) tokens
    target_lengths: list[int]  # per example: its target tokens

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors on `device`. To a GPU they go from pinned memory without waiting: the copy is
        queued behind the work already there, and the host goes on to the next micro-batch."""
        if device.type != "cuda":
            return {key: value.to(device) for key, value in self.tensors.items()}
        return {key: value.pin_memory().to(device, non_blocking=True) for key, value in self.tensors.items()}


@dataclass
class Collator:
    """Pads a list of features to the longest row in it, or packs them into one row, rounded up to a
    multiple of `multiple` tokens; seq2seq batches get decoder inputs too.

    Packed (causal models, train.packing), the examples go end to end in one row whose `position_ids` restart at
    each example and with no attention mask, from which transformers masks attention to each example alone. An
    example's labels start with its masked prompt, so no loss crosses from one example into the next.

    `targets_only` (causal models whose head can run at chosen positions, see `dsum.loss.TokenLoss`):
    the batch also holds, per row, the positions whose next token is a target (`target_positions`) and
    those tokens (`target_labels`), padded with position 0 and -100 to the row with the most. They are
    worked out here, on the host, so that the loss never selects positions by a mask on the device
    (boolean indexing waits for the device to count the selected elements)."""

    pad_token_id: int
    decoder_start_token_id: int | None = None  # set for seq2seq models
    packed: bool = False
    targets_only: bool = False
    multiple: int = 1  # rows (or the packed row) padded to a multiple of this many tokens

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        if self.packed:
            rows = [[t for f in features for t in f.labels]]
            # The padding at the end of the row is one more example of its own, which attends to nothing real.
            tail = round_up(len(rows[0]), self.multiple) - len(rows[0])
            batch = {
                "input_ids": torch.tensor([[t for f in features for t in f.input_ids] + [self.pad_token_id] * tail]),
                "labels": torch.tensor([rows[0] + [IGNORE_INDEX] * tail]),
                "position_ids": torch.tensor([[i for f in features for i in range(len(f.input_ids))]
                                              + list(range(tail))]),
            }
        else:
            rows = [f.labels for f in features]
            batch = {
                "input_ids": pad([f.input_ids for f in features], self.pad_token_id, multiple=self.multiple),
                "attention_mask": pad([[1] * len(f.input_ids) for f in features], 0, multiple=self.multiple),
                "labels": pad(rows, IGNORE_INDEX, multiple=self.multiple),
            }
        if self.decoder_start_token_id is not None:
            batch["decoder_input_ids"] = shift_right(batch["labels"], self.decoder_start_token_id, self.pad_token_id)
        elif self.targets_only:
            # Position t predicts token t + 1.
            positions = [[t for t in range(len(row) - 1) if row[t + 1] != IGNORE_INDEX] for row in rows]
            batch["target_positions"] = pad(positions, 0)
            batch["target_labels"] = pad([[row[t + 1] for t in kept] for row, kept in zip(rows, positions)],
                                         IGNORE_INDEX)
        return batch

    def batch(self, features: Sequence[Feature]) -> MicroBatch:
        """The tensors and the counts of one micro-batch (see `MicroBatch`)."""
        seq2seq = self.decoder_start_token_id is not None
        lengths = [len(f.input_ids) for f in features]
        # A causal row's first token predicts nothing: position t predicts token t + 1.
        target_lengths = [sum(t != IGNORE_INDEX for t in (f.labels if seq2seq else f.labels[1:])) for f in features]
        if self.packed:
            processed = round_up(sum(lengths), self.multiple)
        else:
            processed = len(features) * round_up(max(lengths), self.multiple)
            if seq2seq:
                processed += len(features) * round_up(max(len(f.labels) for f in features), self.multiple)
        return MicroBatch(self(features), targets=sum(target_lengths),
                          real_tokens=sum(lengths) + (sum(target_lengths) if seq2seq else 0),
                          processed_tokens=processed, lengths=lengths, target_lengths=target_lengths)


def feature_tokens(feature: Feature, family: str) -> int:
    """Token positions the model computes for one example: encoder and decoder, or the one causal row."""
    return len(feature.input_ids) + (len(feature.labels) if family == "seq2seq" else 0)


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False, multiple: int = 1) -> torch.Tensor:
    """The rows as one tensor, padded with `value` to the longest row, rounded up to `multiple`."""
    width = round_up(max(len(r) for r in rows), multiple)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the start token, then the labels without their last token."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 0] = start_token_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)
