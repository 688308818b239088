"""Migration status menus end to end through the emulator, for each role."""

from __future__ import annotations

from sqlalchemy import func, select

from db.models import AuditLog, StatusHistory, UnitSystemStatus
from tests.live import OPERATOR_ID
from tests.test_e2e_registration import add_person, eventually, say

BEN_THANH = "26743"
SAI_GON = "26740"


def buttons(msg: dict) -> list[dict]:
    return [b for row in (msg.get("reply_markup") or {}).get("inline_keyboard", []) for b in row]


async def press(emu, user: int, msg: dict, label_part: str, count: int = 1) -> list[dict]:
    target = next(b for b in buttons(msg) if label_part in b["text"])
    since = len(emu.sent(user))
    await emu.press_button(user, msg, target["callback_data"])
    return await emu.wait_for_messages(user, count=count, since=since)


async def test_official_sees_unit_system_and_searches(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Cán Bộ Xem", "+84900000501", BEN_THANH, telegram_id=8001,
                     verified=True)
    emu.add_user(8001, "Xem")
    [menu] = await say(emu, 8001, "/status")
    labels = " ".join(b["text"] for b in buttons(menu))
    assert "Đơn vị của tôi" in labels and "Tổng quan" not in labels
    [unit] = await say(emu, 8001, "1")  # typed choice: my unit
    assert "Phường Bến Thành" in unit["text"] and "QLVB" in unit["text"]
    assert "Chưa bắt đầu" in unit["text"] and "quá hạn" in unit["text"]
    assert not buttons(unit)  # an official cannot update
    [menu] = await say(emu, 8001, "/status")
    [systems] = await press(emu, 8001, menu, "Theo hệ thống")
    [qlvb] = await press(emu, 8001, systems, "QLVB")
    assert "Số đơn vị" in qlvb["text"] and "Thành phố Hồ Chí Minh" in qlvb["text"]
    [menu] = await say(emu, 8001, "/status")
    [ask] = await press(emu, 8001, menu, "Tra cứu")
    assert "Gõ tên đơn vị" in ask["text"]
    [found] = await say(emu, 8001, "phường Bến Nghé, quận 1")
    assert any("Sài Gòn" in b["text"] for b in buttons(found)), buttons(found)
    [other] = await say(emu, 8001, "1")
    assert "Phường Sài Gòn" in other["text"]


async def test_unit_admin_updates_own_unit_with_backwards_confirmation(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Quản Trị BT", "+84900000502", BEN_THANH, role="unit_admin",
                     telegram_id=8002, verified=True)
    emu.add_user(8002, "QT")
    [menu] = await say(emu, 8002, "/status")
    [unit] = await say(emu, 8002, "1")
    [systems] = await press(emu, 8002, unit, "Cập nhật")
    [stages] = await press(emu, 8002, systems, "QLVB")
    [ask_note] = await press(emu, 8002, stages, "Vận hành chính thức")
    assert "Ghi chú" in ask_note["text"]
    [done] = await say(emu, 8002, "Đã vận hành từ 1/9 <b>ok</b>")
    assert "Đã cập nhật" in done["text"] and "Vận hành chính thức" in done["text"]
    await eventually(seeded_maker, select(UnitSystemStatus).where(
        UnitSystemStatus.unit_code == BEN_THANH, UnitSystemStatus.stage == "live"))
    # moving backwards asks first
    [menu] = await say(emu, 8002, "/status")
    [unit] = await say(emu, 8002, "1")
    [systems] = await press(emu, 8002, unit, "Cập nhật")
    [stages] = await press(emu, 8002, systems, "QLVB")
    await press(emu, 8002, stages, "Thí điểm")
    [confirm] = await say(emu, 8002, "-")
    assert "Bạn có chắc chắn" in confirm["text"]
    [done] = await say(emu, 8002, "1")
    assert "Đã cập nhật" in done["text"]
    row = await eventually(seeded_maker, select(UnitSystemStatus).where(
        UnitSystemStatus.unit_code == BEN_THANH, UnitSystemStatus.stage == "pilot"))
    assert row.system_code == "qlvb"
    async with seeded_maker() as s:
        notes = list(await s.scalars(select(StatusHistory.note).order_by(StatusHistory.id)))
        assert notes == ["Đã vận hành từ 1/9 <b>ok</b>", None]
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "status.update")) == 2


async def test_other_units_refused(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Quản Trị SG", "+84900000503", SAI_GON, role="unit_admin",
                     telegram_id=8003, verified=True)
    await add_person(seeded_maker, "Cán Bộ", "+84900000504", SAI_GON, telegram_id=8004,
                     verified=True)
    emu.add_user(8003, "QTSG")
    emu.add_user(8004, "CB")
    [menu] = await say(emu, 8003, "/status")
    await emu.press_button(8003, menu, f"se:{BEN_THANH}:qlvb", force=True)  # forged
    await emu.press_button(8003, menu, f"ss:{BEN_THANH}:qlvb:live", force=True)
    [menu] = await say(emu, 8004, "/status")
    await emu.press_button(8004, menu, f"se:{SAI_GON}:qlvb", force=True)  # an official
    for n in range(1, 4):
        await emu.wait_for_call("answerCallbackQuery", predicate=lambda c, n=n: len([
            x for x in emu.calls if x["method"] == "answerCallbackQuery"
            and x["params"].get("show_alert")]) >= n)
    alerts = [c["params"]["text"] for c in emu.calls if c["method"] == "answerCallbackQuery"
              and c["params"].get("show_alert")]
    assert sum("đơn vị mình" in a for a in alerts) == 2
    assert sum("không có quyền" in a for a in alerts) == 1
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(UnitSystemStatus)) == 0


async def test_operator_overview_report_chart_and_inline(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Vận Hành", "+84900000505", BEN_THANH, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    emu.add_user(OPERATOR_ID, "Op")
    msgs = await say(emu, OPERATOR_ID, "/overview", count=2)
    assert "Tổng quan Thành phố Hồ Chí Minh" in msgs[0]["text"]
    assert "Đơn vị chậm tiến độ" in msgs[1]["text"] and "1." in msgs[1]["text"]
    [more] = await press(emu, OPERATOR_ID, msgs[1], "Xem thêm")
    assert "9." in more["text"]
    [doc] = await say(emu, OPERATOR_ID, "/export")
    assert doc["document"]["file_name"].endswith(".xlsx")
    [photo] = await say(emu, OPERATOR_ID, "/chart")
    assert photo.get("photo")
    await emu.send_inline_query(OPERATOR_ID, "bến thành")
    call = await emu.wait_for_call("answerInlineQuery")
    assert call["ok"], call
    results = call["params"]["results"]
    assert any("Bến Thành" in r["title"] for r in results)


def status_xlsx(rows: list[list[str]], sheet: str = "status") -> bytes:
    import io

    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = sheet
    ws.append(["unit_code", "system_code", "stage", "note"])
    for r in rows:
        ws.append(r)
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


async def _send_status_file(emu, content: bytes) -> list[dict]:
    await say(emu, OPERATOR_ID, "/import")
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_document(OPERATOR_ID, content, "trang_thai.xlsx")
    [kind] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    return await press(emu, OPERATOR_ID, kind, "Trạng thái", count=2)


async def test_bulk_status_xlsx_dry_run_then_apply(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Vận Hành", "+84900000505", BEN_THANH, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    emu.add_user(OPERATOR_ID, "Op")
    bad = status_xlsx([[BEN_THANH, "qlvb", "live", ""], ["99999", "qlvb", "live", ""],
                       [SAI_GON, "nope", "live", ""], [SAI_GON, "email", "xong roi", ""]])
    report, verdict = await _send_status_file(emu, bad)
    assert "Dòng 3" in report["text"] and "Dòng 4" in report["text"] \
        and "Dòng 5" in report["text"]
    assert "chưa áp dụng" in verdict["text"]
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(UnitSystemStatus)) == 0
    await say(emu, OPERATOR_ID, "/import")
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_document(OPERATOR_ID, status_xlsx([[BEN_THANH, "qlvb", "live", ""]],
                                                      sheet="Sheet1"), "x.xlsx")
    [kind] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    [wrong] = await press(emu, OPERATOR_ID, kind, "Trạng thái")
    assert "status" in wrong["text"] and "Sheet1" in wrong["text"]
    good = status_xlsx([[BEN_THANH, "qlvb", "Vận hành chính thức", "ok"],
                        [SAI_GON, "EMAIL", "trained", ""]])
    report, confirm = await _send_status_file(emu, good)
    assert "Phường Bến Thành" in report["text"] and "→" in report["text"]
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_text(OPERATOR_ID, "1")
    [done] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    assert "Đã cập nhật 2" in done["text"]
    await eventually(seeded_maker, select(UnitSystemStatus).where(
        UnitSystemStatus.unit_code == SAI_GON, UnitSystemStatus.stage == "trained"))


async def test_unit_command_shortcuts(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Cán Bộ Nhanh", "+84900000506", SAI_GON, telegram_id=8006,
                     verified=True)
    emu.add_user(8006, "Nhanh")
    [mine] = await say(emu, 8006, "/unit")
    assert "Phường Sài Gòn" in mine["text"] and "QLVB" in mine["text"]
    [found] = await say(emu, 8006, "/unit ben thanh")
    assert any("Bến Thành" in b["text"] for b in buttons(found))
    [view] = await say(emu, 8006, "1")
    assert "Phường Bến Thành" in view["text"]
    [helptext] = await say(emu, 8006, "/help")
    assert "/unit" in helptext["text"] and "/status" in helptext["text"]


async def test_search_typo_and_faq_import_live(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Vận Hành", "+84900000505", BEN_THANH, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    emu.add_user(OPERATOR_ID, "Op")
    [found] = await say(emu, OPERATOR_ID, "/unit ben thnah")
    assert "Phường Bến Thành" in buttons(found)[0]["text"]
    faq = ('[[faq]]\nid = "gio_hop_giao_ban"\nq_vi = ["Họp giao ban CNTT lúc mấy giờ?"]\n'
           'q_en = ["When is the IT briefing?"]\n'
           'a_vi = "Họp giao ban CNTT lúc 8 giờ sáng thứ Hai."\n'
           'a_en = "The IT briefing is at 8 am on Mondays."\nsource = "bot"\n')
    await say(emu, OPERATOR_ID, "/import")
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_document(OPERATOR_ID, faq.encode(), "them.toml")
    [kind] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    [done] = await press(emu, OPERATOR_ID, kind, "Hỏi đáp")
    assert "thêm 1" in done["text"]
    [ans] = await say(emu, OPERATOR_ID, "hop giao ban cntt may gio")
    assert "8 giờ sáng thứ Hai" in ans["text"]
    await say(emu, OPERATOR_ID, "/import")
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_document(OPERATOR_ID, b'[[faq]]\nid = "x"\n', "hong.toml")
    [kind] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    [err] = await press(emu, OPERATOR_ID, kind, "Hỏi đáp")
    assert "có lỗi" in err["text"]


async def test_suggestions_take_typed_numbers_and_words(live, seeded_maker):
    """Under "not sure" suggestions, "1" opens the first entry (it was read as a new
    question), and the ticket offer, a button without data fields, takes its number and
    its words too."""
    from services.texts import t
    from tests.test_e2e_registration import add_person, say

    emu = live.emu
    await add_person(seeded_maker, "Cán Bộ Hỏi", "+84900000701", BEN_THANH,
                     telegram_id=8201, verified=True)
    emu.add_user(8201, "Hỏi")
    [sugg] = await say(emu, 8201, "qlvb")
    assert sugg["text"] == t("kb.not_sure", "vi")
    labels = [b["text"] for b in buttons(sugg)]
    [entry] = await say(emu, 8201, "1")
    assert "Nguồn" in entry["text"] and not buttons(entry)  # an entry, with its sources
    for typed in (str(len(labels)), "ho tro"):
        await say(emu, 8201, "qlvb")
        [form] = await say(emu, 8201, typed)
        assert form["text"] == t("tk.ask_system", "vi"), typed
        await say(emu, 8201, "/cancel")
