"""The delivery ledger: one row per (broadcast or reminder key, chat), written before any send.

Why a ledger: sendMessage has no idempotency key, so the only way to be sure nobody is
skipped and nothing is sent twice is to record every intended message first and every state
change durably around the send:

``pending`` → claimed as ``sending`` (committed *before* the HTTP call) → ``sent`` with the
message id, or ``blocked`` (403 / chat not found), ``failed`` (permanent error, too many
attempts) or back to ``pending`` with a later ``next_try_at`` (5xx, network errors).

A crash leaves at most the claimed rows in ``sending``: those are the only sends that may
have reached Telegram without being recorded. :func:`recover` puts them back to ``pending``
and counts them in ``uncertain``, so a possible repeat is never silent.

Functions take a session and commit nothing themselves except where the docstring says the
commit is the point (claiming must be durable before the send). No aiogram here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dtime
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Broadcast, BroadcastState, Delivery, DeliveryState, utcnow

_DELIVERIES = cast(Table, Delivery.__table__)
_CHUNK = 500
LEASE = timedelta(minutes=5)  # a row in "sending" this long belongs to a dead sender


@dataclass(frozen=True)
class Claimed:
    """A delivery handed to one sender for one attempt."""

    id: int
    chat_id: str
    text: str
    attempts: int
    kind: str
    broadcast_id: int | None


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to; ``state`` pending means "try again at ``next_try_at``"."""

    id: int
    state: DeliveryState
    message_id: int | None = None
    error: str | None = None
    next_try_at: datetime | None = None
    uncertain: bool = False  # the request may have reached Telegram (timeout, disconnect)
    chat_id: str | None = None  # set when the chat migrated to a supergroup


def _insert_ignore(session: AsyncSession) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(_DELIVERIES).on_conflict_do_nothing(index_elements=["key", "chat_id"])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(_DELIVERIES).on_conflict_do_nothing()


async def enqueue(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    """Add deliveries, skipping (key, chat_id) pairs already in the ledger; returns how many
    were new. Re-running a planner therefore never sends twice."""
    if not rows:
        return 0
    now = utcnow()
    before = await session.scalar(select(func.count()).select_from(Delivery))
    for i in range(0, len(rows), _CHUNK):
        chunk = [{
            "key": r["key"], "kind": r["kind"], "chat_id": str(r["chat_id"]), "text": r["text"],
            "broadcast_id": r.get("broadcast_id"), "person_id": r.get("person_id"),
            "channel": r.get("channel", "telegram"), "quiet": bool(r.get("quiet", False)),
            "state": DeliveryState.pending.value, "attempts": 0, "uncertain": 0,
            "next_try_at": r.get("next_try_at") or now, "created_at": now,
        } for r in rows[i : i + _CHUNK]]
        await session.execute(_insert_ignore(session), chunk)
    after = await session.scalar(select(func.count()).select_from(Delivery))
    return int(after or 0) - int(before or 0)


def in_quiet_hours(now: datetime, quiet: tuple[dtime, dtime] | None, tz: ZoneInfo) -> bool:
    if quiet is None:
        return False
    start, end = quiet
    local = now.astimezone(tz).time()
    if start <= end:
        return start <= local < end
    return local >= start or local < end  # spans midnight (22:00-07:00)


def quiet_end(now: datetime, quiet: tuple[dtime, dtime] | None, tz: ZoneInfo) -> datetime:
    """``now`` if outside quiet hours, else the moment they end (timezone-aware UTC)."""
    if quiet is None or not in_quiet_hours(now, quiet, tz):
        return now
    local = now.astimezone(tz)
    end = local.replace(hour=quiet[1].hour, minute=quiet[1].minute, second=0, microsecond=0)
    if end <= local:
        end += timedelta(days=1)
    return end.astimezone(now.tzinfo)


async def recover(session: AsyncSession, me: str, now: datetime | None = None) -> list[int]:
    """Rows left in ``sending`` by this sender's previous life (or by any sender whose lease
    ran out): the sends in flight at a crash. Put back to ``pending``, counted as uncertain.
    Commits, so the count is reported once."""
    now = now or utcnow()
    stale = or_(Delivery.claimed_by == me, Delivery.claimed_at < now - LEASE)
    q = select(Delivery.id).where(Delivery.state == DeliveryState.sending.value, stale)
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    ids = list(await session.scalars(q.order_by(Delivery.id)))
    for i in range(0, len(ids), _CHUNK):
        await session.execute(
            update(Delivery).where(Delivery.id.in_(ids[i : i + _CHUNK]))
            .values(state=DeliveryState.pending.value, next_try_at=now,
                    uncertain=Delivery.uncertain + 1, claimed_by=None)
        )
    await session.commit()
    return ids


def _active_broadcasts() -> Any:
    return or_(
        Delivery.broadcast_id.is_(None),
        Delivery.broadcast_id.in_(
            select(Broadcast.id).where(Broadcast.state == BroadcastState.sending.value)),
    )


async def claim(
    session: AsyncSession,
    me: str,
    limit: int,
    *,
    now: datetime | None = None,
    quiet: tuple[dtime, dtime] | None = None,
    tz: ZoneInfo | None = None,
) -> list[Claimed]:
    """Take up to ``limit`` due deliveries for this sender and commit them as ``sending``.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so concurrent senders take disjoint rows without
    waiting on each other. SQLite: the caller's engine opens ``BEGIN IMMEDIATE``, so claims
    are serialized by the database write lock. Quiet-hour rows found during quiet hours are
    moved to the end of the quiet period instead (deferred, not dropped).
    """
    now = now or utcnow()
    q = (
        select(Delivery.id, Delivery.chat_id, Delivery.text, Delivery.attempts, Delivery.kind,
               Delivery.broadcast_id, Delivery.quiet)
        .where(Delivery.state == DeliveryState.pending.value, Delivery.next_try_at <= now,
               _active_broadcasts())
        .order_by(Delivery.next_try_at, Delivery.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True, of=Delivery)
    rows = list(await session.execute(q))
    deferred = []
    if tz is not None and in_quiet_hours(now, quiet, tz):
        deferred = [r.id for r in rows if r.quiet]
        if deferred:
            await session.execute(update(Delivery).where(Delivery.id.in_(deferred))
                                  .values(next_try_at=quiet_end(now, quiet, tz)))
        rows = [r for r in rows if not r.quiet]
    if rows:
        await session.execute(
            update(Delivery).where(Delivery.id.in_([r.id for r in rows]))
            .values(state=DeliveryState.sending.value, claimed_by=me, claimed_at=now,
                    attempts=Delivery.attempts + 1)
        )
    await session.commit()
    return [Claimed(r.id, r.chat_id, r.text, r.attempts + 1, r.kind, r.broadcast_id)
            for r in rows]


async def record(session: AsyncSession, outcomes: Iterable[Outcome], me: str) -> None:
    """Write attempt outcomes (one transaction for a batch; the caller commits).

    Only rows still claimed by this sender are touched: a row whose lease expired and which
    another sender took over is that sender's to record. ``claimed_by`` stays on final rows
    (who sent it). Plain sends are one executemany (Core, no ORM synchronization): the
    writer's cost per message is what bounds the sender's rate.
    """
    now = utcnow()
    c = _DELIVERIES.c
    mine = (c.claimed_by == me, c.state == DeliveryState.sending.value)
    plain = [o for o in outcomes if o.state == DeliveryState.sent and not o.uncertain
             and o.chat_id is None]
    if plain:
        await session.execute(
            update(_DELIVERIES).where(c.id == bindparam("oid"), *mine)
            .values(state=DeliveryState.sent.value, message_id=bindparam("mid"),
                    sent_at=bindparam("sat"), error=None),
            [{"oid": o.id, "mid": o.message_id, "sat": now} for o in plain])
    for o in outcomes:
        if o in plain:
            continue
        values: dict[str, Any] = {"state": o.state.value,
                                  "error": o.error[:200] if o.error else None}
        if o.state == DeliveryState.sent:
            values.update(message_id=o.message_id, sent_at=now)
        elif o.state == DeliveryState.pending:
            values.update(next_try_at=o.next_try_at or now, claimed_by=None)
        if o.uncertain:
            values["uncertain"] = c.uncertain + 1
        if o.chat_id is not None:
            values["chat_id"] = o.chat_id
        await session.execute(update(_DELIVERIES).where(c.id == o.id, *mine).values(**values))


async def counts(session: AsyncSession, broadcast_id: int) -> dict[str, int]:
    """Deliveries of a broadcast by state (every state present, zeros included)."""
    out = {s.value: 0 for s in DeliveryState}
    rows = await session.execute(
        select(Delivery.state, func.count()).where(Delivery.broadcast_id == broadcast_id)
        .group_by(Delivery.state))
    for state, n in rows:
        out[state] = int(n)
    return out


async def ledger_summary(session: AsyncSession, key_prefix: str | None = None) -> dict[str, int]:
    """Counts by state over the whole ledger (or keys starting with ``key_prefix``), plus the
    number of rows sent after a crash or timeout (``uncertain``: possible repeats)."""
    q = select(Delivery.state, func.count(), func.coalesce(func.sum(Delivery.uncertain), 0))
    if key_prefix:
        q = q.where(Delivery.key.startswith(key_prefix))
    out = {s.value: 0 for s in DeliveryState}
    uncertain = 0
    for state, n, u in await session.execute(q.group_by(Delivery.state)):
        out[state] = int(n)
        uncertain += int(u)
    out["uncertain"] = uncertain
    return out
