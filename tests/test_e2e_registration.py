"""Registration and verification end to end: the real bot polling the emulator over HTTP,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import html

from sqlalchemy import func, select

from db.models import AuditLog, ChatIdentity, Person, RegistrationRequest, utcnow
from services.folding import fold
from tests.live import OPERATOR_ID

BEN_THANH = "26743"
SAI_GON = "26740"


async def add_person(maker, name, phone, unit, role="official", telegram_id=None,
                     verified=False) -> int:
    async with maker() as s:
        p = Person(full_name=name, name_folded=fold(name), phone=phone, unit_code=unit,
                   role=role, verified_at=utcnow() if verified else None)
        s.add(p)
        await s.flush()
        if telegram_id is not None:
            s.add(ChatIdentity(channel="telegram", external_id=str(telegram_id), person_id=p.id))
        await s.commit()
        return p.id


async def eventually(maker, query, timeout: float = 10.0):
    """The first row of ``query`` once the bot's transaction has committed it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        async with maker() as s:
            row = await s.scalar(query)
        if row is not None or loop.time() > end:
            assert row is not None, f"no row for {query}"
            return row
        await asyncio.sleep(0.05)


async def say(emu, user_id, text, count=1, timeout=10.0):
    """Send a text and return the bot's next ``count`` messages to that chat."""
    since = len(emu.sent(user_id))
    await emu.send_text(user_id, text)
    return await emu.wait_for_messages(user_id, count=count, since=since, timeout=timeout)


async def test_registration_happy_path(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Trần Thị Bình", "+84900000101", BEN_THANH)
    emu.add_user(5001, "Bình", language_code="vi")
    [greet] = await say(emu, 5001, "/start")
    assert "Chia sẻ số điện thoại" in greet["text"]
    kb = greet["reply_markup"]["keyboard"]
    assert kb[0][0]["request_contact"] is True
    since = len(emu.sent(5001))
    await emu.send_contact(5001, "0900 000.101")
    [ok] = await emu.wait_for_messages(5001, since=since)
    assert "Xác minh thành công" in ok["text"] and "Trần Thị Bình" in ok["text"]
    assert "Phường Bến Thành" in ok["text"]
    call = await emu.wait_for_call(
        "setMyCommands", predicate=lambda c: '"chat_id": 5001' in str(c["params"].get("scope"))
        or (isinstance(c["params"].get("scope"), dict)
            and c["params"]["scope"].get("chat_id") == 5001))
    assert call["ok"]
    [helptext] = await say(emu, 5001, "/help")
    assert "/me" in helptext["text"] and "/pending" not in helptext["text"]
    async with seeded_maker() as s:
        person = await s.scalar(select(Person).where(Person.phone == "+84900000101"))
        assert person.verified_at is not None
        ident = await s.scalar(select(ChatIdentity).where(ChatIdentity.external_id == "5001"))
        assert ident.person_id == person.id and ident.channel == "telegram"
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "registration.verified")) == 1


async def test_forged_contact_refused_and_audited(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Lê Văn Cường", "+84900000102", BEN_THANH)
    emu.add_user(5002, "Mallory")
    emu.add_user(5003, "Cường")
    await say(emu, 5002, "/start")
    since = len(emu.sent(5002))
    await emu.send_contact(5002, "+84900000102", contact_user_id=5003)
    [refused] = await emu.wait_for_messages(5002, since=since)
    assert "chính bạn" in refused["text"]
    # the reply is sent inside the handler, before its transaction commits the audit row
    await eventually(seeded_maker, select(AuditLog).where(
        AuditLog.action == "registration.forged_contact"))
    async with seeded_maker() as s:
        person = await s.scalar(select(Person).where(Person.phone == "+84900000102"))
        assert person.verified_at is None
        assert await s.scalar(select(func.count()).select_from(ChatIdentity).where(
            ChatIdentity.person_id == person.id)) == 0
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "registration.forged_contact")) == 1


async def _request_via_chat(emu, user_id, phone, name, unit_query):
    """Unknown phone → name → unit search → pick → confirm; returns the last message."""
    await say(emu, user_id, "/start")
    since = len(emu.sent(user_id))
    await emu.send_contact(user_id, phone)
    msgs = await emu.wait_for_messages(user_id, count=2, since=since)
    assert "chưa có trong danh sách" in msgs[0]["text"]
    assert "họ và tên" in msgs[1]["text"]
    [ask_unit] = await say(emu, user_id, name)
    assert "đơn vị" in ask_unit["text"]
    [pick] = await say(emu, user_id, unit_query)
    buttons = [b for row in pick["reply_markup"]["inline_keyboard"] for b in row]
    assert any("Bến Thành" in b["text"] for b in buttons), buttons
    target = next(b for b in buttons if "Bến Thành" in b["text"])
    since = len(emu.sent(user_id))
    await emu.press_button(user_id, pick, target["callback_data"])
    [confirm] = await emu.wait_for_messages(user_id, since=since)
    assert name in confirm["text"] and "Phường Bến Thành" in confirm["text"]
    # typed option instead of pressing: "1" = send the request
    [sent] = await say(emu, user_id, "1")
    assert "Đã gửi yêu cầu xác minh" in sent["text"]
    return sent


async def test_unknown_phone_approved_by_unit_admin(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Phạm Quản Trị", "+84900000201", BEN_THANH,
                     role="unit_admin", telegram_id=6001, verified=True)
    emu.add_user(6001, "Admin")
    emu.add_user(5004, "Dũng")
    since_admin = len(emu.sent(6001))
    await _request_via_chat(emu, 5004, "+84 988 777 666", "Hoàng Văn Dũng", "ben thanh")
    [card] = await emu.wait_for_messages(6001, since=since_admin)
    assert "Hoàng Văn Dũng" in card["text"] and "đã xác nhận qua Telegram" in card["text"]
    approve = card["reply_markup"]["inline_keyboard"][0][0]
    since = len(emu.sent(5004))
    await emu.press_button(6001, card, approve["callback_data"])
    [told] = await emu.wait_for_messages(5004, since=since)
    assert "đã được duyệt" in told["text"]
    edited = next(m for m in emu.sent(6001) if m["message_id"] == card["message_id"])
    assert "Đã duyệt" in edited["text"]
    # a second press (stale/double) changes nothing
    await emu.press_button(6001, card, approve["callback_data"], force=True)
    async with seeded_maker() as s:
        person = await s.scalar(select(Person).where(Person.phone == "+84988777666"))
        assert person is not None and person.verified_at is not None
        assert person.unit_code == BEN_THANH and person.role == "official"
        req = await s.scalar(select(RegistrationRequest))
        assert req.status == "approved"
    [me] = await say(emu, 5004, "/me")
    assert "Hoàng Văn Dũng" in me["text"]


async def test_unknown_phone_rejected_by_typed_answer(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Phạm Quản Trị", "+84900000201", BEN_THANH,
                     role="unit_admin", telegram_id=6001, verified=True)
    emu.add_user(6001, "Admin")
    emu.add_user(5005, "Em")
    since_admin = len(emu.sent(6001))
    await _request_via_chat(emu, 5005, "0977111222", "Ngô Thị Em", "Bến Thành")
    await emu.wait_for_messages(6001, since=since_admin)
    since = len(emu.sent(5005))
    [done] = await say(emu, 6001, "từ chối")
    assert "Đã từ chối" in done["text"]
    [told] = await emu.wait_for_messages(5005, since=since)
    assert "chưa được chấp thuận" in told["text"]
    async with seeded_maker() as s:
        assert await s.scalar(select(Person).where(Person.phone == "+84977111222")) is None
        req = await s.scalar(select(RegistrationRequest))
        assert req.status == "rejected"
    [still] = await say(emu, 5005, "/me")
    assert "chưa được xác minh" in still["text"]


async def test_role_refused(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "Vũ Cán Bộ", "+84900000301", SAI_GON, telegram_id=5006,
                     verified=True)
    emu.add_user(5006, "Vũ")
    [r1] = await say(emu, 5006, "/pending")
    assert "không có quyền" in r1["text"]
    [r2] = await say(emu, 5006, "/import")
    assert "không có quyền" in r2["text"]
    emu.add_user(5007, "Stranger")
    [r3] = await say(emu, 5007, "/me")
    assert "chưa được xác minh" in r3["text"]


async def test_operator_from_admin_ids_and_html_name(live, seeded_maker):
    emu = live.emu
    await add_person(seeded_maker, "<b>Lê & Sơn</b>", "+84900000401", BEN_THANH)
    emu.add_user(5008, "Sơn")
    await say(emu, 5008, "/start")
    since = len(emu.sent(5008))
    await emu.send_contact(5008, "+84900000401")
    [ok] = await emu.wait_for_messages(5008, since=since)
    assert "<b>Lê & Sơn</b>" in ok["text"]  # shown literally to the person, not bold
    call = next(c for c in reversed(emu.calls) if c["method"] == "sendMessage"
                and str(c["params"].get("chat_id")) == "5008")
    assert html.escape("<b>Lê & Sơn</b>", quote=False) in call["params"]["text"]
    emu.add_user(OPERATOR_ID, "Operator")
    [welcome] = await say(emu, OPERATOR_ID, "/start")
    assert "vận hành" in welcome["text"]
    [helptext] = await say(emu, OPERATOR_ID, "/help")
    assert "/import" in helptext["text"] and "/pending" in helptext["text"]


async def test_language_switch_by_button_and_text(live, seeded_maker):
    emu = live.emu
    emu.add_user(5009, "Lan")
    await say(emu, 5009, "/start")
    [en] = await say(emu, 5009, "English")
    assert "English" in en["text"]
    [helptext] = await say(emu, 5009, "/help")
    assert "What you can do" in helptext["text"]
    [menu] = await say(emu, 5009, "/lang")
    vi_button = menu["reply_markup"]["inline_keyboard"][0][0]
    since = len(emu.sent(5009))
    await emu.press_button(5009, menu, vi_button["callback_data"])
    [vi] = await emu.wait_for_messages(5009, since=since)
    assert "tiếng Việt" in vi["text"]


async def test_duplicate_update_handled_once(live, seeded_maker):
    emu = live.emu
    emu.add_user(5010, "Dup")
    upd = await emu.send_text(5010, "/help")
    await emu.wait_for_messages(5010, count=1)
    emu.inject_update(upd)  # Telegram re-delivers the same update_id
    [again] = await say(emu, 5010, "/lang")
    assert "ngôn ngữ" in again["text"]
    assert len([m for m in emu.sent(5010) if "Các chức năng" in (m.get("text") or "")]) == 1


async def test_free_text_question_answered_with_source(live, seeded_maker):
    emu = live.emu
    emu.add_user(5011, "Hỏi")
    [ans] = await say(emu, 5011, "khi nao he thong quan ly van ban chay chinh thuc?")
    assert "1/9" in ans["text"] or "1-9" in ans["text"] or "01/09" in ans["text"] \
        or "1 tháng 9" in ans["text"], ans["text"]
    assert "Nguồn" in ans["text"]
    [unsure] = await say(emu, 5011, "giá bitcoin hôm nay bao nhiêu")
    assert "chưa" in unsure["text"]


async def test_unit_by_old_name_resolves_to_new_unit(live, seeded_maker):
    emu = live.emu
    emu.add_user(5012, "Cũ")
    await say(emu, 5012, "/start")
    since = len(emu.sent(5012))
    await emu.send_contact(5012, "0966555444")
    await emu.wait_for_messages(5012, count=2, since=since)
    await say(emu, 5012, "Trịnh Văn Cũ")
    [pick] = await say(emu, 5012, "phuong ben nghe")
    labels = [b["text"] for row in pick["reply_markup"]["inline_keyboard"] for b in row]
    assert any("Bến Nghé" in x and "Sài Gòn" in x for x in labels), labels
    [confirm] = await say(emu, 5012, "1")
    assert "Phường Sài Gòn" in confirm["text"]
    [pick2] = await say(emu, 5012, "2")  # "edit" → starts over at the name
    assert "họ và tên" in pick2["text"]
