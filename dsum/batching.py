"""Which examples each rank trains on, in which micro-batch and accumulation window, epoch by epoch
(`BatchPlan`)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from dsum.config import TrainConfig
from dsum.features import round_up

MEGA_BATCH = 50  # optimizer steps per length-sorted group


@dataclass(frozen=True)
class BatchPlan:
    """The order is a pure function of (seed, epoch): every rank computes the same global order and takes its
    own slice, and a resumed run finds its place from the optimizer step alone. A global micro-batch is a run
    of consecutive examples of the epoch's order; rank r takes every world_size-th of them starting at r, so
    one rank with a batch of 2B sees exactly the examples that two ranks with B each see together. An
    optimizer step is a window of up to `gradient_accumulation_steps` micro-batches; the epoch's last window
    may be shorter.

    A micro-batch holds `per_device_batch_size` examples per rank, or, with a token budget
    (train.max_tokens_per_batch), as many as keep every rank's tokens within it. Tokens count padding: rows x
    the longest example, or, packed end to end (train.packing), the sum of the lengths, each rounded up to the
    multiple the rows are padded to (train.pad_to_multiple_of). An example longer than the budget trains
    alone.

    With train.group_by_length, the shuffled order is cut into mega-batches of `MEGA_BATCH` optimizer steps
    (by examples, or by tokens under a budget); each is sorted by length, cut into steps, and its steps
    shuffled. A batch then holds examples of similar length (little padding) while the order of steps stays
    random. Mega-batches are measured in global batches, so the layouts that train alike still do. Under a
    budget a mega-batch's last step may be short of windows, like an epoch's last.
    """

    num_examples: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True
    lengths: tuple[int, ...] | None = None  # tokens per example: for group_by_length and max_tokens
    group_by_length: bool = False
    max_tokens: int | None = None  # token budget of one rank's micro-batch, padding included
    packed: bool = False  # a micro-batch's tokens are the sum of its lengths, not rows x the longest
    multiple: int = 1  # lengths are padded up to a multiple of this
    _steps: dict[int, int] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if (self.group_by_length or self.max_tokens) and self.lengths is None:
            raise ValueError("grouping by length and token budgets need the examples' lengths")

    @property
    def global_batch_size(self) -> int | None:
        """Examples per optimizer step; None under a token budget, where it varies."""
        if self.max_tokens is not None:
            return None
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.world_size

    def steps_in_epoch(self, epoch: int) -> int:
        if self.max_tokens is None:  # the same every epoch
            # The order is padded to a multiple of world_size, so every rank has the same count.
            padded = math.ceil(self.num_examples / self.world_size) * self.world_size
            micro = math.ceil(padded / (self.per_device_batch_size * self.world_size))
            return math.ceil(micro / self.gradient_accumulation_steps)
        if epoch not in self._steps:
            self._steps[epoch] = len(self.global_windows(epoch))
        return self._steps[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of the first epoch (of every epoch, without a token budget)."""
        return self.steps_in_epoch(0)

    def total_steps(self, num_epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        whole, part = divmod(num_epochs, 1)
        steps = sum(self.steps_in_epoch(e) for e in range(int(whole)))
        return max(1, steps + math.ceil(part * self.steps_in_epoch(int(whole))))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index of the window in it) of the optimizer step that follows `step` steps."""
        epoch = 0
        while step >= (steps := self.steps_in_epoch(epoch)):
            step -= steps
            epoch += 1
        return epoch, step

    def epochs_done(self, step: int) -> float:
        epoch, index = self.locate(step)
        return epoch + index / self.steps_in_epoch(epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
            if self.group_by_length and self.max_tokens is None:
                order = self.grouped_by_length(order, generator)
        else:
            order = list(range(self.num_examples))
        short = -len(order) % self.world_size
        return order + order[:short]  # repeat a few so that every rank has equal work

    def grouped_by_length(self, order: list[int], generator: torch.Generator) -> list[int]:
        step = self.global_batch_size
        grouped: list[int] = []
        for start in range(0, len(order), step * MEGA_BATCH):
            mega = self.longest_first(order[start : start + step * MEGA_BATCH])
            steps = [mega[i : i + step] for i in range(0, len(mega), step)]
            grouped += [i for j in shuffled_keeping_last(steps, len(mega) // step, generator) for i in steps[j]]
        return grouped

    def longest_first(self, ids: list[int]) -> list[int]:
        return sorted(ids, key=lambda i: -self.lengths[i])

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches for one epoch, as example indices."""
        return [mb for window in self.windows(epoch) for mb in window]

    @functools.lru_cache(maxsize=2)  # the loop asks once per step; the order changes once per epoch
    def windows(self, epoch: int) -> list[list[list[int]]]:
        """This rank's accumulation windows for one epoch: one list of micro-batches per optimizer step."""
        return [[mb[self.rank :: self.world_size] for mb in window] for window in self.global_windows(epoch)]

    @functools.lru_cache(maxsize=2)
    def global_windows(self, epoch: int) -> list[list[list[int]]]:
        """The windows of all ranks together: each micro-batch holds every rank's examples, interleaved."""
        order = self.epoch_order(epoch)
        if self.max_tokens is None:
            span = self.per_device_batch_size * self.world_size
            return self.in_windows([order[start : start + span] for start in range(0, len(order), span)])
        if not (self.group_by_length and self.shuffle):
            return self.in_windows(self.cut_by_tokens(order))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        windows: list[list[list[int]]] = []
        for mega in self.token_mega_batches(order):
            steps = self.in_windows(self.cut_by_tokens(self.longest_first(mega)))
            whole = sum(len(w) == self.gradient_accumulation_steps for w in steps)
            windows += [steps[j] for j in shuffled_keeping_last(steps, whole, generator)]
        return windows

    def in_windows(self, micro: list[list[int]]) -> list[list[list[int]]]:
        ga = self.gradient_accumulation_steps
        return [micro[i : i + ga] for i in range(0, len(micro), ga)]

    def cut_by_tokens(self, order: list[int]) -> list[list[int]]:
        """Global micro-batches: runs of world_size examples (one per rank) that keep every rank within budget."""
        world = self.world_size
        batches: list[list[int]] = []
        current: list[int] = []
        for start in range(0, len(order), world):
            group = order[start : start + world]
            if current and self.tokens(current + group) > self.max_tokens:
                batches.append(current)
                current = []
            current += group
        return batches + [current] if current else batches

    def tokens(self, batch: list[int]) -> int:
        """The largest rank's tokens, padding included, in a global micro-batch."""
        ranks = [[self.lengths[i] for i in batch[r :: self.world_size]] for r in range(self.world_size)]
        return max(round_up(sum(rows), self.multiple) if self.packed else len(rows) * round_up(max(rows), self.multiple)
                   for rows in ranks if rows)

    def token_mega_batches(self, order: list[int]) -> list[list[int]]:
        """The order cut into runs of about MEGA_BATCH steps' tokens, each a multiple of world_size long."""
        span = MEGA_BATCH * self.gradient_accumulation_steps * self.world_size * self.max_tokens
        megas: list[list[int]] = [[]]
        filled = 0
        for start in range(0, len(order), self.world_size):
            if filled >= span:
                megas.append([])
                filled = 0
            group = order[start : start + self.world_size]
            megas[-1] += group
            filled += sum(self.lengths[i] for i in group)
        return megas


def training_plan(cfg: TrainConfig, lengths: list[int], world_size: int, rank: int,
                  max_tokens: int | None = None) -> BatchPlan:
    """The plan a recipe's train section asks for, over examples of these token lengths; `max_tokens` is
    the budget train.max_tokens_per_batch: auto settled on."""
    budget = max_tokens if cfg.max_tokens_per_batch == "auto" else cfg.max_tokens_per_batch
    if budget is None and cfg.max_tokens_per_batch is not None:
        raise ValueError("train.max_tokens_per_batch is auto: the plan needs the budget it settled on")
    return BatchPlan(len(lengths), cfg.per_device_batch_size, cfg.gradient_accumulation_steps, world_size, rank,
                     cfg.seed, lengths=tuple(lengths), group_by_length=cfg.group_by_length,
                     max_tokens=budget, packed=cfg.packing, multiple=cfg.padding_multiple)


def shuffled_keeping_last(items: list, whole: int, generator: torch.Generator) -> list[int]:
    """Indices of `items` with the first `whole` shuffled; a short remainder stays last, where it was."""
    return [*torch.randperm(whole, generator=generator).tolist(), *range(whole, len(items))]
