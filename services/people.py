"""Chat identities and the people behind them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import bindparam, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.util import identity_key

from db.models import ChatIdentity, Person, Unit, utcnow

SEEN_RESOLUTION = timedelta(minutes=5)  # avoid a write per update just to bump last_seen


@dataclass
class Who:
    """What the middleware hands to handlers: the chat identity and, if linked, the person."""

    identity: ChatIdentity
    person: Person | None
    unit: Unit | None

    @property
    def role(self) -> str | None:
        if self.person is None or self.person.verified_at is None or not self.person.active:
            return None
        return self.person.role

    @property
    def lang(self) -> str | None:
        return self.identity.lang or (self.person.lang if self.person else None)


Snapshot = dict[str, Any]
TABLES = frozenset({"people", "chat_identities", "units"})


def _snapshot(obj: Any) -> Snapshot:
    return {a.key: getattr(obj, a.key) for a in inspect(obj).mapper.column_attrs}


def _attach(session: AsyncSession, cls: type[Any], cols: Snapshot) -> Any:
    """A persistent instance in ``session`` from cached columns, without SQL: as if loaded.

    Why not ``make_transient_to_detached`` + ``session.add``: they cost a fifth of a cached
    update's CPU (identity key from the columns, expiring the unloaded relationships, the
    save-update cascade walk). A fresh instance with every column set has nothing to
    commit or expire, its relationships are unloaded (``lazy="raise"`` as when loaded)
    and it has no related objects to cascade to, so only the identity map step remains."""
    obj = inspect(cls).class_manager.new_instance()
    obj.__dict__.update(cols)
    state = instance_state(obj)
    state.key = identity_key(cls, tuple(cols[a] for a in _pk_attrs(cls)))
    session.sync_session._update_impl(state)  # what add() ends in for a detached instance
    return obj


@cache
def _pk_attrs(cls: type[Any]) -> tuple[str, ...]:
    mapper = inspect(cls)
    return tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)

class WhoCache:
    """Read-through cache of (identity, person, unit) columns per chat identity.

    The database stays the source of truth. Entries are dropped after every committed
    change to people, chat_identities or units (``db.session`` change signals: at once for
    this process, LISTEN/NOTIFY or ``PRAGMA data_version`` for others), and a load that
    raced with a change does not store what it read (generation check). Off until enabled
    by the bot once it hears other processes' changes.
    """

    def __init__(self, size: int = 100_000) -> None:
        self.enabled = False
        self.size = size
        self._rows: dict[tuple[str, str], tuple[Snapshot, Snapshot | None, Snapshot | None]] = {}
        self._by_identity: dict[int, tuple[str, str]] = {}
        self._gen = 0

    def changed(self, tables: frozenset[str] = TABLES, touched: frozenset[int] = frozenset()
                ) -> None:
        """Rows changed (``db.session`` change signal): any of our tables, or only the
        seen/name columns of these identities.

        Only a change to what the cache serves bumps the generation (which keeps a racing
        load from storing what it read). A seen/name bump of one identity just drops that
        entry: a racing load of the same identity may store the previous ``last_seen_at``,
        which at worst makes the next update bump it once more."""
        if tables & TABLES:
            self._gen += 1
            self._rows.clear()
            self._by_identity.clear()
            return
        for ident in touched:
            key = self._by_identity.pop(ident, None)
            if key is not None:
                self._rows.pop(key, None)

    def missing(self, channel: str, external_ids: Iterable[str]) -> list[str]:
        """Those of these senders a lookup would not find (all of them while disabled:
        then nothing is worth loading, see :func:`prefetch_who`)."""
        if not self.enabled:
            return []
        return sorted({e for e in external_ids if (channel, e) not in self._rows})

    def get(self, key: tuple[str, str]
            ) -> tuple[Snapshot, Snapshot | None, Snapshot | None] | None:
        return self._rows.get(key) if self.enabled else None

    def put(self, key: tuple[str, str], gen: int, identity: ChatIdentity,
            person: Person | None, unit: Unit | None) -> None:
        if not self.enabled or gen != self._gen:
            return
        if len(self._rows) >= self.size:
            self.changed()
            return
        self._rows[key] = (_snapshot(identity), _snapshot(person) if person else None,
                           _snapshot(unit) if unit else None)
        self._by_identity[identity.id] = key


_WHO = (
    select(ChatIdentity, Person, Unit)
    .outerjoin(Person, Person.id == ChatIdentity.person_id)
    .outerjoin(Unit, Unit.code == Person.unit_code)
    .where(ChatIdentity.channel == bindparam("ch"), ChatIdentity.external_id == bindparam("ext"))
)


async def load_who(
    session: AsyncSession,
    channel: str,
    external_id: str,
    display_name: str | None = None,
    username: str | None = None,
    cache: WhoCache | None = None,
) -> Who:
    """Find or create the identity for a sender and load its person and unit in one query
    (or from ``cache``, attached to ``session`` as if loaded: handlers may change them)."""
    key = (channel, external_id)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        identity = _attach(session, ChatIdentity, hit[0])
        person = _attach(session, Person, hit[1]) if hit[1] is not None else None
        unit = _attach(session, Unit, hit[2]) if hit[2] is not None else None
    else:
        gen = cache._gen if cache is not None else 0
        row = (await session.execute(_WHO, {"ch": channel, "ext": external_id})).first()
        if row is None:
            now = utcnow()
            identity = ChatIdentity(
                channel=channel, external_id=external_id, display_name=display_name,
                username=username, created_at=now, last_seen_at=now,
            )
            session.add(identity)
            await session.flush()
            return Who(identity, None, None)
        identity, person, unit = row
        if cache is not None:
            cache.put(key, gen, identity, person, unit)
    now = utcnow()
    if now - identity.last_seen_at > SEEN_RESOLUTION or identity.display_name != display_name:
        identity.last_seen_at = now
        identity.display_name = display_name
        identity.username = username
    return Who(identity, person, unit)


async def prefetch_who(session: AsyncSession, channel: str, external_ids: Iterable[str],
                       cache: WhoCache) -> int:
    """Load the senders of a received batch that the cache lacks, in one query.

    Why: after a restart or in a burst (a broadcast's replies) most senders are not cached,
    and each then paid its own query and its own transaction for the inbox mark; with the
    batch loaded at once their updates are served like any cached one. Unknown senders are
    left to :func:`load_who`, which creates them. Returns how many were loaded."""
    missing = cache.missing(channel, external_ids)
    loaded = 0
    for i in range(0, len(missing), _IN_CHUNK):
        gen = cache._gen
        rows = await session.execute(_WHO_MANY, {"ch": channel, "ext": missing[i:i + _IN_CHUNK]})
        for identity, person, unit in rows:
            cache.put((channel, identity.external_id), gen, identity, person, unit)
            loaded += 1
    return loaded


_IN_CHUNK = 500  # bound parameters per statement (SQLite allows 32766; stay far below)
_WHO_MANY = (
    select(ChatIdentity, Person, Unit)
    .outerjoin(Person, Person.id == ChatIdentity.person_id)
    .outerjoin(Unit, Unit.code == Person.unit_code)
    .where(ChatIdentity.channel == bindparam("ch"),
           ChatIdentity.external_id.in_(bindparam("ext", expanding=True)))
)


async def identities_of(session: AsyncSession, person_ids: list[int]) -> list[ChatIdentity]:
    if not person_ids:
        return []
    rows = await session.scalars(
        select(ChatIdentity).where(ChatIdentity.person_id.in_(person_ids)).order_by(ChatIdentity.id)
    )
    return list(rows)


async def person_by_phone(session: AsyncSession, phone: str) -> Person | None:
    return await session.scalar(select(Person).where(Person.phone == phone))
