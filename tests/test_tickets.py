"""Tickets domain on both backends: creation, the state machine, concurrency, incidents, the
queue, SLA scans, messages, support groups, statistics and the texts they render."""

from __future__ import annotations

import asyncio
import io
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import (
    AuditLog,
    Person,
    Role,
    Severity,
    Ticket,
    TicketAttachment,
    TicketMessage,
    TicketStatus,
    utcnow,
)
from services import ticket_stats, tickets
from services.audit import Actor
from services.sla import sla_due
from services.tickets import (
    TRANSITIONS,
    ActOutcome,
    AttachmentIn,
    Notify,
    Party,
    TicketError,
    act,
    create_ticket,
)

BEN_THANH, SAI_GON = "26743", "26740"  # HCMC wards
T0 = datetime(2025, 7, 7, 2, 0, tzinfo=UTC)  # Monday 09:00 in Asia/Ho_Chi_Minh
Maker = async_sessionmaker[AsyncSession]


def actor(p: Person) -> Actor:
    return Actor(f"test:{p.id}", p.id)


async def add_people(s: AsyncSession) -> dict[str, Person]:
    now = utcnow()

    def person(name: str, role: Role, unit: str | None = BEN_THANH, **kw: Any) -> Person:
        return Person(full_name=name, name_folded=name.lower(), unit_code=unit, role=role.value,
                      verified_at=now, **kw)

    people = {
        "reporter": person("Nguyễn Văn An", Role.official),
        "colleague": person("Trần Thị Bình", Role.official),
        "stranger": person("Lý Văn Chín", Role.official, SAI_GON),
        "unit_admin": person("Đỗ Thị Hoa", Role.unit_admin),
        "agent1": person("Lê Văn Cường", Role.support, None),
        "agent2": person("Phạm Thị Dung", Role.support, None),
        "operator": person("Võ Minh Em", Role.dtc_admin, None),
        "retired": person("Hồ Văn Giang", Role.support, None, active=False),
        "unverified": Person(full_name="Mai Anh", name_folded="mai anh", role=Role.support.value),
    }
    s.add_all(people.values())
    await s.flush()
    return people


async def new(s: AsyncSession, reporter: Person, *, system: str | None = "qlvb",
              severity: str = "normal", now: datetime = T0, summary: str = "Không đăng nhập được",
              unit: str | None = None, **fields: Any) -> Ticket:
    t = await create_ticket(s, reporter, summary=summary, system_code=system, severity=severity,
                            unit_code=unit, actor=actor(reporter), now=now)
    for k, v in fields.items():
        setattr(t, k, v)
    await s.flush()
    return t


async def audits(s: AsyncSession, action: str, ticket: Ticket | None = None) -> list[AuditLog]:
    q = select(AuditLog).where(AuditLog.action == action)
    if ticket is not None:
        q = q.where(AuditLog.object_id == str(ticket.id))
    return list(await s.scalars(q.order_by(AuditLog.id)))


# -------------------------------------------------------------------------------- creation


async def test_create_ticket(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        files = [AttachmentIn("photo", "AgAD-photo", None, 1234),
                 AttachmentIn("document", "BQAD-doc", "nhat\x00ky.txt", 88)]
        t = await create_ticket(
            s, p["reporter"], summary="  Không đăng nhập\x07 được\r\nQLVB\tbáo sai mật khẩu  ",
            system_code="qlvb", severity="HIGH", attachments=files, actor=actor(p["reporter"]),
            now=T0)
        await s.commit()
        assert re.fullmatch(r"HT-\d{6}", t.code) and t.code == f"HT-{t.id:06d}"
        assert t.summary == "Không đăng nhập được\nQLVB báo sai mật khẩu"
        assert (t.status, t.severity, t.priority) == ("new", "high", 2)
        assert t.unit_code == BEN_THANH and t.reporter_id == p["reporter"].id
        assert t.sla_due_at == sla_due(T0, Severity.high) == datetime(2025, 7, 8, 2, 30, tzinfo=UTC)
        [msg] = await s.scalars(select(TicketMessage).where(TicketMessage.ticket_id == t.id))
        assert msg.kind == "report" and msg.text == t.summary
        rows = list(await s.scalars(select(TicketAttachment).order_by(TicketAttachment.id)))
        assert [(a.kind, a.file_id, a.file_name, a.message_id) for a in rows] == [
            ("photo", "AgAD-photo", None, msg.id), ("document", "BQAD-doc", "nhatky.txt", msg.id)]
        [row] = await audits(s, "ticket.create")
        assert row.object_id == str(t.id) and row.actor_person_id == p["reporter"].id
        assert (row.after or {})["code"] == t.code and (row.after or {})["attachments"] == 2
        # another unit, no system, critical → priority 1
        t2 = await new(s, p["reporter"], system=None, severity="critical", unit=SAI_GON)
        assert (t2.unit_code, t2.system_code, t2.priority) == (SAI_GON, None, 1)
        assert t2.id != t.id
        for code in (t.code, t.code.lower(), f"ht{t.id}", str(t.id), f"#{t.id}", f"HT {t.id}"):
            assert (await tickets.get_by_code(s, code)) is t, code
        for bad in ("", "HT-", "abc", "HT-0", "12a", None):
            assert await tickets.get_by_code(s, bad) is None


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"summary": "  \x00\x07 \n "}, "empty_summary"),
    ({"summary": "x" * 4001}, "summary_too_long"),
    ({"severity": "urgent"}, "bad_severity"),
    ({"system_code": "nope"}, "unknown_system"),
    ({"unit_code": "99999"}, "unknown_unit"),
    ({"attachments": [AttachmentIn("sticker", "x")]}, "bad_attachment"),
    ({"attachments": [AttachmentIn("photo", "")]}, "bad_attachment"),
    ({"attachments": [AttachmentIn("photo", f"f{i}") for i in range(11)]},
     "too_many_attachments"),
])
async def test_create_refuses_bad_input(seeded_maker: Maker, kwargs: dict[str, Any],
                                        code: str) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        args: dict[str, Any] = {"summary": "Lỗi", "system_code": "qlvb", "severity": "normal"}
        with pytest.raises(TicketError) as err:
            await create_ticket(s, p["reporter"], **{**args, **kwargs}, actor=actor(p["reporter"]))
        assert err.value.code == code and code in tickets.ERROR_CODES
        assert await s.scalar(select(func.count()).select_from(Ticket)) == 0
        ok = await create_ticket(s, p["reporter"], **{**args, "summary": "y" * 4000},
                                 actor=actor(p["reporter"]))
        assert len(ok.summary) == 4000


async def test_similar_open_and_reporter_lists(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        r = p["reporter"]
        a = await new(s, r, now=T0)
        await new(s, r, now=T0 + timedelta(minutes=1), status="resolved")
        await new(s, p["stranger"], now=T0 + timedelta(minutes=2))  # other unit
        await new(s, r, system="email", now=T0 + timedelta(minutes=3))
        e = await new(s, p["colleague"], now=T0 + timedelta(minutes=4))
        assert await tickets.similar_open(s, "qlvb", BEN_THANH) == [e, a]
        assert await tickets.similar_open(s, "qlvb", BEN_THANH, limit=1) == [e]
        assert await tickets.similar_open(s, None, BEN_THANH) == []
        for i in range(9):
            await new(s, r, system="email", now=T0 + timedelta(hours=1, minutes=i))
        rows, total = await tickets.list_for_reporter(s, r.id)
        assert total == 12 and len(rows) == 10 and rows[0].created_at > rows[-1].created_at
        rest, total = await tickets.list_for_reporter(s, r.id, offset=10)
        assert total == 12 and [x.id for x in rest] == [a.id + 1, a.id]
        assert len(await tickets.open_for_reporter(s, r.id, limit=50)) == 11


# --------------------------------------------------------------------------- state machine

# Expected result of each action from each status ("-" = invalid_transition). Written out by
# hand so the implementation's table is checked against the design, not against itself.
EXPECTED = """
action         new              triaged          in_progress      waiting_reporter resolved  closed    reopened
triage         triaged          already          -                -                -         -         -
claim          in_progress      in_progress      in_progress      waiting_reporter -         -         in_progress
need_info      waiting_reporter waiting_reporter waiting_reporter already          -         -         waiting_reporter
resolve        resolved         resolved         resolved         resolved         already   -         resolved
close          -                -                -                -                closed    already   -
escalate       new              triaged          in_progress      waiting_reporter -         -         reopened
set_priority   triaged          triaged          in_progress      waiting_reporter -         -         reopened
reply          in_progress      in_progress      in_progress      waiting_reporter resolved  -         in_progress
reporter_reply new              triaged          in_progress      in_progress      resolved  -         reopened
add_info       new              triaged          in_progress      in_progress      -         -         reopened
reopen         -                -                -                -                reopened  reopened  -
rate           -                -                -                -                resolved  closed    -
"""  # noqa: E501
VALUES = {"set_priority": 1, "rate": 5}


def expected_table() -> dict[tuple[str, TicketStatus], str]:
    header, *lines = [ln.split() for ln in EXPECTED.strip().splitlines()]
    statuses = [TicketStatus(h) for h in header[1:]]
    return {(ln[0], st): cell for ln in lines for st, cell in zip(statuses, ln[1:], strict=True)}


async def test_state_machine_table(seeded_maker: Maker) -> None:
    table = expected_table()
    assert {a for a, _ in table} == set(TRANSITIONS) and len(table) == 12 * 7
    async with seeded_maker() as s:
        p = await add_people(s)
        for (action, status), want in table.items():
            resolved = T0 - timedelta(days=1) if status in tickets.DONE_STATUSES else None
            t = await new(s, p["reporter"], status=status.value, resolved_at=resolved)
            who = p["agent1"] if TRANSITIONS[action].who in (Party.agent, Party.agent_or_reporter) \
                else p["reporter"]
            r = await act(s, t.id, action, who, actor=actor(who), now=T0,
                          value=VALUES.get(action), reason="thêm thông tin")
            where = f"{action} from {status}"
            if want == "-":
                assert r.outcome is ActOutcome.invalid_transition, where
            elif want == "already":
                assert r.outcome is ActOutcome.already, where
            else:
                assert r.outcome is ActOutcome.ok, where
                assert (r.old_status, r.new_status) == (status, TicketStatus(want)), where
                assert t.status == want, where
            rows = await audits(s, f"ticket.{action}", t)
            if r.outcome is not ActOutcome.ok:
                assert not rows, where
            elif r.changed:
                assert rows and (rows[-1].after or {})["status"] == want, where


async def test_audit_before_after_and_notify(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        rep, ag = p["reporter"], p["agent1"]
        t = await new(s, rep)
        r = await act(s, t.id, "claim", ag, actor=actor(ag), now=T0)
        assert r.ok and t.assignee_id == ag.id and Notify.reporter in r.notify
        [row] = await audits(s, "ticket.claim", t)
        assert row.before == {"status": "new", "assignee_id": None}
        assert row.after == {"status": "in_progress", "assignee_id": ag.id}
        r = await act(s, t.id, "need_info", ag, actor=actor(ag), now=T0 + timedelta(minutes=5))
        assert r.ok and r.new_status is TicketStatus.waiting_reporter
        assert Notify.reporter in r.notify and t.first_response_at == T0 + timedelta(minutes=5)
        r = await act(s, t.id, "add_info", rep, actor=actor(rep), reason=" Máy khác\x07 cũng lỗi ")
        assert r.ok and r.new_status is TicketStatus.in_progress and r.message is not None
        assert r.message.text == "Máy khác cũng lỗi" and r.message.kind == "reporter"
        assert Notify.group in r.notify and Notify.assignee in r.notify
        assert Notify.reporter not in r.notify
        r = await act(s, t.id, "escalate", ag, actor=actor(ag))
        assert r.ok and t.priority == 2 and Notify.operators in r.notify
        assert (r.old_status, r.new_status) == (TicketStatus.in_progress,) * 2
        await act(s, t.id, "escalate", ag, actor=actor(ag))
        assert t.priority == 1
        assert (await act(s, t.id, "escalate", ag, actor=actor(ag))).outcome is \
            ActOutcome.already
        r = await act(s, t.id, "set_priority", ag, actor=actor(ag), value=1)
        assert r.outcome is ActOutcome.already
        r = await act(s, t.id, "reply", p["agent2"], actor=actor(p["agent2"]), reason="Đã sửa")
        assert r.ok and t.assignee_id == ag.id  # replying does not steal the ticket
        # a reply to a new ticket takes it and counts as the first response
        t2 = await new(s, rep)
        r = await act(s, t2.id, "reply", p["agent2"], actor=actor(p["agent2"]), now=T0)
        assert r.ok and t2.status == "in_progress" and t2.assignee_id == p["agent2"].id
        assert t2.first_response_at == T0
        [row] = await audits(s, "ticket.reply", t2)
        assert (row.after or {}).get("status") == "in_progress"


async def test_permissions(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        t = await new(s, p["reporter"])
        for who in ("reporter", "colleague", "unit_admin", "retired", "unverified"):
            for action in ("claim", "resolve", "escalate", "need_info", "triage"):
                r = await act(s, t.id, action, p[who], actor=actor(p[who]))
                assert r.outcome is ActOutcome.forbidden, (who, action)
            r = await act(s, t.id, "set_priority", p[who], actor=actor(p[who]), value=2)
            assert r.outcome is ActOutcome.forbidden
        assert t.status == "new" and t.assignee_id is None and t.priority == 3
        for who in ("agent1", "operator", "colleague"):
            r = await act(s, t.id, "reporter_reply", p[who], actor=actor(p[who]))
            assert r.outcome is ActOutcome.forbidden, who
        r = await act(s, t.id, "add_info", p["stranger"], actor=actor(p["stranger"]), reason="x")
        assert r.outcome is ActOutcome.forbidden
        r = await act(s, t.id, "add_info", p["colleague"], actor=actor(p["colleague"]),
                      reason="Ở phòng tôi cũng vậy")
        assert r.ok  # a colleague follows the reported problem
        r = await act(s, t.id, "claim", p["operator"], actor=actor(p["operator"]))
        assert r.ok  # operators are agents too
        assert not await audits(s, "ticket.resolve")
        assert (await act(s, 10**6, "claim", p["agent1"], actor=actor(p["agent1"]))).outcome \
            is ActOutcome.not_found
        for action, value, reason in (("set_priority", 0, None), ("set_priority", 5, None),
                                      ("set_priority", None, None), ("add_info", None, " \x07"),
                                      ("drop_table", None, None)):
            who = p["reporter"] if action == "add_info" else p["agent1"]
            r = await act(s, t.id, action, who, actor=actor(who), value=value, reason=reason)
            assert r.outcome is ActOutcome.bad_value, (action, value)
        await act(s, t.id, "resolve", p["agent1"], actor=actor(p["agent1"]), now=T0)
        for v in (0, 6, None):
            r = await act(s, t.id, "rate", p["reporter"], actor=actor(p["reporter"]), value=v)
            assert r.outcome is ActOutcome.bad_value
        r = await act(s, t.id, "close", p["reporter"], actor=actor(p["reporter"]))
        assert r.ok and t.status == "closed"  # the reporter may confirm and close


async def test_two_agents_claim_at_the_same_moment(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        ids = [(await new(s, p["reporter"])).id for _ in range(3)]
        await s.commit()
    a1, a2 = p["agent1"], p["agent2"]

    async def claim(ticket_id: int, agent: Person) -> ActOutcome:
        async with seeded_maker() as s:
            r = await act(s, ticket_id, "claim", agent, actor=actor(agent))
            await asyncio.sleep(0.05)  # hold the transaction open: the other must wait
            await s.commit()
            return r.outcome

    for ticket_id in ids:
        outcomes = await asyncio.gather(claim(ticket_id, a1), claim(ticket_id, a2))
        assert sorted(outcomes) == [ActOutcome.already, ActOutcome.ok]
        async with seeded_maker() as s:
            t = await s.get(Ticket, ticket_id)
            assert t is not None and t.status == "in_progress"
            winner = (a1, a2)[outcomes.index(ActOutcome.ok)]
            assert t.assignee_id == winner.id
            assert len(await audits(s, "ticket.claim", t)) == 1


async def test_claim_rules(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        a1, a2 = p["agent1"], p["agent2"]
        t = await new(s, p["reporter"])
        assert (await act(s, t.id, "claim", a1, actor=actor(a1))).ok
        assert (await act(s, t.id, "claim", a2, actor=actor(a2))).outcome is ActOutcome.already
        assert (await act(s, t.id, "claim", a1, actor=actor(a1))).outcome is ActOutcome.already
        assert t.assignee_id == a1.id


async def test_reopen_window_and_rating_once(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        rep, ag = p["reporter"], p["agent1"]
        t = await new(s, rep, severity="critical")
        assert (await act(s, t.id, "rate", rep, actor=actor(rep), value=5)).outcome is \
            ActOutcome.invalid_transition
        await act(s, t.id, "claim", ag, actor=actor(ag), now=T0)
        resolved = T0 + timedelta(hours=1)
        r = await act(s, t.id, "resolve", ag, actor=actor(ag), now=resolved, reason="Đã cấp lại")
        assert r.ok and t.resolved_at == resolved and Notify.reporter in r.notify
        later = resolved + timedelta(days=6, hours=23)
        r = await act(s, t.id, "reopen", rep, actor=actor(rep), now=later, reason="Vẫn lỗi")
        assert r.ok and t.status == "reopened" and t.reopen_count == 1 and t.resolved_at is None
        assert t.sla_due_at == sla_due(later, "critical") and r.message is not None
        assert Notify.assignee in r.notify and Notify.group in r.notify
        r = await act(s, t.id, "claim", ag, actor=actor(ag), now=later)  # the owner takes it up
        assert r.ok and t.status == "in_progress"
        again = later + timedelta(hours=1)
        await act(s, t.id, "resolve", ag, actor=actor(ag), now=again)
        r = await act(s, t.id, "reopen", rep, actor=actor(rep),
                      now=again + timedelta(days=7, minutes=1))
        assert r.outcome is ActOutcome.too_late and t.status == "resolved"
        await act(s, t.id, "close", ag, actor=actor(ag), now=again + timedelta(days=8))
        r = await act(s, t.id, "reopen", rep, actor=actor(rep), now=again + timedelta(days=8))
        assert r.outcome is ActOutcome.too_late and t.status == "closed"
        r = await act(s, t.id, "rate", rep, actor=actor(rep), value=4, now=again)
        assert r.ok and t.csat == 4 and t.csat_at == again
        r = await act(s, t.id, "rate", rep, actor=actor(rep), value=1)
        assert r.outcome is ActOutcome.already and t.csat == 4
        assert len(await audits(s, "ticket.rate", t)) == 1
        assert len(await audits(s, "ticket.reopen", t)) == 1


# ------------------------------------------------------------------------------- incidents


async def test_incident_grouping(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        rep, ag = p["reporter"], p["agent1"]
        now = T0 + timedelta(hours=2)
        await new(s, rep, now=now - timedelta(minutes=90))  # outside the window
        await new(s, rep, now=now - timedelta(minutes=50), status="resolved")
        await new(s, rep, system="email", now=now - timedelta(minutes=10))
        group = [await new(s, who, now=now - timedelta(minutes=m))
                 for who, m in ((rep, 40), (p["stranger"], 20), (p["colleague"], 5))]
        assert await tickets.incident_candidate(s, "qlvb", now=now, threshold=4) is None
        found = await tickets.incident_candidate(s, "qlvb", now=now)
        assert found == group
        with pytest.raises(TicketError) as err:
            await tickets.create_incident(s, "qlvb", [t.id for t in group], rep, actor(rep), "x")
        assert err.value.code == "forbidden"
        inc = await tickets.create_incident(s, "qlvb", [t.id for t in group], ag, actor(ag),
                                            " QLVB không truy cập được ", now=now)
        assert inc.title == "QLVB không truy cập được" and inc.status == "open"
        assert all(t.incident_id == inc.id for t in group)
        assert await tickets.open_incident_for(s, "qlvb") is inc
        assert await tickets.open_incident_for(s, "email") is None
        assert await tickets.incident_candidate(s, "qlvb", now=now) is None
        late = await new(s, p["colleague"], now=now + timedelta(minutes=1))
        same = await tickets.create_incident(s, "qlvb", [late.id], p["agent2"],
                                             actor(p["agent2"]), "Trùng", now=now)
        assert same is inc and late.incident_id == inc.id  # never two open incidents
        email = await new(s, rep, system="email", now=now)
        mine = await new(s, rep, now=now)
        linked = await tickets.link_to_incident(s, inc.id, [email.id, mine.id], rep, actor(rep))
        assert linked == [mine] and email.incident_id is None  # other system skipped
        done = await tickets.resolve_incident(s, inc.id, ag, actor(ag), now + timedelta(hours=1))
        assert sorted(t.id for t in done) == sorted([*(t.id for t in group), late.id, mine.id])
        assert all(t.status == "resolved" and t.resolved_at == now + timedelta(hours=1)
                   for t in done)
        assert len(await audits(s, "ticket.resolve")) == len(done)
        assert await tickets.resolve_incident(s, inc.id, ag, actor(ag)) == []
        assert await tickets.open_incident_for(s, "qlvb") is None
        with pytest.raises(TicketError) as err:
            await tickets.link_to_incident(s, inc.id, [email.id], ag, actor(ag))
        assert err.value.code == "incident_closed"


# ----------------------------------------------------------------------------------- queue


async def test_queue_order_filters_and_pages(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        rep, a1 = p["reporter"], p["agent1"]
        now = T0 + timedelta(days=3)
        due = now + timedelta(hours=2)
        breached = await new(s, rep, severity="low", summary="Z" * 200,
                             sla_due_at=now - timedelta(minutes=30, seconds=10))
        tie_low = await new(s, rep, severity="low", sla_due_at=due)
        tie_crit = await new(s, p["stranger"], severity="critical", system="email",
                             sla_due_at=due, assignee_id=a1.id, status="waiting_reporter")
        soon = await new(s, rep, sla_due_at=now + timedelta(minutes=45), assignee_id=a1.id,
                         status="in_progress")
        undated = await new(s, rep, severity="critical", sla_due_at=None)
        await new(s, rep, status="resolved", sla_due_at=now - timedelta(days=1))
        await new(s, rep, status="closed")
        rows, total = await tickets.queue(s, now=now)
        assert total == 5
        assert [r.id for r in rows] == [breached.id, soon.id, tie_crit.id, tie_low.id,
                                        undated.id]
        assert rows[4].minutes_to_due is None and not rows[4].breached
        assert (await tickets.queue(s, now=now, count_cap=2))[1] == 2
        first = rows[0]
        assert first.breached and first.minutes_to_due == -31 and first.summary == "Z" * 80
        assert first.code == breached.code and first.system_abbr and first.unit_name
        assert rows[1].minutes_to_due == 45 and rows[1].assignee_name == "Lê Văn Cường"
        assert rows[3].assignee_name is None and rows[3].severity is Severity.low
        mine, n = await tickets.queue(s, person=a1, mine=True, now=now)
        assert n == 2 and [r.id for r in mine] == [soon.id, tie_crit.id]
        assert (await tickets.queue(s, mine=True, now=now))[1] == 0
        free, n = await tickets.queue(s, unassigned=True, now=now)
        assert n == 3 and [r.id for r in free] == [breached.id, tie_low.id, undated.id]
        by_sys, n = await tickets.queue(s, system_code="email", now=now)
        assert n == 1 and by_sys[0].id == tie_crit.id
        by_unit, n = await tickets.queue(s, unit_code=SAI_GON, now=now)
        assert n == 1 and by_unit[0].unit_code == SAI_GON
        page, n = await tickets.queue(s, now=now, offset=1, limit=2)
        assert n == 5 and [r.id for r in page] == [soon.id, tie_crit.id]
        page, n = await tickets.queue(s, now=now, offset=4, limit=2)
        assert n == 5 and [r.id for r in page] == [undated.id]
        both, n = await tickets.queue(s, unassigned=True, system_code="email", now=now)
        assert (both, n) == ([], 0)


# -------------------------------------------------------------------------------- SLA scan


async def test_sla_scan_is_idempotent(seeded_maker: Maker) -> None:
    now = T0 + timedelta(days=1)
    async with seeded_maker() as s:
        p = await add_people(s)
        rep = p["reporter"]
        warn = await new(s, rep, sla_due_at=now + timedelta(minutes=30))
        await new(s, rep, sla_due_at=now + timedelta(hours=2))
        late = await new(s, rep, sla_due_at=now - timedelta(minutes=1))
        await new(s, rep, status="resolved", sla_due_at=now - timedelta(hours=1))
        assert await tickets.sla_due_for_warning(s, now) == [warn]
        assert await tickets.sla_breached(s, now) == [late]
        await s.commit()
        ids = (warn.id, late.id)

    async def mark(fn: Any, ticket_id: int) -> bool:
        async with seeded_maker() as s:
            done = await fn(s, ticket_id, now)
            await asyncio.sleep(0.03)
            await s.commit()
            return bool(done)

    warned = await asyncio.gather(mark(tickets.mark_warned, ids[0]),
                                  mark(tickets.mark_warned, ids[0]))
    breached = await asyncio.gather(mark(tickets.mark_breached, ids[1]),
                                    mark(tickets.mark_breached, ids[1]))
    assert sorted(warned) == [False, True] and sorted(breached) == [False, True]
    async with seeded_maker() as s:
        assert await tickets.sla_due_for_warning(s, now) == []
        assert await tickets.sla_breached(s, now) == []
        assert not await tickets.mark_warned(s, ids[0], now)
        # an hour later the second ticket enters the window, the warned one does not come back
        nxt = await tickets.sla_due_for_warning(s, now + timedelta(hours=1, minutes=30))
        assert len(nxt) == 1 and nxt[0].id not in ids
        assert len(await audits(s, "ticket.sla_warning")) == 1
        assert len(await audits(s, "ticket.sla_breach")) == 1


# -------------------------------------------------------------------- messages and groups


async def test_messages_routes_and_edits(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        t = await new(s, p["reporter"])
        await tickets.record_publication(s, t.id, -100123, 77, 900)
        assert t.group_chat_id == "-100123" and t.topic_id == 77 and t.card_message_id == 900
        assert await tickets.by_topic(s, "-100123", 77) is t
        assert await tickets.by_topic(s, "-100123", 78) is None
        assert await tickets.by_message(s, -100123, 900) is t
        m = await tickets.add_message(s, t, "agent", p["agent1"], "Anh thử lại nhé",
                                      src=("-100123", 901), dst=(5550001, 31),
                                      attachments=[AttachmentIn("photo", "ph1")])
        await s.flush()
        assert await tickets.find_message_by_src(s, -100123, 901) is m
        assert await tickets.find_message_by_dst(s, "5550001", 31) is m
        assert await tickets.by_message(s, 5550001, 31) is t  # the reporter replies to the copy
        assert await tickets.find_message_by_src(s, "-100123", 31) is None
        files = await tickets.attachments_of(s, t.id)
        assert [(f.file_id, f.message_id) for f in files] == [("ph1", m.id)]
        edited = await tickets.mark_edited(s, -100123, 901, "Anh thử lại lần nữa", now=T0)
        assert edited is m and m.text == "Anh thử lại lần nữa" and m.edited_at == T0
        assert await tickets.mark_edited(s, -100123, 999, "x") is None
        r = await tickets.add_message(s, t, "reporter", p["reporter"], "Vẫn lỗi",
                                      src=(5550001, 32))
        await s.flush()
        await tickets.set_message_route(s, r.id, dst=("-100123", 902))
        assert await tickets.by_message(s, "-100123", 902) is t
        with pytest.raises(TicketError):
            await tickets.add_message(s, t, "spam", None, "x")
        view = await tickets.card_view(s, t)
        assert view.code == t.code and view.reporter_name == "Nguyễn Văn An"
        assert view.unit_name and view.system_name("en") and view.attachments == 1
        assert view.assignee_name is None and view.status is TicketStatus.new


async def test_support_group(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        assert await tickets.current_support_group(s) is None
        with pytest.raises(TicketError):
            await tickets.set_support_group(s, "-1001", "Hỗ trợ", True, p["agent1"],
                                            actor(p["agent1"]))
        op = p["operator"]
        g1 = await tickets.set_support_group(s, -1001, "Hỗ trợ", True, op, actor(op), now=T0)
        await s.flush()
        assert await tickets.current_support_group(s) is g1 and g1.is_forum
        g2 = await tickets.set_support_group(s, "-1002", "Nhóm\x07 mới", False, op, actor(op),
                                             now=T0 + timedelta(hours=1))
        await s.flush()
        assert await tickets.current_support_group(s) is g2 and g2.title == "Nhóm mới"
        assert not g1.active
        again = await tickets.set_support_group(s, "-1001", "Hỗ trợ 2", True, op, actor(op),
                                                now=T0 + timedelta(hours=2))
        await s.flush()
        assert again is g1 and g1.active and not g2.active
        assert len(await audits(s, "support_group.set")) == 3


# ------------------------------------------------------------------------------ statistics


def vn(d: int, h: int, mi: int = 0) -> datetime:
    return datetime(2025, 7, d, h, mi, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh"))


async def test_stats_medians_on_constructed_data(seeded_maker: Maker) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        rep, other = p["reporter"], p["stranger"]
        # Mon 7/7 09:00: answered in 30 min, resolved at 14:00 (5 h wall, 3 h business)
        await new(s, rep, now=vn(7, 9), first_response_at=vn(7, 9, 30),
                  resolved_at=vn(7, 14), status="closed", csat=5)
        # Mon 16:00: answered Tue 08:00 (16 h wall, 1.5 h business), resolved Tue 10:00
        await new(s, other, now=vn(7, 16), first_response_at=vn(8, 8), resolved_at=vn(8, 10),
                  status="resolved", csat=3)
        # Fri 4/7 16:00, critical: answered Mon 08:30, still open, past its due time
        await new(s, rep, system="email", severity="critical", now=vn(4, 16),
                  first_response_at=vn(7, 8, 30), status="in_progress")
        await new(s, rep, now=vn(1, 6) - timedelta(days=1))  # before the period
        await s.flush()
        since, until = datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 8, 1, tzinfo=UTC)
        st = await ticket_stats.ticket_stats(s, since=since, until=until, now=vn(9, 9))
        assert st.total == 3
        assert st.first_response.count == 3
        assert st.first_response.median_wall == timedelta(hours=16)
        assert st.first_response.median_business == timedelta(hours=1.5)
        assert st.resolution.count == 2
        assert st.resolution.median_wall == timedelta(hours=11.5)
        assert st.resolution.median_business == timedelta(hours=3.25)
        assert st.breached == 1 and st.breach_rate == pytest.approx(1 / 3)
        assert (st.csat_count, st.csat_avg) == (2, 4.0)
        assert st.by_status[TicketStatus.closed] == 1 and st.by_status[TicketStatus.new] == 0
        assert st.by_severity[Severity.critical] == 1 and st.by_severity[Severity.normal] == 2
        qlvb, email = st.by_system
        assert (qlvb.code, qlvb.total, qlvb.open, qlvb.csat_count, qlvb.csat_avg) == \
            ("qlvb", 2, 0, 2, 4.0)
        assert (email.code, email.breached, email.csat_avg) == ("email", 1, None)
        assert email.name("vi") and email.name("en")
        ben, sai = st.by_unit
        assert (ben.code, ben.total, ben.csat_avg, sai.code, sai.csat_avg) == \
            (BEN_THANH, 2, 5.0, SAI_GON, 3.0)
        empty = await ticket_stats.ticket_stats(s, since=until, until=until + timedelta(days=1),
                                                now=until)
        assert empty.total == 0 and empty.first_response.median_wall is None
        assert empty.breach_rate is None and empty.csat_avg is None

        from openpyxl import load_workbook

        for lang, sheets in (("vi", ["Tổng hợp", "Theo hệ thống", "Theo đơn vị"]),
                             ("en", ["Summary", "By system", "By unit"])):
            wb = load_workbook(io.BytesIO(ticket_stats.export_stats_xlsx(st, lang)))
            assert wb.sheetnames == sheets
            summary = {r[0]: r[1] for r in wb[sheets[0]].iter_rows(values_only=True) if r}
            assert 3 in summary.values() and 16.0 in summary.values() and 3.25 in summary.values()
            rows = list(wb[sheets[1]].iter_rows(values_only=True))
            assert rows[1][:3] == ("qlvb", qlvb.name(lang), 2)


# ----------------------------------------------------------------------------------- texts


LOCALES = Path(__file__).resolve().parent.parent / "services" / "locales"


def flat(table: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in table.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_ticket_texts_in_both_languages() -> None:
    keys = {}
    for lang in ("vi", "en"):
        with (LOCALES / lang / "tickets.toml").open("rb") as fh:
            keys[lang] = flat(tomllib.load(fh))
    assert keys["vi"] == keys["en"]
    wanted = {f"ticket.status.{s.value}" for s in TicketStatus}
    wanted |= {f"ticket.severity.{s.value}" for s in Severity}
    wanted |= {f"ticket.priority.{n}" for n in range(1, 5)}
    assert wanted <= keys["vi"]
    source = Path(ticket_stats.__file__).read_text(encoding="utf-8")
    used = set(re.findall(r'"([a-z_]+)"', source.split("def export_stats_xlsx", 1)[1]))
    xlsx = {k.split(".")[-1] for k in keys["vi"] if k.startswith("ticket.xlsx.")}
    assert xlsx <= used  # no stale header (rendering the export proves none is missing)
