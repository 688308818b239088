"""Chat identities and the people behind them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

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


async def load_who(
    session: AsyncSession,
    channel: str,
    external_id: str,
    display_name: str | None = None,
    username: str | None = None,
) -> Who:
    """Find or create the identity for a sender and load its person and unit in one query."""
    row = (
        await session.execute(
            select(ChatIdentity, Person, Unit)
            .outerjoin(Person, Person.id == ChatIdentity.person_id)
            .outerjoin(Unit, Unit.code == Person.unit_code)
            .where(ChatIdentity.channel == channel, ChatIdentity.external_id == external_id)
        )
    ).first()
    now = utcnow()
    if row is None:
        identity = ChatIdentity(
            channel=channel, external_id=external_id, display_name=display_name,
            username=username, created_at=now, last_seen_at=now,
        )
        session.add(identity)
        await session.flush()
        return Who(identity, None, None)
    identity, person, unit = row
    if now - identity.last_seen_at > SEEN_RESOLUTION or identity.display_name != display_name:
        identity.last_seen_at = now
        identity.display_name = display_name
        identity.username = username
    return Who(identity, person, unit)


async def identities_of(session: AsyncSession, person_ids: list[int]) -> list[ChatIdentity]:
    if not person_ids:
        return []
    rows = await session.scalars(
        select(ChatIdentity).where(ChatIdentity.person_id.in_(person_ids)).order_by(ChatIdentity.id)
    )
    return list(rows)


async def person_by_phone(session: AsyncSession, phone: str) -> Person | None:
    return await session.scalar(select(Person).where(Person.phone == phone))
