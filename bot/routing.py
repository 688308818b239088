"""Cheaper routing through aiogram's router tree, with the same handler chosen every time.

aiogram finds an update's handler by walking every router in turn: per router an outer
middleware chain, a root filter call and a trigger loop; per handler a filter call through
its own call machinery, each filter awaited in turn (and plain functions in a worker
thread). With twelve routers and some hundred handlers that walk was the largest part of the
bot's CPU on a command like ``/unit``. Here, at assembly, each handler gets its cheap
*necessary conditions* (tests that need nothing but the event and the FSM state and never
wait), and a router whose every handler fails one of them is not entered at all. A failing
necessary condition means the handler's own filters refuse too, so which handler runs never
changes; ``tests/test_command_gate.py`` checks that over sample updates in every state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiogram import Dispatcher, Router
from aiogram.dispatcher.event.bases import UNHANDLED
from aiogram.dispatcher.event.handler import FilterObject, HandlerObject
from aiogram.filters import Command, StateFilter
from aiogram.filters.callback_data import CallbackQueryFilter
from aiogram.fsm.state import State, StatesGroup
from magic_filter import MagicFilter

from handlers.ui import TypedChoice


def accelerate(dp: Dispatcher) -> None:
    """Everything below, in the order it builds on: run sync filters inline, gate
    commands, pre-check handlers, skip routers. Idempotent (module routers are reused when
    a process builds a second dispatcher)."""
    _inline_sync_filters(dp)
    _gate_commands(dp)
    _pre_gate(dp)
    _skip_idle_routers(dp)


_last_event: list[Any] = [None, None]  # the event whose first word was split last, the word


def first_word(event: Any) -> str | None:
    """The first word of a message's text or caption. Remembered for the last event: every
    command gate of every router asks for it while one update is routed."""
    if _last_event[0] is event:
        return _last_event[1]
    text = getattr(event, "text", None) or getattr(event, "caption", None)
    head = text.split(maxsplit=1) if text else None
    word = head[0] if head else None
    _last_event[0], _last_event[1] = event, word
    return word


@dataclass(frozen=True, slots=True)
class CommandNeed:
    """What aiogram's Command parse requires of the first word: a prefix and a name."""

    prefixes: str
    names: frozenset[str]
    fold: bool

    def matches(self, event: Any) -> bool:
        head = first_word(event)
        if not head or head[0] not in self.prefixes:
            return False
        name = head[1:].partition("@")[0]
        return (name.casefold() if self.fold else name) in self.names


def command_gate(cmd: Command) -> Callable[[Any], Awaitable[bool]] | None:
    """A cheap necessary condition of ``cmd``: the first word's prefix and name, as aiogram's
    own parse takes them. A message for /unit otherwise ran the full Command parse (and a
    filter call) of every command handler in the routers before it, a tenth of its CPU.
    None when the filter has a regex command (no cheap test for it)."""
    if not all(isinstance(c, str) for c in cmd.commands):
        return None
    need = CommandNeed(cmd.prefix, frozenset(cmd.commands), cmd.ignore_case)  # type: ignore[arg-type]

    async def gate(_gated_event: Any, /) -> bool:
        return need.matches(_gated_event)

    gate.command_gate = need  # type: ignore[attr-defined]
    return gate


def _handlers(dp: Dispatcher, *, root: bool = False) -> Iterator[HandlerObject]:
    for router in dp.chain_tail:
        for observer in router.observers.values():
            if root:
                yield observer._handler
            yield from observer.handlers


def _gate_commands(dp: Dispatcher) -> None:
    """Put :func:`command_gate` first in every handler with a Command filter; a failed gate
    means the Command would fail too, so which handler runs never changes."""
    for handler in _handlers(dp):
        if any(getattr(f.callback, "command_gate", False) for f in handler.filters or ()):
            continue
        cmds = [f.callback for f in handler.filters or () if isinstance(f.callback, Command)]
        gates = [g for g in map(command_gate, cmds) if g is not None]
        if gates and handler.filters is not None:
            handler.filters[:0] = [FilterObject(callback=g) for g in gates]


def _inline_sync_filters(dp: Dispatcher) -> None:
    """aiogram runs every plain-function filter (``F.text...``, ``F.data...``, lambdas) in a
    worker thread via ``asyncio.to_thread``: a thread round trip per filter per update,
    for checks that take microseconds (a tenth of the bot's CPU on ``/unit``). Our filters
    are pure and cheap, so they run inline; results and order are unchanged."""
    for handler in _handlers(dp, root=True):
        for flt in handler.filters or ():
            if flt.awaitable:
                continue
            flt.callback = _as_coroutine(flt.callback)
            flt.awaitable = True


def _as_coroutine(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    run.__wrapped__ = fn  # type: ignore[attr-defined]  # what precheck() recognizes
    return run


EventTest = Callable[[Any], Any]
States = frozenset[str | None] | None  # the raw FSM states a handler accepts; None: any


def _callback_test(flt: CallbackQueryFilter) -> EventTest:
    """What ``CallbackData.unpack`` requires before it builds anything: a press whose data
    has the class's prefix and as many parts as the class has fields."""
    cls = flt.callback_data
    sep, prefix, parts = cls.__separator__, cls.__prefix__, len(cls.model_fields) + 1

    def test(event: Any) -> bool:
        data = getattr(event, "data", None)
        if not isinstance(data, str) or not data:
            return False
        split = data.split(sep)
        return split[0] == prefix and len(split) == parts

    return test


def _state_names(value: Any) -> States:
    """The raw states a state filter's argument admits, as aiogram's ``StateFilter``, ``State``
    and ``StatesGroup`` compare them (``"*"``: any). Unknown kinds admit any state."""
    if value is None or isinstance(value, str):
        return None if value == "*" else frozenset({value})
    if isinstance(value, State):
        return None if value.state == "*" else frozenset({value.state})
    group = type(value) if isinstance(value, StatesGroup) else value
    if isinstance(group, type) and issubclass(group, StatesGroup):
        return frozenset(group.__all_states_names__)
    return None


def _both(a: States, b: States) -> States:
    return b if a is None else a if b is None else a & b


@dataclass(frozen=True, slots=True)
class Precheck:
    """A handler's necessary conditions that need nothing but the event and the FSM state
    and never wait: its state filters (a set of raw states), its command gates, and event
    tests (a typed choice's text test, a magic filter such as ``F.contact``, a callback
    data prefix), cheapest first. All of a handler's filters must pass, so one of these
    failing means no match; each is pure, so the order they run in changes no outcome."""

    states: States = None
    commands: tuple[CommandNeed, ...] = ()
    tests: tuple[EventTest, ...] = ()

    @property
    def empty(self) -> bool:
        return self.states is None and not self.commands and not self.tests

    def refuses_event(self, event: Any) -> bool:
        """The event-only part, for a state already known to be accepted."""
        for need in self.commands:
            if not need.matches(event):
                return True
        return any(not test(event) for test in self.tests)

    def refuses(self, event: Any, state: str | None) -> bool:
        if self.states is not None and state not in self.states:
            return True
        return self.refuses_event(event)


def precheck(handler: HandlerObject) -> Precheck:
    states: States = None
    commands: list[CommandNeed] = []
    ranked: list[tuple[int, EventTest]] = []
    for flt in handler.filters or ():
        cb = getattr(flt.callback, "__wrapped__", flt.callback)
        if isinstance(cb, State | StatesGroup):
            states = _both(states, _state_names(cb))
        elif isinstance(cb, StateFilter):
            admitted: set[str | None] = set()
            for value in cb.states:
                names = _state_names(value)
                if names is None:
                    break
                admitted |= names
            else:
                states = _both(states, frozenset(admitted))
        elif isinstance(getattr(cb, "command_gate", None), CommandNeed):
            commands.append(cb.command_gate)
        elif isinstance(cb, CallbackQueryFilter):
            ranked.append((0, _callback_test(cb)))
        elif isinstance(cb, TypedChoice):
            ranked.append((1, cb.may_match))
        elif isinstance(getattr(cb, "__self__", None), MagicFilter) and cb.__name__ == "resolve":
            ranked.append((2, cb))
    ranked.sort(key=lambda r: r[0])
    return Precheck(states, tuple(commands), tuple(test for _rank, test in ranked))


def _pre_gate(dp: Dispatcher) -> None:
    """Let each handler refuse at once when its :class:`Precheck` fails (about 8 µs a
    handler saved: a free-text question passed some sixty of them, most waiting for a
    conversation state nobody was in, before reaching the knowledge router)."""
    for handler in _handlers(dp):
        if getattr(handler.check, "precheck", None) is not None:
            continue
        pre = precheck(handler)
        if not pre.empty:
            handler.check = _gated_check(handler.check, pre)  # type: ignore[method-assign]


def _precheck_of(handler: HandlerObject) -> Precheck:
    """The precheck :func:`_pre_gate` gave the handler (computed once), or its own."""
    return getattr(handler.check, "precheck", None) or precheck(handler)


def _gated_check(check: Callable[..., Awaitable[tuple[bool, dict[str, Any]]]],
                 pre: Precheck) -> Callable[..., Awaitable[tuple[bool, dict[str, Any]]]]:
    async def gated(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
        if pre.refuses(args[0], kwargs.get("raw_state")):
            return False, kwargs
        return await check(*args, **kwargs)

    gated.precheck = pre  # type: ignore[attr-defined]
    return gated


class RouterPlan:
    """The prechecks of every handler of one update type in a router and its sub-routers,
    grouped by the FSM state they accept: for a stateless sender most routers hold only
    handlers of conversation steps, and are refused on the state alone."""

    def __init__(self, prechecks: list[Precheck]) -> None:
        self.prechecks = prechecks
        self._by_state: dict[str | None, tuple[Precheck, ...]] = {}

    def candidates(self, state: str | None) -> tuple[Precheck, ...]:
        found = self._by_state.get(state)
        if found is None:
            found = tuple(p for p in self.prechecks if p.states is None or state in p.states)
            if len(self._by_state) < 1024:  # states are the routers' own, plus strays
                self._by_state[state] = found
        return found

    def idle(self, event: Any, state: str | None) -> bool:
        """True when every handler refuses: the router would only walk its handlers and
        return UNHANDLED."""
        return all(p.refuses_event(event) for p in self.candidates(state))


def router_plan(router: Router, update_type: str) -> RouterPlan | None:
    """None when the router can not be skipped: a handler with no precheck, or an outer
    middleware (it runs even when no handler matches)."""
    prechecks: list[Precheck] = []
    observer = router.observers.get(update_type)
    if observer is not None:
        if list(observer.outer_middleware):
            return None
        for handler in observer.handlers:
            pre = _precheck_of(handler)
            if pre.empty:
                return None
            prechecks.append(pre)
    for sub in router.sub_routers:
        below = router_plan(sub, update_type)
        if below is None:
            return None
        prechecks += below.prechecks
    return RouterPlan(prechecks)


def _skip_idle_routers(dp: Dispatcher) -> None:
    """Wrap each included router's ``propagate_event`` (the parent calls it per sub-router)
    so that a router none of whose handlers can match returns UNHANDLED at once. For
    ``/unit`` the five routers before the status router were each entered, middlewares
    wrapped and every handler called, to refuse."""
    for router in dp.chain_tail:
        if router is dp or getattr(router.propagate_event, "skips_idle", False):
            continue
        plans = {name: router_plan(router, name) for name in router.observers}
        propagate = router.propagate_event

        async def skipping(update_type: str, event: Any, *, _plans: dict[str, Any] = plans,
                           _propagate: Any = propagate, **kwargs: Any) -> Any:
            plan = _plans.get(update_type)
            if plan is not None and plan.idle(event, kwargs.get("raw_state")):
                return UNHANDLED
            return await _propagate(update_type=update_type, event=event, **kwargs)

        skipping.skips_idle = True  # type: ignore[attr-defined]
        router.propagate_event = skipping  # type: ignore[method-assign]
