"""The unit every data source produces: one dialogue and its human reference summaries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    id: str
    dialogue: str
    references: tuple[str, ...]  # one or more human summaries; training uses references[0]
