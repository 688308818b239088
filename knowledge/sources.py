"""Human-readable citations for the seed files the plan and FAQ cite."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Source:
    key: str
    publisher: str
    url: str


@cache
def _sources() -> dict[str, Source]:
    with (Path(__file__).with_name("sources.toml")).open("rb") as fh:
        raw = tomllib.load(fh)
    return {k: Source(k, v.get("publisher", k), v.get("url", "")) for k, v in raw.items()}


def cite(keys: tuple[str, ...] | list[str]) -> list[Source]:
    """Known sources for the given seed keys; 'bot' and unknown keys are dropped."""
    table = _sources()
    return [table[k] for k in keys if k in table]
