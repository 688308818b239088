"""SQLAlchemy 2 typed models. The schema is made only by Alembic migrations (db/migrations).

Chat identities are (channel, external_id as text) so a Zalo channel needs no migration.
Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on both backends (SQLite drops tzinfo otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class Role(enum.StrEnum):
    official = "official"
    unit_admin = "unit_admin"
    support = "support"
    dtc_admin = "dtc_admin"


class UnitKind(enum.StrEnum):
    ward = "ward"
    commune = "commune"
    special_zone = "special_zone"
    department = "department"
    party_office = "party_office"
    province_office = "province_office"
    old_district = "old_district"
    old_ward = "old_ward"


class Stage(enum.StrEnum):
    not_started = "not_started"
    surveyed = "surveyed"
    pilot = "pilot"
    deployed = "deployed"
    trained = "trained"
    live = "live"


class RequestStatus(enum.StrEnum):
    pending = "pending"
    approved = "approved"
    rejected = "rejected"
    cancelled = "cancelled"


def _enum_check(name: str, column: str, values: type[enum.StrEnum]) -> CheckConstraint:
    allowed = ", ".join(f"'{v.value}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name)


class Province(Base):
    __tablename__ = "provinces"

    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    name_folded: Mapped[str] = mapped_column(String(120), index=True)
    codename: Mapped[str | None] = mapped_column(String(120))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Unit(Base):
    __tablename__ = "units"
    __table_args__ = (_enum_check("kind", "kind", UnitKind),)

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_folded: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    province_code: Mapped[str | None] = mapped_column(ForeignKey("provinces.code"), index=True)
    parent_code: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    merged_into: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    domain: Mapped[str | None] = mapped_column(String(120))
    old_domains: Mapped[str | None] = mapped_column(Text)
    e_id_code: Mapped[str | None] = mapped_column(String(40))
    source: Mapped[str | None] = mapped_column(String(40))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    province: Mapped[Province | None] = relationship(lazy="raise")


class Person(Base):
    __tablename__ = "people"
    __table_args__ = (_enum_check("role", "role", Role),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    full_name: Mapped[str] = mapped_column(String(200))
    name_folded: Mapped[str] = mapped_column(String(200), index=True)
    phone: Mapped[str | None] = mapped_column(String(20), unique=True)
    unit_code: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    position: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20), default=Role.official.value)
    lang: Mapped[str | None] = mapped_column(String(5))
    verified_at: Mapped[datetime | None]
    is_sample: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    unit: Mapped[Unit | None] = relationship(lazy="raise")
    identities: Mapped[list[ChatIdentity]] = relationship(back_populates="person", lazy="raise")


class ChatIdentity(Base):
    """One account on one chat channel; Telegram ids are stored as text like Zalo's."""

    __tablename__ = "chat_identities"
    __table_args__ = (UniqueConstraint("channel", "external_id", name="channel_external"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(64))
    person_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), index=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    username: Mapped[str | None] = mapped_column(String(64))
    lang: Mapped[str | None] = mapped_column(String(5))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    person: Mapped[Person | None] = relationship(back_populates="identities", lazy="raise")


class RegistrationRequest(Base):
    """A person whose phone is not on the staff list asks to be verified by an approver."""

    __tablename__ = "registration_requests"
    __table_args__ = (_enum_check("status", "status", RequestStatus),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("chat_identities.id"), index=True)
    full_name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(20))
    phone_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"), index=True)
    position: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.pending.value)
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    decided_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    identity: Mapped[ChatIdentity] = relationship(lazy="raise")
    unit: Mapped[Unit] = relationship(lazy="raise")


class System(Base):
    __tablename__ = "systems"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    abbr: Mapped[str] = mapped_column(String(20))
    name_vi: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200))
    sort: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str | None] = mapped_column(String(200))


class Milestone(Base):
    __tablename__ = "milestones"
    __table_args__ = (UniqueConstraint("key", name="key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    system_code: Mapped[str | None] = mapped_column(ForeignKey("systems.code"), index=True)
    phase: Mapped[str | None] = mapped_column(String(64))
    name_vi: Mapped[str] = mapped_column(Text)
    name_en: Mapped[str] = mapped_column(Text)
    due_date: Mapped[date | None] = mapped_column(Date)
    stage_required: Mapped[str | None] = mapped_column(String(20))
    scope: Mapped[str] = mapped_column(String(40), default="all")
    province_code: Mapped[str | None] = mapped_column(ForeignKey("provinces.code"))
    source: Mapped[str] = mapped_column(String(200))


class UnitSystemStatus(Base):
    __tablename__ = "unit_system_status"
    __table_args__ = (_enum_check("stage", "stage", Stage),)

    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"), primary_key=True)
    system_code: Mapped[str] = mapped_column(ForeignKey("systems.code"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(20), default=Stage.not_started.value)
    note: Mapped[str | None] = mapped_column(Text)
    updated_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class StatusHistory(Base):
    __tablename__ = "status_history"
    __table_args__ = (Index("ix_status_history_unit_system", "unit_code", "system_code", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit_code: Mapped[str] = mapped_column(ForeignKey("units.code"))
    system_code: Mapped[str] = mapped_column(ForeignKey("systems.code"))
    old_stage: Mapped[str | None] = mapped_column(String(20))
    new_stage: Mapped[str] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(Text)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLog(Base):
    """Who did what to which object, with before/after; written in the same transaction."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_object", "object_type", "object_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor_person_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str | None] = mapped_column(String(40))
    object_id: Mapped[str | None] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None]
    after: Mapped[dict[str, Any] | None]


class InboxUpdate(Base):
    """Every update is stored here before it is confirmed to Telegram, then marked handled.

    The (bot_id, update_id) key doubles as the processed-update-id record for deduplication.
    """

    __tablename__ = "inbox_updates"
    __table_args__ = (Index("ix_inbox_updates_pending", "bot_id", "status"),)

    bot_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    update_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_ref: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    handled_at: Mapped[datetime | None]


class FsmRecord(Base):
    """aiogram FSM state/data kept in the database so a restart keeps conversations."""

    __tablename__ = "fsm_records"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str | None] = mapped_column(String(200))
    data: Mapped[dict[str, Any] | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TicketStatus(enum.StrEnum):
    new = "new"
    triaged = "triaged"
    in_progress = "in_progress"
    waiting_reporter = "waiting_reporter"
    resolved = "resolved"
    closed = "closed"
    reopened = "reopened"


class Severity(enum.StrEnum):
    low = "low"
    normal = "normal"
    high = "high"
    critical = "critical"


class Ticket(Base):
    """A reported problem; ``code`` (HT-000123) is what people quote."""

    __tablename__ = "tickets"
    __table_args__ = (
        _enum_check("status", "status", TicketStatus),
        _enum_check("severity", "severity", Severity),
        CheckConstraint("csat IS NULL OR (csat BETWEEN 1 AND 5)", name="csat_range"),
        Index("ix_tickets_open", "status", "sla_due_at"),
        Index("ix_tickets_system_unit", "system_code", "unit_code", "status"),
        Index("ix_tickets_topic", "group_chat_id", "topic_id"),  # also: not yet published
        Index("ix_tickets_card", "group_chat_id", "card_message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(20), unique=True)
    reporter_id: Mapped[int] = mapped_column(ForeignKey("people.id"), index=True)
    unit_code: Mapped[str | None] = mapped_column(ForeignKey("units.code"))
    system_code: Mapped[str | None] = mapped_column(ForeignKey("systems.code"))
    severity: Mapped[str] = mapped_column(String(10), default=Severity.normal.value)
    priority: Mapped[int] = mapped_column(Integer, default=3)
    status: Mapped[str] = mapped_column(String(20), default=TicketStatus.new.value)
    summary: Mapped[str] = mapped_column(Text)
    assignee_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), index=True)
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"), index=True)
    group_chat_id: Mapped[str | None] = mapped_column(String(64))
    topic_id: Mapped[int | None] = mapped_column(BigInteger)
    card_message_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    first_response_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    sla_due_at: Mapped[datetime | None]
    sla_warned_at: Mapped[datetime | None]
    sla_breached_at: Mapped[datetime | None]
    csat: Mapped[int | None] = mapped_column(Integer)
    csat_at: Mapped[datetime | None]
    reopen_count: Mapped[int] = mapped_column(Integer, default=0)


class TicketMessage(Base):
    """One message in a ticket's conversation, with where it lives on each side (for edits)."""

    __tablename__ = "ticket_messages"
    __table_args__ = (  # a reply or an edit on either side finds its message
        Index("ix_ticket_messages_src", "src_chat_id", "src_message_id"),
        Index("ix_ticket_messages_dst", "dst_chat_id", "dst_message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(12))  # report | reporter | agent | note | system
    author_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    text: Mapped[str | None] = mapped_column(Text)
    src_chat_id: Mapped[str | None] = mapped_column(String(64))
    src_message_id: Mapped[int | None] = mapped_column(BigInteger)
    dst_chat_id: Mapped[str | None] = mapped_column(String(64))
    dst_message_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    edited_at: Mapped[datetime | None]


class TicketAttachment(Base):
    __tablename__ = "ticket_attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("ticket_messages.id"))
    kind: Mapped[str] = mapped_column(String(12))  # photo | document
    file_id: Mapped[str] = mapped_column(String(255))
    file_name: Mapped[str | None] = mapped_column(String(255))
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Incident(Base):
    """Several tickets on one system in a short window: one known problem."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    system_code: Mapped[str | None] = mapped_column(ForeignKey("systems.code"))
    title: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(12), default="open")
    created_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]


class SupportGroup(Base):
    """The chat group(s) where support staff triage tickets, set up by an operator."""

    __tablename__ = "support_groups"

    chat_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str | None] = mapped_column(String(255))
    is_forum: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    configured_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    configured_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- provisioning (issue 5): requests, durable jobs, accounts, notices -------------------


class ProvKind(enum.StrEnum):
    email = "email"
    system_account = "system_account"
    password_reset = "password_reset"
    deprovision = "deprovision"
    e_id_code = "e_id_code"
    domain = "domain"


class ProvState(enum.StrEnum):
    submitted = "submitted"
    approved = "approved"
    rejected = "rejected"
    in_progress = "in_progress"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class AccountStatus(enum.StrEnum):
    pending = "pending"
    active = "active"
    disabled = "disabled"


class ProvisioningRequest(Base):
    """A request for an account action; once approved it is also the durable job that the
    provisioning task executes (attempts, next try, last error, result)."""

    __tablename__ = "provisioning_requests"
    __table_args__ = (
        _enum_check("kind", "kind", ProvKind),
        _enum_check("state", "state", ProvState),
        Index("ix_provisioning_requests_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(16), default=ProvState.submitted.value)
    requester_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), index=True)
    subject_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), index=True)
    unit_code: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    system_code: Mapped[str | None] = mapped_column(String(32))
    role: Mapped[str | None] = mapped_column(String(40))
    payload: Mapped[dict[str, Any] | None]
    needs_unit_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    needs_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    unit_approved_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    operator_approved_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    decided_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)
    batch: Mapped[str | None] = mapped_column(String(40), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    checklist: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]


class Account(Base):
    """An account of a person in a system (``email`` or a system code) as provisioned."""

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("system_code", "login", name="system_login"),
        _enum_check("status", "status", AccountStatus),
        Index("ix_accounts_expiry", "status", "expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id"), index=True)
    system_code: Mapped[str] = mapped_column(String(32))
    login: Mapped[str] = mapped_column(String(120))
    address: Mapped[str | None] = mapped_column(String(200))
    dn: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(12), default=AccountStatus.pending.value)
    request_id: Mapped[int | None] = mapped_column(ForeignKey("provisioning_requests.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None]
    password_sent_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    warned_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]


class ProvNotice(Base):
    """A message the bot owes someone about provisioning (state changes, operator alerts,
    expiry warnings); sent by the provisioning task, marked sent. Never holds a password."""

    __tablename__ = "prov_notices"
    __table_args__ = (Index("ix_prov_notices_unsent", "sent_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id"), index=True)
    key: Mapped[str] = mapped_column(String(80))
    params: Mapped[dict[str, Any] | None]
    request_id: Mapped[int | None] = mapped_column(ForeignKey("provisioning_requests.id"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
# --- Broadcasts, reminders and the delivery ledger (issue 7) ---------------------------------


class BroadcastState(enum.StrEnum):
    draft = "draft"
    scheduled = "scheduled"
    sending = "sending"
    paused = "paused"
    cancelled = "cancelled"
    done = "done"


class DeliveryState(enum.StrEnum):
    pending = "pending"
    sending = "sending"  # claimed and possibly handed to the API: the only possible repeats
    sent = "sent"
    blocked = "blocked"  # 403 or "chat not found": the chat cannot be reached
    failed = "failed"  # permanent error or too many attempts


class Subscription(Base):
    """A person's opt-in/out of the reminders of one system (no row = opted in)."""

    __tablename__ = "subscriptions"

    person_id: Mapped[int] = mapped_column(ForeignKey("people.id"), primary_key=True)
    system_code: Mapped[str] = mapped_column(ForeignKey("systems.code"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Broadcast(Base):
    """An operator's message to an audience; its deliveries are rows of ``deliveries``."""

    __tablename__ = "broadcasts"
    __table_args__ = (_enum_check("state", "state", BroadcastState),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    template: Mapped[str] = mapped_column(Text)
    audience: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(12), default=BroadcastState.draft.value)
    scheduled_at: Mapped[datetime | None]
    created_by: Mapped[int | None] = mapped_column(ForeignKey("people.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    total: Mapped[int] = mapped_column(Integer, default=0)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    blocked: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    progress_chat_id: Mapped[str | None] = mapped_column(String(64))
    progress_message_id: Mapped[int | None] = mapped_column(BigInteger)
    lang: Mapped[str] = mapped_column(String(5), default="vi")


class Delivery(Base):
    """One message to one chat for one broadcast or reminder: the crash-safe ledger.

    ``key`` names what is sent ("b:12", "r:qlvb_all:7:26743", "d:2025-08-01"); the unique
    (key, chat_id) pair is what makes re-planning and re-sending idempotent.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("key", "chat_id", name="uq_deliveries_key_chat"),
        _enum_check("state", "state", DeliveryState),
        Index("ix_deliveries_due", "state", "next_try_at"),
        Index("ix_deliveries_broadcast_state", "broadcast_id", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(12))  # broadcast | reminder | nag | digest
    broadcast_id: Mapped[int | None] = mapped_column(ForeignKey("broadcasts.id"))
    person_id: Mapped[int | None] = mapped_column(ForeignKey("people.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16), default="telegram")
    chat_id: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    quiet: Mapped[bool] = mapped_column(Boolean, default=False)  # deferred in quiet hours
    state: Mapped[str] = mapped_column(String(10), default=DeliveryState.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    uncertain: Mapped[int] = mapped_column(Integer, default=0)  # re-sends after a crash/timeout
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    sent_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


from sqlalchemy import Column, Float, LargeBinary, Table, Unicode  # noqa: E402

# APScheduler 3's SQLAlchemyJobStore table, declared here (same shape as APScheduler's own)
# so that Alembic creates it and the models-vs-migrations check covers it.
apscheduler_jobs = Table(
    "apscheduler_jobs",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)
