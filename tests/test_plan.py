"""The plan data: faithful to the seed articles, validated, loaded idempotently, XLSX round trip."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest
from openpyxl import load_workbook
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import AuditLog, Milestone, Province, Stage, System
from knowledge.plan import (
    Plan,
    PlanError,
    export_plan_xlsx,
    import_plan_xlsx,
    load_plan,
    load_plan_file,
    plan_from_db,
)
from services.audit import Actor

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT.parent / "shared" / "seeds"
ACTOR = Actor(label="test:plan")

SYSTEM_CODES = {
    "qlvb",
    "tthc",
    "email",
    "1022",
    "chuky_so",
    "ma_dinh_danh",
    "cong_ttdt",
    "mang_tsl",
    "hop_truc_tuyen",
    "csdl_cbcc",
}

# DESIGN.md §4, checked against the seeds
KEY_DATES = {
    "hcm_hop_truc_tuyen_survey": date(2025, 5, 15),
    "hcm_email_lists": date(2025, 5, 10),
    "hcm_email_accounts": date(2025, 6, 10),
    "hcm_qlvb_pilot": date(2025, 6, 15),
    "hcm_qlvb_rollout": date(2025, 8, 15),
    "hcm_qlvb_training": date(2025, 8, 28),
    "hcm_qlvb_official": date(2025, 9, 1),
    "hcm_tthc_rollout_start": date(2025, 5, 20),
    "hcm_tthc_training": date(2025, 8, 28),
    "hcm_tthc_official": date(2025, 9, 1),
    "hcm_1022_plan": date(2025, 6, 30),
    "hcm_1022_official": date(2025, 9, 1),
    "hcm_phase2_plan": date(2025, 12, 31),
    "bt_hop_truc_tuyen_rooms": date(2025, 6, 15),
    "nat_two_tier_official": date(2025, 7, 1),
    "ld_tthc_motcua": date(2025, 7, 1),
}

MONTHS_FR = "janvier février mars avril mai juin juillet août septembre octobre novembre décembre"
MONTHS_EN = "January February March April May June July August September October November December"


@pytest.fixture(scope="module")
def plan() -> Plan:
    return load_plan_file()


def seed_text(name: str) -> str:
    return (SEEDS / name).read_text(encoding="utf-8")


def date_forms(d: date, precision: str) -> list[str]:
    """How the articles write a date: "15-6" (vi), "15 juin"/"1er juillet" (fr), "June 15" (en)."""
    fr = MONTHS_FR.split()[d.month - 1]
    en = MONTHS_EN.split()[d.month - 1]
    if precision == "month":
        return [f"tháng {d.month}-", f"tháng {d.month} ", f"{fr} 2025", f"{en} 2025"]
    day_fr = "1er" if d.day == 1 else str(d.day)
    return [f"{d.day}-{d.month}", f"{day_fr} {fr}", f"{en} {d.day}", f"{d.day} {en}"]


def test_plan_file_loads(plan: Plan) -> None:
    assert {s.code for s in plan.systems} == SYSTEM_CODES
    assert len(plan.milestones) >= 30
    assert [s.sort for s in plan.systems] == sorted(s.sort for s in plan.systems)
    stages = {s.value for s in Stage}
    for m in plan.milestones:
        assert m.system is None or plan.system(m.system)
        assert m.stage_required is None or m.stage_required in stages
        assert m.scope in ("all", "pilot") or m.scope == f"province:{m.province}"
    # every system has at least one dated milestone
    dated = {m.system for m in plan.milestones if m.due}
    assert SYSTEM_CODES - {"csdl_cbcc"} <= dated


def test_every_milestone_cites_an_existing_seed(plan: Plan) -> None:
    assert SEEDS.is_dir(), f"shared seeds not found at {SEEDS}"
    for m in plan.milestones:
        for name in (m.source, *m.see_also):
            assert re.fullmatch(r"\d{3}_[0-9a-f]{16}\.txt", name), (m.key, name)
            assert (SEEDS / name).is_file(), (m.key, name)
    for s in plan.systems:
        assert s.source and (SEEDS / s.source).is_file(), s.code


def test_every_date_is_written_in_a_cited_seed(plan: Plan) -> None:
    """No invented dates: each due date appears, in some language's form, in a cited article."""
    for m in plan.milestones:
        if m.due is None:
            assert m.note, f"{m.key}: undated milestones explain why in a note"
            continue
        texts = [seed_text(n) for n in (m.source, *m.see_also)]
        forms = date_forms(m.due, m.precision)
        assert any(f in t for f in forms for t in texts), (m.key, m.due, forms)
        if m.precision == "month":
            assert m.note and "month" in m.note


def test_key_dates_match_the_design(plan: Plan) -> None:
    for key, due in KEY_DATES.items():
        m = plan.milestone(key)
        assert m is not None, key
        assert m.due == due, key
    assert plan.milestone("hcm_1022_plan").precision == "month"  # type: ignore[union-attr]
    pilot = plan.milestone("hcm_qlvb_pilot")
    assert pilot and pilot.scope == "pilot" and pilot.province == "79"
    assert plan.milestone("bt_cong_ttdt_domains").province == "68"  # type: ignore[union-attr]


def write_plan(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(body, encoding="utf-8")
    return path


SYSTEM = """
[[systems]]
code = "qlvb"
abbr = "QLVB"
name_vi = "Quản lý văn bản"
name_en = "Document management"
"""


def test_validation_lists_every_problem(tmp_path: Path) -> None:
    body = (
        SYSTEM
        + """
[[milestones]]
key = "a"
system = "nope"
name_vi = "x"
name_en = "x"
due = "2025-13-40"
stage_required = "done"
source = "004_ec72b4403d84609d.txt"

[[milestones]]
key = "b"
name_vi = "x"
name_en = "x"
scope = "province:99"
precision = "month"
due = 2025-06-15
source = "004_ec72b4403d84609d.txt"

[[milestones]]
key = "b"
name_vi = "x"
name_en = "x"
source = "004_ec72b4403d84609d.txt"
"""
    )
    with pytest.raises(PlanError) as err:
        load_plan_file(write_plan(tmp_path, body))
    text = str(err.value)
    assert "milestones[1] (a): unknown system 'nope'" in text
    assert "milestones[1] (a): due '2025-13-40' is not a date" in text
    assert "milestones[1] (a): stage_required 'done'" in text
    assert "milestones[2] (b): scope 'province:99' names an unknown province" in text
    assert "last day (2025-06-30)" in text
    assert "duplicate milestone key 'b'" in text
    assert len(err.value.problems) == 6


def test_month_and_vietnamese_dates_are_accepted(tmp_path: Path) -> None:
    body = (
        SYSTEM
        + """
[[milestones]]
key = "m"
system = "qlvb"
name_vi = "x"
name_en = "x"
due = "2025-06"
source = "004_ec72b4403d84609d.txt"

[[milestones]]
key = "d"
system = "qlvb"
name_vi = "x"
name_en = "x"
due = "15/8/2025"
scope = "province:79"
source = "004_ec72b4403d84609d.txt"
"""
    )
    plan = load_plan_file(write_plan(tmp_path, body))
    m, d = plan.milestone("m"), plan.milestone("d")
    assert m and m.due == date(2025, 6, 30) and m.precision == "month"
    assert d and d.due == date(2025, 8, 15) and d.province == "79"


async def count(session: AsyncSession, model: type) -> int:
    return (await session.scalar(select(func.count()).select_from(model))) or 0


async def test_load_plan_is_idempotent(session: AsyncSession, plan: Plan) -> None:
    first = await load_plan(session, ACTOR, plan)
    await session.commit()
    assert first["systems_created"] == 10
    assert first["milestones_created"] == len(plan.milestones)
    assert set(first["provinces_created"]) == {"68", "79"}
    audits = await count(session, AuditLog)
    assert audits == 10 + len(plan.milestones) + 2

    second = await load_plan(session, ACTOR, plan)
    await session.commit()
    assert second["systems_unchanged"] == 10
    assert second["milestones_unchanged"] == len(plan.milestones)
    assert second["systems_created"] == second["milestones_created"] == 0
    assert second["provinces_created"] == []
    assert await count(session, AuditLog) == audits
    assert await count(session, Milestone) == len(plan.milestones)
    assert await count(session, System) == 10
    hcm = await session.get(Province, "79")
    assert hcm and hcm.name_folded == "thanh pho ho chi minh"

    row = await session.scalar(select(Milestone).where(Milestone.key == "hcm_qlvb_rollout"))
    assert row and row.due_date == date(2025, 8, 15) and row.stage_required == "deployed"
    assert row.source == "004_ec72b4403d84609d.txt" and row.province_code == "79"


async def test_load_plan_updates_and_audits_changes(session: AsyncSession, plan: Plan) -> None:
    await load_plan(session, ACTOR, plan)
    await session.commit()
    moved = tuple(
        replace(m, due=date(2025, 8, 20)) if m.key == "hcm_qlvb_rollout" else m
        for m in plan.milestones
    )
    systems = tuple(
        replace(s, name_en="Document management (new)") if s.code == "qlvb" else s
        for s in plan.systems
    )
    result = await load_plan(session, ACTOR, Plan(systems=systems, milestones=moved))
    await session.commit()
    assert result["milestones_updated"] == 1 and result["systems_updated"] == 1
    log = await session.scalar(
        select(AuditLog).where(
            AuditLog.action == "milestone.update", AuditLog.object_id == "hcm_qlvb_rollout"
        )
    )
    assert (
        log and log.before == {"due_date": "2025-08-15"} and log.after == {"due_date": "2025-08-20"}
    )
    log = await session.scalar(select(AuditLog).where(AuditLog.action == "system.update"))
    assert log and log.after == {"name_en": "Document management (new)"}


async def test_prune_removes_milestones_not_in_plan(session: AsyncSession, plan: Plan) -> None:
    await load_plan(session, ACTOR, plan)
    smaller = Plan(systems=plan.systems, milestones=plan.milestones[1:])
    kept = await load_plan(session, ACTOR, smaller)
    assert kept["milestones_not_in_plan"] == [plan.milestones[0].key]
    assert await count(session, Milestone) == len(plan.milestones)
    pruned = await load_plan(session, ACTOR, smaller, prune=True)
    await session.commit()
    assert pruned["milestones_deleted"] == 1
    assert await count(session, Milestone) == len(plan.milestones) - 1


async def test_plan_from_db_round_trips(session: AsyncSession, plan: Plan) -> None:
    await load_plan(session, ACTOR, plan)
    await session.commit()
    assert await plan_from_db(session, plan) == plan


def test_xlsx_round_trip(plan: Plan) -> None:
    data = export_plan_xlsx(plan)
    wb = load_workbook(io.BytesIO(data))
    assert {"systems", "milestones"} <= set(wb.sheetnames)
    assert import_plan_xlsx(data) == plan


def test_xlsx_edits_are_imported(plan: Plan) -> None:
    wb = load_workbook(io.BytesIO(export_plan_xlsx(plan)))
    ws = wb["milestones"]
    header = [c.value for c in ws[1]]
    for row in ws.iter_rows(min_row=2):
        if row[0].value == "hcm_qlvb_official":
            row[header.index("due")].value = "2/9/2025"
    wb["systems"].append(["sso", "SSO", "Đăng nhập một lần", "Single sign-on", 110, None])
    buf = io.BytesIO()
    wb.save(buf)
    edited = import_plan_xlsx(buf.getvalue())
    assert edited.milestone("hcm_qlvb_official").due == date(2025, 9, 2)  # type: ignore[union-attr]
    assert edited.system("sso") is not None


def test_bad_xlsx_rows_are_reported(plan: Plan) -> None:
    wb = load_workbook(io.BytesIO(export_plan_xlsx(plan)))
    ws = wb["milestones"]
    header = [c.value for c in ws[1]]
    ws.cell(row=2, column=header.index("due") + 1, value="31/02/2025")
    ws.cell(row=3, column=header.index("stage_required") + 1, value="finished")
    ws.cell(row=4, column=header.index("system") + 1, value="fax")
    ws.cell(row=5, column=header.index("name_vi") + 1).value = None
    buf = io.BytesIO()
    wb.save(buf)
    with pytest.raises(PlanError) as err:
        import_plan_xlsx(buf.getvalue())
    problems = err.value.problems
    assert any(p.startswith("milestones row 2: due '31/02/2025'") for p in problems)
    assert any(p.startswith("milestones row 3: stage_required 'finished'") for p in problems)
    assert any(p.startswith("milestones row 4: unknown system 'fax'") for p in problems)
    assert any(p.startswith("milestones row 5: name_vi is missing") for p in problems)
    assert len(problems) == 4


def test_xlsx_without_sheets_or_garbage_is_rejected() -> None:
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.title = "other"  # type: ignore[union-attr]
    buf = io.BytesIO()
    wb.save(buf)
    with pytest.raises(PlanError, match="sheet 'systems' is missing"):
        import_plan_xlsx(buf.getvalue())
    with pytest.raises(PlanError, match="not a readable XLSX"):
        import_plan_xlsx(b"not a zip")
