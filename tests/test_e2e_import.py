"""Operators import staff lists by sending files to the bot: dry run, report, confirm."""

from __future__ import annotations

import io

from openpyxl import Workbook
from sqlalchemy import func, select

from db.models import Person
from tests.live import OPERATOR_ID
from tests.test_e2e_registration import add_person, eventually, say

HEADER = "full_name,phone,unit_code,position,email,role\n"


async def _operator(emu) -> None:
    emu.add_user(OPERATOR_ID, "Operator")
    await say(emu, OPERATOR_ID, "/start")


async def until_keyboard(emu, chat: int, since: int, limit: int = 10) -> list[dict]:
    """Bot messages from ``since`` up to and including the first with inline buttons."""
    for n in range(1, limit + 1):
        msgs = await emu.wait_for_messages(chat, count=n, since=since)
        if (msgs[-1].get("reply_markup") or {}).get("inline_keyboard"):
            return msgs
    raise AssertionError("no message with buttons")


async def _send_file(emu, content: bytes, name: str, count: int = 1) -> list[dict]:
    [prompt] = await say(emu, OPERATOR_ID, "/import")
    assert "CSV" in prompt["text"]
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_document(OPERATOR_ID, content, name)
    [kind] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    assert "loại danh sách" in kind["text"]
    return await say(emu, OPERATOR_ID, "1", count=count)  # typed choice: staff list


async def test_long_report_is_split_and_bad_rows_skipped_on_request(live, seeded_maker):
    emu = live.emu
    await _operator(emu)
    rows = [f"Nguyễn Văn Số {i},09{i:08d},99999,Chuyên viên,,\n" for i in range(150)]
    rows.append("Lê Thị Hợp Lệ,0911222333,26743,Chuyên viên,le@example.gov.vn,official\n")
    await _send_file(emu, (HEADER + "".join(rows)).encode(), "can_bo.csv", count=1)
    msgs = await until_keyboard(emu, OPERATOR_ID, len(emu.sent(OPERATOR_ID)) - 1)
    report = [m["text"] for m in msgs[:-1]]
    assert len(report) >= 2, "a report over 4096 characters must be split"
    assert all(len(part) <= 4096 for part in report)
    joined = "\n".join(report)
    assert "Dòng 2" in joined and "Dòng 151" in joined and "99999" in joined
    confirm = msgs[-1]
    assert "Bỏ qua dòng lỗi" in str(confirm["reply_markup"])
    async with seeded_maker() as s:  # dry run changed nothing
        assert await s.scalar(select(func.count()).select_from(Person)) == 1  # the operator
    since = len(emu.sent(OPERATOR_ID))
    await emu.press_button(OPERATOR_ID, confirm,
                           confirm["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
    [done] = await emu.wait_for_messages(OPERATOR_ID, since=since)
    assert "Đã nhập" in done["text"] and "thêm mới 1" in done["text"]
    p = await eventually(seeded_maker, select(Person).where(Person.phone == "+84911222333"))
    assert p.unit_code == "26743" and p.verified_at is None


async def test_xlsx_import_and_idempotent_reimport(live, seeded_maker):
    emu = live.emu
    await _operator(emu)
    wb = Workbook()
    ws = wb.active
    ws.append(["Họ tên", "Số điện thoại", "Mã đơn vị", "Chức vụ"])
    ws.append(["<b>Lê & Sơn</b>", "0912.000.111", "26740", "Phó Chủ tịch"])
    ws.append(["Đặng Thu Hà", "+84 912 000 222", "26743", "Công chức"])
    buf = io.BytesIO()
    wb.save(buf)
    for expected in ("thêm mới 2", "không đổi 2"):
        msgs = await _send_file(emu, buf.getvalue(), "danh_sach.xlsx", count=2)
        assert "2 hợp lệ" in msgs[0]["text"]
        since = len(emu.sent(OPERATOR_ID))
        await emu.send_text(OPERATOR_ID, "1")
        [done] = await emu.wait_for_messages(OPERATOR_ID, since=since)
        assert expected in done["text"], done["text"]
    p = await eventually(seeded_maker, select(Person).where(Person.phone == "+84912000111"))
    assert p.full_name == "<b>Lê & Sơn</b>"


async def test_bad_files_get_clear_errors_and_change_nothing(live, seeded_maker):
    emu = live.emu
    await _operator(emu)
    # UTF-16 without BOM is neither UTF-8 nor Windows-1258
    [err] = await _send_file(emu, (HEADER + "A,0912,1,x,,\n").encode("utf-16-le"), "x.csv")
    assert "UTF-8" in err["text"] or "mã hóa" in err["text"].lower()
    [err] = await _send_file(emu, b"PK\x03\x04 not really a workbook", "broken.xlsx")
    assert "XLSX" in err["text"] or "Excel" in err["text"]
    msgs = await _send_file(emu, b"full_name,unit_code\nA B,26743\n", "missing.csv")
    assert "phone" in msgs[0]["text"]
    dup = HEADER + "Lê Văn A,0912345678,26743,,,\nLê Văn B,+84 912 345 678,26743,,,\n"
    msgs = await _send_file(emu, dup.encode(), "dup.csv", count=2)
    assert "Dòng 3" in msgs[0]["text"]
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Person)) == 1


async def test_non_operator_file_is_not_imported(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Vũ Cán Bộ", "+84900000301", "26740", telegram_id=5020,
                     verified=True)
    emu.add_user(5020, "Vũ")
    since = len(emu.sent(5020))
    await emu.send_document(5020, (HEADER + "A B,0912345678,26743,,,\n").encode(), "x.csv")
    [reply] = await emu.wait_for_messages(5020, since=since)
    assert "CSV" not in reply["text"]
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Person)) == 1
