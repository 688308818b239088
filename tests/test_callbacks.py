"""Every button kind has its own callback prefix: two kinds sharing one would route a press
to whichever router comes first (seen: a ticket's "which ticket?" choice and the account
request menu)."""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict

from aiogram.filters.callback_data import CallbackData

import handlers


def _callback_classes() -> list[type[CallbackData]]:
    for info in pkgutil.iter_modules(handlers.__path__):
        importlib.import_module(f"handlers.{info.name}")
    seen: list[type[CallbackData]] = []
    todo = list(CallbackData.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("handlers."):
            seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_callback_prefixes_are_unique() -> None:
    by_prefix: dict[str, list[str]] = defaultdict(list)
    classes = _callback_classes()
    assert len(classes) > 20  # the walk found the handlers' button kinds
    for cls in classes:
        by_prefix[cls.__prefix__].append(f"{cls.__module__}.{cls.__qualname__}")
    shared = {p: names for p, names in by_prefix.items() if len(names) > 1}
    assert not shared, shared
