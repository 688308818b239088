"""Reporting problems from the phone: the form, similar tickets, /mytickets, and the
knowledge answer that offers a ticket when it is not sure."""

from __future__ import annotations

from sqlalchemy import func, select

from db.models import Ticket, TicketAttachment, TicketMessage
from tests.test_e2e_registration import add_person, eventually, say
from tests.test_e2e_status import buttons, press

BEN_THANH = "26743"


async def _official(maker, emu, uid: int, phone: str) -> None:
    await add_person(maker, f"Cán Bộ {uid}", phone, BEN_THANH, telegram_id=uid, verified=True)
    emu.add_user(uid, f"U{uid}")


async def test_report_with_attachments_then_mytickets(live, seeded_maker):
    emu = live.emu
    await _official(seeded_maker, emu, 9001, "+84900000601")
    [systems] = await say(emu, 9001, "/ticket")
    assert "hệ thống nào" in systems["text"]
    [ask] = await press(emu, 9001, systems, "QLVB")
    assert "Mô tả" in ask["text"]
    [sev] = await say(emu, 9001, "Không đăng nhập được <b>QLVB</b> & báo sai mật khẩu")
    [files] = await say(emu, 9001, "3")  # typed choice: high
    assert "tối đa" in files["text"]
    since = len(emu.sent(9001))
    await emu.send_photo(9001, b"\x89PNG fake screenshot")
    await emu.send_document(9001, b"log line", "loi.txt", "text/plain")
    await emu.wait_for_messages(9001, count=2, since=since)
    since = len(emu.sent(9001))
    await emu.send_document(9001, b"", "huge.zip", file_size=25 * 1024 * 1024)
    [big] = await emu.wait_for_messages(9001, since=since)
    assert "20 MB" in big["text"]
    [confirm] = await say(emu, 9001, "xong")
    assert "Kiểm tra báo lỗi" in confirm["text"] and "Tệp đính kèm: 2" in confirm["text"]
    [created] = await press(emu, 9001, confirm, "Gửi báo lỗi mới")
    assert "HT-" in created["text"]
    ticket = await eventually(seeded_maker, select(Ticket))
    assert ticket.summary == "Không đăng nhập được <b>QLVB</b> & báo sai mật khẩu"
    assert ticket.severity == "high" and ticket.system_code == "qlvb"
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(TicketAttachment)) == 2
    [mine] = await say(emu, 9001, "/mytickets")
    assert ticket.code in str(buttons(mine))
    [detail] = await say(emu, 9001, "1")
    assert ticket.code in detail["text"]
    [ask_info] = await press(emu, 9001, detail, "Bổ sung")
    [ok] = await say(emu, 9001, "Đã thử trên máy khác, vẫn lỗi")
    assert "Đã cập nhật" in ok["text"]
    await eventually(seeded_maker, select(TicketMessage.id).where(
        TicketMessage.text == "Đã thử trên máy khác, vẫn lỗi"))


async def test_similar_open_ticket_offered_and_other_reporter_refused(live, seeded_maker):
    emu = live.emu
    await _official(seeded_maker, emu, 9002, "+84900000602")
    await _official(seeded_maker, emu, 9003, "+84900000603")
    for uid in (9002, 9003):
        [systems] = await say(emu, uid, "/ticket")
        await press(emu, uid, systems, "Thư điện tử")
        await say(emu, uid, "Không gửi được thư ra ngoài")
        await say(emu, uid, "2")
        [confirm] = await say(emu, uid, "xong")
        if uid == 9002:
            await press(emu, uid, confirm, "Gửi báo lỗi mới")
    assert "Đã có người báo" in confirm["text"]
    first = await eventually(seeded_maker, select(Ticket))
    [followed] = await press(emu, 9003, confirm, first.code)
    assert "Đã bổ sung" in followed["text"]
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Ticket)) == 1
    # 9003 cannot open 9002's ticket by forging the button
    [mine] = await say(emu, 9003, "/mytickets")
    await emu.press_button(9003, mine, f"mt:show:{first.code}:0", force=True)
    call = await emu.wait_for_call("answerCallbackQuery",
                                   predicate=lambda c: c["params"].get("show_alert"))
    assert "không phải phiếu của bạn" in call["params"]["text"]


async def test_unsure_answer_offers_a_ticket(live, seeded_maker):
    emu = live.emu
    await _official(seeded_maker, emu, 9004, "+84900000604")
    [unsure] = await say(emu, 9004, "máy in tầng 3 bị kẹt giấy phải làm sao")
    assert any("bộ phận hỗ trợ" in b["text"] for b in buttons(unsure))
    [systems] = await press(emu, 9004, unsure, "bộ phận hỗ trợ")
    [sev] = await press(emu, 9004, systems, "khác")
    assert "Mức độ" in sev["text"]  # the question became the description
    await say(emu, 9004, "1")
    [confirm] = await say(emu, 9004, "xong")
    assert "máy in tầng 3" in confirm["text"]
