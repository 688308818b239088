"""Migration status: next milestone, overdue rules, permissions, history, concurrency (both DBs)."""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import (
    AuditLog,
    Milestone,
    Person,
    Role,
    Stage,
    StatusHistory,
    System,
    Unit,
    UnitSystemStatus,
    utcnow,
)
from services import status
from services.audit import Actor
from services.status import SetStageOutcome, clean_note, set_stage

TODAY = date(2025, 7, 10)
BEN_THANH, SAI_GON = "26743", "26740"  # HCMC (79)
XUAN_HUONG = "24781"  # Lâm Đồng (68)
HOAN_KIEM = "00070"  # Hà Nội (01): only national milestones
SEED_004 = "004_ec72b4403d84609d.txt"
SEED_001 = "001_789496355b2efce9.txt"


async def add_people(s: AsyncSession) -> dict[str, Person]:
    now = utcnow()
    people = {
        "official": Person(full_name="Nguyễn Văn An", name_folded="nguyen van an",
                           unit_code=BEN_THANH, role=Role.official.value, verified_at=now),
        "admin": Person(full_name="Trần Thị Bình", name_folded="tran thi binh",
                        unit_code=BEN_THANH, role=Role.unit_admin.value, verified_at=now),
        "support": Person(full_name="Lê Văn Cường", name_folded="le van cuong",
                          role=Role.support.value, verified_at=now),
        "operator": Person(full_name="Phạm Thị Dung", name_folded="pham thi dung",
                           role=Role.dtc_admin.value, verified_at=now),
        "unverified": Person(full_name="Võ Minh Em", name_folded="vo minh em",
                             unit_code=BEN_THANH, role=Role.unit_admin.value),
    }
    s.add_all(people.values())
    await s.flush()
    return people


async def put(s: AsyncSession, unit: str, stages: dict[str, str]) -> None:
    """Generated statuses, written directly (no history): what a migration would load."""
    await s.execute(delete(UnitSystemStatus).where(UnitSystemStatus.unit_code == unit,
                                                   UnitSystemStatus.system_code.in_(stages)))
    await s.execute(insert(UnitSystemStatus), [
        {"unit_code": unit, "system_code": sys, "stage": st, "updated_at": utcnow()}
        for sys, st in stages.items()
    ])


async def all_codes(s: AsyncSession) -> list[str]:
    return list(await s.scalars(select(System.code).order_by(System.sort)))


def line(view: status.UnitStatusView, system: str) -> status.SystemLine:
    return next(x for x in view.systems if x.system_code == system)


# ------------------------------------------------------------------------------ unit status


async def test_unit_status_hcmc(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        await put(s, BEN_THANH, {"qlvb": "deployed", "tthc": "live"})
        view = await status.unit_status(s, BEN_THANH, TODAY)
        assert view is not None and view.unit_name == "Phường Bến Thành"
        assert view.province_name == "Thành phố Hồ Chí Minh"
        assert [x.system_code for x in view.systems] == await all_codes(s)

        email = line(view, "email")  # no row: not_started, two HCMC email deadlines missed
        assert email.stage is Stage.not_started and email.updated_at is None
        assert email.milestone is not None and email.milestone.key == "hcm_email_lists"
        assert email.milestone.due == date(2025, 5, 10) and email.milestone.source == SEED_004
        assert email.days_left == -61 and email.behind and email.overdue
        assert email.overdue_count == 2

        qlvb = line(view, "qlvb")  # deployed: training (trained by 28/8) is next, not late
        assert qlvb.milestone is not None and qlvb.milestone.key == "hcm_qlvb_training"
        assert qlvb.days_left == 49 and qlvb.behind and not qlvb.overdue

        tthc = line(view, "tthc")  # live: every stage reached, the next date is shown
        assert tthc.milestone is not None and tthc.milestone.key == "hcm_tthc_training"
        assert not tthc.behind and not tthc.overdue and tthc.days_left == 49

        keys = {x.milestone.key for x in view.systems if x.milestone}
        assert not any(k.startswith(("bt_", "ld_")) for k in keys)
        assert view.overdue_systems == sum(1 for x in view.systems if x.overdue) >= 1
        assert all(m.system_code is None for m in view.general)
        assert await status.unit_status(s, "nope", TODAY) is None


async def test_unit_status_province_scope(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        view = await status.unit_status(s, XUAN_HUONG, TODAY)
        assert view is not None and view.province_code == "68"
        qlvb = line(view, "qlvb")
        assert qlvb.milestone is not None and qlvb.milestone.key == "bt_qlvb_communes"
        assert qlvb.milestone.source == SEED_001
        assert qlvb.days_left == -25 and qlvb.overdue and qlvb.overdue_count == 2  # + ld_qlvb_new
        keys = {x.milestone.key for x in view.systems if x.milestone}
        assert not any(k.startswith("hcm_") for k in keys)
        assert line(view, "1022").milestone is None  # no national or Lâm Đồng 1022 milestone

        hanoi = await status.unit_status(s, HOAN_KIEM, TODAY)
        assert hanoi is not None
        assert {x.milestone.key for x in hanoi.systems if x.milestone} == {
            "nat_mang_tsl_tests", "nat_portal_test"}


async def test_pilot_scope_rule(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    """A pilot milestone applies only to units already at ≥ pilot (of its province)."""
    async with seeded_maker() as s:
        by_system = await status.load_milestones(s)
        pilot = next(m for m in by_system["qlvb"] if m.key == "hcm_qlvb_pilot")
        assert pilot.scope == "pilot" and pilot.province_code == "79"
        assert not pilot.applies("79", Stage.surveyed)
        assert pilot.applies("79", Stage.pilot) and pilot.applies("79", Stage.live)
        assert not pilot.applies("68", Stage.live)

        # Before the pilot date a live unit sees the pilot date as the next one; a unit below
        # pilot does not (its next is the rollout to all units).
        early = date(2025, 6, 1)
        await put(s, BEN_THANH, {"qlvb": "live"})
        await put(s, SAI_GON, {"qlvb": "surveyed"})
        live_view = await status.unit_status(s, BEN_THANH, early)
        low_view = await status.unit_status(s, SAI_GON, early)
        assert live_view and low_view
        assert line(live_view, "qlvb").milestone.key == "hcm_qlvb_pilot"  # type: ignore[union-attr]
        assert line(low_view, "qlvb").milestone.key == "hcm_qlvb_rollout"  # type: ignore[union-attr]

        # A pilot milestone requiring more than pilot: late for pilot units only (not committed).
        s.add(Milestone(key="t_pilot_live", system_code="qlvb", name_vi="t", name_en="t",
                        due_date=date(2025, 6, 20), stage_required="deployed", scope="pilot",
                        province_code="79", source="test"))
        await s.flush()
        await put(s, BEN_THANH, {"qlvb": "pilot"})
        piloting = line(await status.unit_status(s, BEN_THANH, TODAY), "qlvb")  # type: ignore[arg-type]
        others = line(await status.unit_status(s, SAI_GON, TODAY), "qlvb")  # type: ignore[arg-type]
        assert piloting.milestone.key == "t_pilot_live" and piloting.overdue  # type: ignore[union-attr]
        assert piloting.days_left == -20
        assert others.milestone.key == "hcm_qlvb_rollout" and not others.overdue  # type: ignore[union-attr]
        await s.rollback()


# -------------------------------------------------------------------------------- set_stage


async def count(s: AsyncSession, model: Any, *where: Any) -> int:
    return await s.scalar(select(func.count()).select_from(model).where(*where)) or 0


async def test_set_stage_permissions_history_audit(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        await s.commit()
        actor = Actor("test:admin", p["admin"].id)

        r = await set_stage(s, BEN_THANH, "qlvb", "pilot", actor=actor, person=p["admin"],
                            note="  Đã cài đặt\nthử nghiệm\x00 ")
        assert r.outcome is SetStageOutcome.updated and r.ok
        assert (r.old_stage, r.new_stage, r.note) == (Stage.not_started, Stage.pilot,
                                                       "Đã cài đặt thử nghiệm")
        for who, unit in (("admin", SAI_GON), ("official", BEN_THANH), ("support", BEN_THANH),
                          ("unverified", BEN_THANH)):
            res = await set_stage(s, unit, "qlvb", "live", actor=actor, person=p[who])
            assert res.outcome is SetStageOutcome.forbidden, who
        op = Actor("test:op", p["operator"].id)
        res = await set_stage(s, XUAN_HUONG, "email", Stage.surveyed, actor=op,
                              person=p["operator"])
        assert res.outcome is SetStageOutcome.updated
        assert (await set_stage(s, "99999", "qlvb", "live", actor=op, person=p["operator"])
                ).outcome is SetStageOutcome.unknown_unit
        assert (await set_stage(s, BEN_THANH, "nope", "live", actor=op, person=p["operator"])
                ).outcome is SetStageOutcome.unknown_system
        assert (await set_stage(s, BEN_THANH, "qlvb", "done", actor=op, person=p["operator"])
                ).outcome is SetStageOutcome.bad_stage
        same = await set_stage(s, BEN_THANH, "qlvb", "pilot", actor=actor, person=p["admin"])
        assert same.outcome is SetStageOutcome.unchanged

        back = await set_stage(s, BEN_THANH, "qlvb", "surveyed", actor=actor, person=p["admin"])
        assert back.outcome is SetStageOutcome.needs_confirmation and back.backwards
        assert back.old_stage is Stage.pilot
        row = await s.get(UnitSystemStatus, (BEN_THANH, "qlvb"))
        assert row is not None and row.stage == "pilot"
        back = await set_stage(s, BEN_THANH, "qlvb", "surveyed", actor=actor, person=p["admin"],
                               note="x" * 900, confirm_backwards=True)
        assert back.outcome is SetStageOutcome.updated and back.note == "x" * 500
        await s.commit()

    async with seeded_maker() as s:
        row = await s.get(UnitSystemStatus, (BEN_THANH, "qlvb"))
        assert row is not None and row.stage == "surveyed" and row.updated_by == p["admin"].id
        hist = await status.history(s, BEN_THANH, "qlvb")
        assert [(h.old_stage, h.new_stage) for h in hist] == [
            (Stage.pilot, Stage.surveyed), (Stage.not_started, Stage.pilot)]
        assert hist[1].note == "Đã cài đặt thử nghiệm" and hist[0].actor_name == "Trần Thị Bình"
        assert await count(s, StatusHistory) == 3
        audits = list(await s.scalars(select(AuditLog).where(AuditLog.action == "status.update")
                                      .order_by(AuditLog.id)))
        assert len(audits) == 3
        assert audits[0].object_id == f"{BEN_THANH}:qlvb" and audits[0].actor == "test:admin"
        assert audits[0].before == {"stage": "not_started", "note": None}
        assert audits[0].after == {"stage": "pilot", "note": "Đã cài đặt thử nghiệm"}
        assert (audits[2].before or {})["stage"] == "pilot"
        assert (audits[2].after or {})["stage"] == "surveyed"
        view = await status.unit_status(s, BEN_THANH, TODAY)
        assert view and line(view, "qlvb").updated_by == "Trần Thị Bình"


def test_clean_note() -> None:
    assert clean_note(None) is None and clean_note(" \n\t ") is None
    assert clean_note("a\r\nb\u200bc\x07") == "a bc"
    assert len(clean_note("y" * 2000) or "") == 500


@pytest.mark.parametrize("start", [None, "surveyed"])
async def test_concurrent_updates_keep_every_history_row(
    seeded_maker: async_sessionmaker[AsyncSession], start: str | None
) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        if start:
            await put(s, BEN_THANH, {"email": start})
        await s.commit()
    op = p["operator"]

    async def worker(stage: str) -> SetStageOutcome:
        async with seeded_maker() as s:
            r = await set_stage(s, BEN_THANH, "email", stage, actor=Actor("t", op.id),
                                person=op, note=stage, confirm_backwards=True)
            await asyncio.sleep(0.05)  # hold the lock so the other writer has to wait
            await s.commit()
            return r.outcome

    outcomes = await asyncio.gather(worker("deployed"), worker("trained"))
    assert outcomes == [SetStageOutcome.updated, SetStageOutcome.updated]
    async with seeded_maker() as s:
        hist = list(await s.scalars(select(StatusHistory).where(
            StatusHistory.unit_code == BEN_THANH, StatusHistory.system_code == "email"
        ).order_by(StatusHistory.id)))
        assert sorted(h.new_stage for h in hist) == ["deployed", "trained"]
        assert hist[0].old_stage == (start or "not_started")
        assert hist[1].old_stage == hist[0].new_stage  # the second writer saw the first's result
        row = await s.get(UnitSystemStatus, (BEN_THANH, "email"))
        assert row is not None and row.stage == hist[1].new_stage


# ------------------------------------------------------------------ overviews and ordering


async def test_province_overview_and_system_view(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with seeded_maker() as s:
        n_hcmc = await count(s, Unit, Unit.province_code == "79", Unit.active.is_(True),
                             Unit.kind.in_(status.TRACKED_KINDS))
        await put(s, BEN_THANH, {"qlvb": "live", "email": "trained"})
        await put(s, SAI_GON, {"qlvb": "pilot", "email": "live"})
        await put(s, XUAN_HUONG, {"qlvb": "live"})  # another province: not counted
        ov = await status.province_overview(s, "79", TODAY)
        assert ov.total_units == n_hcmc == 168 and ov.province_name == "Thành phố Hồ Chí Minh"
        assert [c.system_code for c in ov.systems] == await all_codes(s)
        for c in ov.systems:
            assert c.total == n_hcmc
        qlvb = next(c for c in ov.systems if c.system_code == "qlvb")
        assert qlvb.counts[Stage.live] == 1 and qlvb.counts[Stage.pilot] == 1
        assert qlvb.counts[Stage.not_started] == n_hcmc - 2
        email = next(c for c in ov.systems if c.system_code == "email")
        assert email.overdue_units == n_hcmc - 2  # trained and live reached both deadlines
        assert email.counts[Stage.trained] == 1 and email.live == 1

        nat = await status.province_overview(s, None, TODAY)
        assert nat.total_units >= 3321 and nat.province_name is None
        assert next(c for c in nat.systems if c.system_code == "qlvb").live == 2

        view = await status.system_status(s, "qlvb", province_code="79", today=TODAY)
        assert view is not None and view.total_units == n_hcmc
        assert [u.code for u in view.live_units] == [BEN_THANH]
        assert [u.name for u in view.pilot_units] == ["Phường Sài Gòn"]
        assert view.next_milestone is not None and view.next_milestone.key == "hcm_qlvb_rollout"
        assert view.days_left == 36 and view.overdue_units == 0
        lam_dong = await status.system_status(s, "qlvb", province_code="68", today=TODAY)
        assert lam_dong is not None and lam_dong.overdue_units == lam_dong.total_units - 1
        assert await status.system_status(s, "nope", today=TODAY) is None


async def test_overdue_units_worst_first(seeded_maker: async_sessionmaker[AsyncSession]) -> None:
    async with seeded_maker() as s:
        systems = await all_codes(s)
        everything_live = dict.fromkeys(systems, "live")
        await put(s, BEN_THANH, everything_live)  # nothing overdue
        # Same number of overdue milestones (2), different age: email 61 days, video 56 days.
        await put(s, SAI_GON, {**everything_live, "hop_truc_tuyen": "not_started"})
        await put(s, "26737", {**everything_live, "email": "not_started"})
        rows: list[status.OverdueUnit] = []
        offset, total = 0, None
        while True:
            page, total = await status.overdue_units(s, "79", TODAY, offset=offset, limit=50)
            rows += page
            offset += 50
            if not page:
                break
        assert total == len(rows) == 167
        assert BEN_THANH not in {r.unit_code for r in rows}
        keys = [(-r.overdue_count, -r.max_days_overdue, r.unit_code) for r in rows]
        assert keys == sorted(keys)
        assert [r.unit_code for r in rows[-2:]] == ["26737", SAI_GON]
        last = rows[-1]
        assert last.overdue_count == 2 and last.max_days_overdue == 56
        assert [x.system_code for x in last.systems] == ["hop_truc_tuyen"]
        assert last.systems[0].milestone.key == "hcm_hop_truc_tuyen_survey"

        only_email, n = await status.overdue_units(s, "79", TODAY, system_code="email", limit=5)
        assert n == 167 - 1 and all(
            [x.system_code for x in r.systems] == ["email"] for r in only_email)


async def test_status_version_changes_with_data(
    seeded_maker: async_sessionmaker[AsyncSession],
) -> None:
    async with seeded_maker() as s:
        p = await add_people(s)
        v1 = await status.status_version(s, "79")
        assert v1 == await status.status_version(s, "79")
        other = await status.status_version(s, "68")
        await set_stage(s, BEN_THANH, "qlvb", "pilot", actor=Actor("t"), person=p["operator"])
        v2 = await status.status_version(s, "79")
        assert v2 != v1 and await status.status_version(s, "68") == other
