"""Broadcasts and /reminders in chat, end to end: the real bot (with its in-process sender
and scheduler) polling the emulator over HTTP."""

from __future__ import annotations

from sqlalchemy import func, select, text

from db.models import AuditLog, Broadcast, Delivery, Subscription
from tests.ledger_helpers import add_recipients, until
from tests.live import OPERATOR_ID
from tests.test_e2e_registration import BEN_THANH, SAI_GON, add_person, eventually, say
from tests.test_e2e_status import buttons, press


async def operator(maker, emu) -> None:
    await add_person(maker, "Vận Hành", "+84900008000", BEN_THANH, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    emu.add_user(OPERATOR_ID, "Op")


async def officials(maker, emu, n: int, unit: str, first: int) -> list[int]:
    out = []
    for i in range(n):
        uid = first + i
        await add_person(maker, f"Cán Bộ {uid}", f"+8490000{uid}", unit, telegram_id=uid,
                         verified=True)
        emu.add_user(uid, f"CB{uid}")
        out.append(uid)
    return out


async def test_compose_preview_confirm_send_typed_only(live, seeded_maker):
    emu = live.emu
    await operator(seeded_maker, emu)
    chats = await officials(seeded_maker, emu, 3, BEN_THANH, 8101)
    [ask] = await say(emu, OPERATOR_ID, "/broadcast")
    assert "Soạn thông báo" in ask["text"]
    [bad] = await say(emu, OPERATOR_ID, "Chào {{ ten }}")
    assert "Mẫu không hợp lệ" in bad["text"]
    [preview] = await say(emu, OPERATOR_ID, "Chào {{ name }} <đơn vị {{ unit }}> & bạn")
    assert "Xem trước" in preview["text"]
    assert "Chào Vận Hành <đơn vị Phường Bến Thành> & bạn" in preview["text"]
    [confirm] = await say(emu, OPERATOR_ID, "tất cả")  # typed word instead of a button
    assert "Số người nhận: 4" in confirm["text"]
    [started] = await say(emu, OPERATOR_ID, "1")  # typed number: send now
    assert "Bắt đầu gửi thông báo" in started["text"]
    for c in chats:
        [got] = await emu.wait_for_messages(c, timeout=20)
        assert got["text"] == f"Chào Cán Bộ {c} <đơn vị Phường Bến Thành> & bạn"

    async def progress_final() -> bool:
        rec = next(r for r in emu.sent(OPERATOR_ID) if r["message_id"] == started["message_id"])
        return "đã gửi xong" in (rec["text"] or "") and "Đã gửi: 4/4" in rec["text"]
    await until(progress_final, 30, "the progress message to show the end")
    async with seeded_maker() as s:
        b = await s.scalar(select(Broadcast))
        assert b.state == "done" and b.sent == 4 and b.total == 4
        actions = set(await s.scalars(select(AuditLog.action).where(
            AuditLog.object_type == "broadcast")))
        assert actions == {"broadcast.create", "broadcast.start"}


async def test_audience_by_province_and_pause_resume_cancel(live, seeded_maker):
    emu = live.emu
    await operator(seeded_maker, emu)
    hcm = await officials(seeded_maker, emu, 4, SAI_GON, 8201)
    async with seeded_maker() as s:  # a ward of Hà Nội (province 01)
        hanoi_ward = await s.scalar(text(
            "SELECT code FROM units WHERE province_code = '01' AND kind = 'ward' "
            "ORDER BY code LIMIT 1"))
    other = await officials(seeded_maker, emu, 1, hanoi_ward, 8301)
    emu.set_latency(1.0, method="sendMessage")  # slow enough to press pause mid-way
    await say(emu, OPERATOR_ID, "/broadcast")
    [preview] = await say(emu, OPERATOR_ID, "Họp giao ban lúc 8 giờ.")
    [ask_prov] = await press(emu, OPERATOR_ID, preview, "Theo tỉnh")
    assert "tỉnh/thành" in ask_prov["text"]
    [nope] = await say(emu, OPERATOR_ID, "không có tỉnh này")
    assert "Không tìm thấy" in nope["text"]
    [confirm] = await say(emu, OPERATOR_ID, "Hồ Chí Minh")
    assert "Thành phố Hồ Chí Minh" in confirm["text"] and "Số người nhận: 5" in confirm["text"]
    [started] = await press(emu, OPERATOR_ID, confirm, "Gửi ngay")
    assert [b["text"] for b in buttons(started)] == ["⏸ Tạm dừng", "⏹ Hủy gửi"]
    await emu.press_button(OPERATOR_ID, started, buttons(started)[0]["callback_data"])
    b = await eventually(seeded_maker, select(Broadcast).where(Broadcast.state == "paused"))
    emu.set_latency(0, method="sendMessage")
    async with seeded_maker() as s:
        sent_before = await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.state == "sent"))
    assert sent_before < 5
    # typed word for "resume", then cancel with the button on the (edited) message
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_text(OPERATOR_ID, "tiếp tục")
    await emu.wait_for_messages(OPERATOR_ID, since=since)
    await eventually(seeded_maker, select(Broadcast).where(Broadcast.state.in_(["sending",
                                                                                "done"])))
    await until(lambda: _all_sent(seeded_maker, 5), 30, "the resumed broadcast to finish")
    assert emu.sent(other[0]) == [] and all(len(emu.sent(c)) == 1 for c in hcm)
    async with seeded_maker() as s:
        actions = list(await s.scalars(select(AuditLog.action).where(
            AuditLog.object_type == "broadcast", AuditLog.object_id == str(b.id))
            .order_by(AuditLog.id)))
    assert actions == ["broadcast.create", "broadcast.start", "broadcast.pause",
                       "broadcast.resume"]


async def _all_sent(maker, n: int) -> bool:
    async with maker() as s:
        return await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.state == "sent")) == n


async def test_cancel_stops_sending_and_schedule_creates_a_job(live, seeded_maker):
    emu = live.emu
    await operator(seeded_maker, emu)
    for c in await add_recipients(seeded_maker, 40, first=8401, unit_code=BEN_THANH):
        emu.add_user(c, f"U{c}")  # more than the sender's concurrency (16)
    emu.set_latency(2.0, method="sendMessage")
    await say(emu, OPERATOR_ID, "/broadcast")
    await say(emu, OPERATOR_ID, "Thông báo sẽ bị hủy")
    [confirm] = await say(emu, OPERATOR_ID, "1")
    [started] = await say(emu, OPERATOR_ID, "gửi ngay")
    await emu.press_button(OPERATOR_ID, started, buttons(started)[-1]["callback_data"])
    b = await eventually(seeded_maker, select(Broadcast).where(Broadcast.state == "cancelled"))
    emu.set_latency(0, method="sendMessage")
    async with seeded_maker() as s:
        pending = await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.broadcast_id == b.id, Delivery.state == "pending"))
    assert pending >= 1  # left unsent; never claimed again
    # schedule: typed time in the future → a scheduled broadcast and a persistent date job
    await say(emu, OPERATOR_ID, "/broadcast")
    await say(emu, OPERATOR_ID, "Hẹn giờ")
    await say(emu, OPERATOR_ID, "1")
    [when] = await say(emu, OPERATOR_ID, "hẹn giờ")
    assert "dd/mm/yyyy" in when["text"]
    [bad] = await say(emu, OPERATOR_ID, "mai nhé")
    assert "Không đọc được" in bad["text"]
    [past] = await say(emu, OPERATOR_ID, "01/01/2020 08:00")
    assert "đã qua" in past["text"]
    [ok] = await say(emu, OPERATOR_ID, "01/01/2099 08:00")
    assert "Đã hẹn gửi" in ok["text"] and "08:00 01/01/2099" in ok["text"]
    sched = await eventually(seeded_maker, select(Broadcast).where(
        Broadcast.state == "scheduled"))

    async def job_stored() -> bool:
        async with seeded_maker() as s:
            return bool(await s.scalar(
                text("SELECT count(*) FROM apscheduler_jobs WHERE id = :id"),
                {"id": f"broadcast:{sched.id}"}))
    await until(job_stored, 10, "the date job in the job store")
    assert confirm


async def test_non_operator_cannot_broadcast(live, seeded_maker):
    emu = live.emu
    [uid] = await officials(seeded_maker, emu, 1, BEN_THANH, 8501)
    [refused] = await say(emu, uid, "/broadcast")
    assert "không có quyền" in refused["text"]


async def test_reminders_view_and_toggle(live, seeded_maker):
    emu = live.emu
    [uid] = await officials(seeded_maker, emu, 1, BEN_THANH, 8601)
    [view] = await say(emu, uid, "/reminders")
    assert "Nhắc hạn của bạn" in view["text"] and "Phường Bến Thành" in view["text"]
    labels = [b["text"] for b in buttons(view)]
    assert any("QLVB: đang bật" in x for x in labels)
    [after] = await press(emu, uid, view, "QLVB")
    assert "QLVB: nhắc hạn đã tắt" in after["text"]
    assert any("QLVB: đang tắt" in b["text"] for b in buttons(after))
    row = await eventually(seeded_maker, select(Subscription))
    assert row.system_code == "qlvb" and row.enabled is False
    [again] = await say(emu, uid, "qlvb")  # typed abbreviation toggles back on
    assert "QLVB: nhắc hạn đã bật" in again["text"]

    async def audited_twice() -> bool:
        async with seeded_maker() as s:
            return await s.scalar(select(func.count()).select_from(AuditLog).where(
                AuditLog.action == "reminders.subscription")) == 2
    await until(audited_twice, 10, "both toggles to be audited")


async def test_audience_menus_kind_role_stage_subscribers(live, seeded_maker):
    emu = live.emu
    await operator(seeded_maker, emu)
    await officials(seeded_maker, emu, 2, BEN_THANH, 8701)
    await add_person(seeded_maker, "Quản Trị", "+84900008799", SAI_GON, role="unit_admin",
                     telegram_id=8799, verified=True)
    emu.add_user(8799, "QT")

    async def audience(*steps: str) -> str:
        await say(emu, OPERATOR_ID, "/broadcast")
        [msg] = await say(emu, OPERATOR_ID, "Kiểm tra người nhận")
        for step in steps:
            [msg] = await press(emu, OPERATOR_ID, msg, step)
        [cancelled] = await press(emu, OPERATOR_ID, msg, "Hủy")
        assert "Đã hủy soạn" in cancelled["text"]
        return msg["text"]

    text = await audience("Theo loại đơn vị", "phường")
    assert "Số người nhận: 4" in text and "đơn vị loại phường" in text
    text = await audience("Theo vai trò", "quản trị CNTT")
    assert "Số người nhận: 1" in text
    text = await audience("Theo tiến độ", "QLVB", "chưa triển khai")
    assert "Số người nhận: 4" in text and "QLVB" in text
    text = await audience("Người theo dõi", "QLVB")
    assert "Số người nhận: 4" in text
    # nobody matches: asked again, nothing created
    await say(emu, OPERATOR_ID, "/broadcast")
    [msg] = await say(emu, OPERATOR_ID, "Không ai nhận")
    [kinds] = await press(emu, OPERATOR_ID, msg, "Theo loại đơn vị")
    [again] = await press(emu, OPERATOR_ID, kinds, "đặc khu")
    assert "Không có ai" in again["text"] and buttons(again)
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Broadcast)) == 0
