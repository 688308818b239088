"""The audit trail: every state change by a person is recorded in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from db.models import AuditLog


@dataclass(frozen=True)
class Actor:
    """Who acts: a person (if known) and a label such as 'telegram:123' or 'cli:root'."""

    label: str
    person_id: int | None = None

    @classmethod
    def system(cls, what: str = "system") -> Actor:
        return cls(label=what)


async def audit(
    session: AsyncSession,
    actor: Actor,
    action: str,
    object_type: str | None = None,
    object_id: str | int | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditLog:
    """Add an audit row; the caller's transaction commits it with the change it describes."""
    row = AuditLog(
        actor=actor.label[:100],
        actor_person_id=actor.person_id,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        before=before,
        after=after,
    )
    session.add(row)
    return row
