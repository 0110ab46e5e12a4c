"""Which examples each rank trains on, in which micro-batch and accumulation window, epoch by epoch.

The order is a pure function of (seed, epoch): every rank computes the same global order and takes
its own slice, and a resumed run finds its place from the optimizer step alone. A global
micro-batch is `per_device_batch_size * world_size` consecutive examples of the epoch's order; rank
r takes every world_size-th of them starting at r, so one rank with a batch of 2B sees exactly the
examples that two ranks with B each see together. An optimizer step is a window of up to
`gradient_accumulation_steps` micro-batches; the epoch's last window may be shorter.

With `lengths` (train.group_by_length), the shuffled order is cut into mega-batches of
`MEGA_BATCH` optimizer steps; each is sorted by length, cut into steps, and its steps shuffled. A
batch then holds examples of similar length (little padding) while the order of steps stays random.
Mega-batches are measured in global batches, so the layouts that train alike still do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MEGA_BATCH = 50  # optimizer steps per length-sorted group


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True
    lengths: tuple[int, ...] | None = None  # per example: group batches by length

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        # The order is padded to a multiple of world_size, so every rank has the same count.
        padded = math.ceil(self.num_examples / self.world_size) * self.world_size
        return math.ceil(padded / (self.per_device_batch_size * self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.gradient_accumulation_steps)

    def total_steps(self, num_epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(num_epochs * self.steps_per_epoch))

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
            if self.lengths is not None:
                order = self.grouped_by_length(order, generator)
        else:
            order = list(range(self.num_examples))
        short = -len(order) % self.world_size
        return order + order[:short]  # repeat a few so that every rank has equal work

    def grouped_by_length(self, order: list[int], generator: torch.Generator) -> list[int]:
        step = self.global_batch_size
        grouped: list[int] = []
        for start in range(0, len(order), step * MEGA_BATCH):
            mega = sorted(order[start : start + step * MEGA_BATCH], key=lambda i: -self.lengths[i])
            steps = [mega[i : i + step] for i in range(0, len(mega), step)]
            whole = len(mega) // step  # a short last step stays last, where the epoch's short window is
            for j in [*torch.randperm(whole, generator=generator).tolist(), *range(whole, len(steps))]:
                grouped += steps[j]
        return grouped

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches for one epoch, as example indices."""
        order = self.epoch_order(epoch)
        span = self.per_device_batch_size * self.world_size
        return [order[start : start + span][self.rank :: self.world_size] for start in range(0, len(order), span)]

    @functools.lru_cache(maxsize=2)  # the loop asks once per step; the order changes once per epoch
    def windows(self, epoch: int) -> list[list[list[int]]]:
        """This rank's accumulation windows for one epoch: one list of micro-batches per optimizer step."""
        micro = self.micro_batches(epoch)
        ga = self.gradient_accumulation_steps
        return [micro[i : i + ga] for i in range(0, len(micro), ga)]
