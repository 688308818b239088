"""The support desk end to end: a reporter, two agents, an operator and the support group
(forum topics, or a plain group), all through the emulator over HTTP."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select, update

from db.models import AuditLog, Incident, Person, Ticket, TicketMessage, utcnow
from tests.test_e2e_registration import add_person, eventually, say
from tests.test_e2e_status import buttons, press

BEN_THANH = "26743"
REPORTER, AGENT_A, AGENT_B, OPERATOR, BYSTANDER = 9101, 9102, 9103, 9104, 9105
FORUM, PLAIN = -1009100, -9100


async def staff(maker, emu, group: int, forum: bool) -> int:
    """Reporter, two agents, an operator, a bystander and the support group; returns how
    many bot messages the group has so far."""
    await add_person(maker, "Trần Thị Báo", "+84900000701", BEN_THANH, telegram_id=REPORTER,
                     verified=True)
    await add_person(maker, "Hỗ Trợ A", "+84900000702", BEN_THANH, role="support",
                     telegram_id=AGENT_A, verified=True)
    await add_person(maker, "Hỗ Trợ B", "+84900000703", BEN_THANH, role="support",
                     telegram_id=AGENT_B, verified=True)
    await add_person(maker, "Điều Hành", "+84900000704", BEN_THANH, role="dtc_admin",
                     telegram_id=OPERATOR, verified=True)
    await add_person(maker, "Người Ngoài", "+84900000705", BEN_THANH, telegram_id=BYSTANDER,
                     verified=True)
    for uid, name in ((REPORTER, "Báo"), (AGENT_A, "A"), (AGENT_B, "B"), (OPERATOR, "ĐH"),
                      (BYSTANDER, "Ngoài")):
        emu.add_user(uid, name)
    emu.create_group(group, "Hỗ trợ CNTT", is_forum=forum,
                     members=[AGENT_A, AGENT_B, OPERATOR, BYSTANDER])
    since = len(emu.sent(group))
    await emu.send_text(OPERATOR, "/supportgroup", chat_id=group)
    [ok] = await emu.wait_for_messages(group, since=since)
    assert "nhóm hỗ trợ" in ok["text"]
    return since + 1


async def report(emu, uid: int, system_label: str, text: str, severity: str = "3") -> dict:
    [systems] = await say(emu, uid, "/ticket")
    await press(emu, uid, systems, system_label)
    await say(emu, uid, text)
    await say(emu, uid, severity)
    [confirm] = await say(emu, uid, "xong")
    [created] = await press(emu, uid, confirm, "Gửi báo lỗi mới")
    assert "HT-" in created["text"]
    return created


async def alert_text(emu, since_calls: int) -> str:
    call = await emu.wait_for_call(
        "answerCallbackQuery", predicate=lambda c: c["params"].get("show_alert"),
        since=since_calls)
    return call["params"]["text"]


def card_of(emu, group: int) -> dict:
    return next(m for m in emu.sent(group) if "🎫" in (m["text"] or ""))


async def test_forum_life_cycle(live, seeded_maker):
    emu = live.emu
    start = await staff(seeded_maker, emu, FORUM, forum=True)
    # the reporter reports with a screenshot
    [systems] = await say(emu, REPORTER, "/ticket")
    await press(emu, REPORTER, systems, "QLVB")
    await say(emu, REPORTER, "Không mở được văn bản đến <i>từ Sở</i>")
    await say(emu, REPORTER, "3")
    since = len(emu.sent(REPORTER))
    await emu.send_photo(REPORTER, b"\x89PNG screenshot")
    await emu.wait_for_messages(REPORTER, since=since)
    [confirm] = await say(emu, REPORTER, "xong")
    await press(emu, REPORTER, confirm, "Gửi báo lỗi mới")

    # its own topic opens with the card, the buttons and the screenshot
    [card, photo] = await emu.wait_for_messages(FORUM, count=2, since=start)
    [topic] = emu.forum_topics(FORUM)
    thread = topic["message_thread_id"]
    assert topic["name"].startswith("HT-")
    assert card["message_thread_id"] == thread and "Trần Thị Báo" in card["text"]
    assert "<i>từ Sở</i>" in card["text"]  # shown literally, not as HTML
    assert photo["media_type"] == "photo" and photo["message_thread_id"] == thread
    labels = [b["text"] for b in buttons(card)]
    assert any("Nhận xử lý" in x for x in labels) and any("Chuyển cấp trên" in x for x in labels)
    ticket = await eventually(seeded_maker, select(Ticket))

    # a bystander in the group presses Claim: refused, nothing changes
    claim = next(b["callback_data"] for b in buttons(card) if "Nhận" in b["text"])
    n = len(emu.calls)
    await emu.press_button(BYSTANDER, card, claim)
    assert "Chỉ cán bộ hỗ trợ" in await alert_text(emu, n)

    # two agents claim at the same moment: exactly one owner
    n = len(emu.calls)
    await asyncio.gather(emu.press_button(AGENT_A, card, claim),
                         emu.press_button(AGENT_B, card, claim))
    first = await emu.wait_for_call("answerCallbackQuery", since=n)
    await emu.wait_for_call("answerCallbackQuery", since=emu.calls.index(first) + 1)
    claimed = await eventually(seeded_maker, select(Ticket).where(
        Ticket.assignee_id.is_not(None)))
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "ticket.claim")) == 1
    owner = AGENT_A if "A" in (await _name(seeded_maker, claimed.assignee_id)) else AGENT_B
    assert claimed.status == "in_progress"

    # the owner writes in the topic: the reporter gets it; an internal note stays internal
    since = len(emu.sent(REPORTER))
    await emu.send_text(owner, "#note kiểm tra log máy chủ trước", chat_id=FORUM,
                        message_thread_id=thread)
    said = await emu.send_text(owner, "Anh/chị thử xóa bộ nhớ đệm trình duyệt giúp em",
                               chat_id=FORUM, message_thread_id=thread)
    header, copy = await emu.wait_for_messages(REPORTER, count=2, since=since)
    assert ticket.code in header["text"] and "Hỗ Trợ" in header["text"]
    assert copy["text"] == "Anh/chị thử xóa bộ nhớ đệm trình duyệt giúp em"
    assert all("kiểm tra log" not in (m["text"] or "") for m in emu.sent(REPORTER))
    await emu.send_photo(owner, b"\x89PNG guide", caption="Hướng dẫn", chat_id=FORUM,
                         message_thread_id=thread)
    _, pic = await emu.wait_for_messages(REPORTER, count=2, since=since + 2)
    assert pic["media_type"] == "photo" and pic["caption"] == "Hướng dẫn"

    # the agent corrects the message: the reporter's copy is corrected, not a new message
    count = len(emu.sent(REPORTER))
    await emu.edit_user_message(owner, said["message"]["message_id"],
                                "Anh/chị thử xóa bộ nhớ đệm và đăng nhập lại", chat_id=FORUM)
    for _ in range(100):
        rec = next(m for m in emu.sent(REPORTER) if m["message_id"] == copy["message_id"])
        if rec["text"].endswith("đăng nhập lại"):
            break
        await asyncio.sleep(0.05)
    assert rec["text"] == "Anh/chị thử xóa bộ nhớ đệm và đăng nhập lại"
    assert len(emu.sent(REPORTER)) == count

    # the reporter replies to the copy: it appears in the topic
    since_g = len(emu.sent(FORUM))
    answer = await emu.send_text(REPORTER, "Đã xóa, vẫn lỗi ạ",
                                 reply_to_message_id=copy["message_id"])
    [who, relayed] = await emu.wait_for_messages(FORUM, count=2, since=since_g)
    assert "Trần Thị Báo" in who["text"] and relayed["text"] == "Đã xóa, vẫn lỗi ạ"
    assert relayed["message_thread_id"] == thread
    # ... and the reporter's correction edits the topic's copy
    await emu.edit_user_message(REPORTER, answer["message"]["message_id"],
                                "Đã xóa cache, vẫn lỗi ạ")
    for _ in range(100):
        rec = next(m for m in emu.sent(FORUM) if m["message_id"] == relayed["message_id"])
        if rec["text"] == "Đã xóa cache, vẫn lỗi ạ":
            break
        await asyncio.sleep(0.05)
    assert rec["text"] == "Đã xóa cache, vẫn lỗi ạ"

    # need info: the reporter is asked; a loose message asks which ticket it belongs to
    card = card_of(emu, FORUM)
    since = len(emu.sent(REPORTER))
    await emu.press_button(owner, card, _data(card, "Cần thêm"))
    [ask] = await emu.wait_for_messages(REPORTER, since=since)
    assert "cần thêm thông tin" in ask["text"]
    await eventually(seeded_maker, select(Ticket).where(Ticket.status == "waiting_reporter"))
    [which] = await say(emu, REPORTER, "Số văn bản là 123/UBND")
    assert "thuộc phiếu nào" in which["text"]
    since_g = len(emu.sent(FORUM))
    [ok] = await press(emu, REPORTER, which, ticket.code)
    assert "Đã chuyển" in ok["text"]
    [_, relayed] = await emu.wait_for_messages(FORUM, count=2, since=since_g)
    assert relayed["text"] == "Số văn bản là 123/UBND"
    await eventually(seeded_maker, select(Ticket).where(Ticket.status == "in_progress"))

    # forged: a Resolve button carrying another ticket's id on this card changes nothing
    n = len(emu.calls)
    card = card_of(emu, FORUM)
    await emu.press_button(owner, card, f"ta:resolve:{ticket.id + 1000}:0", force=True)
    assert "không thuộc phiếu nào" in await alert_text(emu, n)

    # resolve: the reporter is told, rates 5 stars
    card = card_of(emu, FORUM)
    since = len(emu.sent(REPORTER))
    await emu.press_button(owner, card, _data(card, "Đã xử lý xong"))
    [done] = await emu.wait_for_messages(REPORTER, since=since)
    assert "đã được xử lý xong" in done["text"]
    # stale: the Claim button of the old card state is refused now
    n = len(emu.calls)
    await emu.press_button(AGENT_B, card, claim, force=True)
    assert "không cho phép" in await alert_text(emu, n) or "đã được thực hiện" in \
        await alert_text(emu, n)
    [mine] = await say(emu, REPORTER, "/mytickets")
    [detail] = await say(emu, REPORTER, "1")
    [rated] = await press(emu, REPORTER, detail, "⭐⭐⭐⭐⭐")
    assert "Đã cập nhật" in rated["text"]
    await eventually(seeded_maker, select(Ticket).where(Ticket.csat == 5))

    # reopening more than 7 days after resolution is refused
    async with seeded_maker() as s:
        await s.execute(update(Ticket).values(resolved_at=utcnow() - timedelta(days=8)))
        await s.commit()
    [detail] = await say(emu, REPORTER, "/mytickets")
    [detail] = await say(emu, REPORTER, "1")
    [late] = await press(emu, REPORTER, detail, "Mở lại")
    assert "quá 7 ngày" in late["text"]
    async with seeded_maker() as s:
        assert (await s.get(Ticket, ticket.id)).status == "resolved"


async def _name(maker, person_id: int) -> str:
    async with maker() as s:
        return (await s.get(Person, person_id)).full_name


def _data(msg: dict, label: str) -> str:
    return next(b["callback_data"] for b in buttons(msg) if label in b["text"])


async def test_group_without_topics(live, seeded_maker):
    emu = live.emu
    start = await staff(seeded_maker, emu, PLAIN, forum=False)
    await report(emu, REPORTER, "Thư điện tử", "Không gửi được thư")
    [card] = await emu.wait_for_messages(PLAIN, since=start)
    assert card["message_thread_id"] is None and "🎫" in card["text"]
    assert emu.forum_topics(PLAIN) == []
    # chatter in the group that replies to nothing reaches nobody
    since = len(emu.sent(REPORTER))
    await emu.send_text(AGENT_A, "Mọi người ăn trưa chưa?", chat_id=PLAIN)
    # a reply to the card reaches the reporter
    await emu.send_text(AGENT_A, "Anh/chị gửi giúp địa chỉ người nhận", chat_id=PLAIN,
                        reply_to_message_id=card["message_id"])
    header, copy = await emu.wait_for_messages(REPORTER, count=2, since=since)
    assert copy["text"] == "Anh/chị gửi giúp địa chỉ người nhận"
    assert all("ăn trưa" not in (m["text"] or "") for m in emu.sent(REPORTER))
    # the reporter's reply is threaded under the card
    since_g = len(emu.sent(PLAIN))
    await emu.send_text(REPORTER, "abc@hcm.gov.vn", reply_to_message_id=header["message_id"])
    who, relayed = await emu.wait_for_messages(PLAIN, count=2, since=since_g)
    assert who["reply_to_message_id"] == card["message_id"]
    assert relayed["text"] == "abc@hcm.gov.vn" and relayed["reply_to_message_id"] == \
        who["message_id"]


async def test_sla_warning_and_breach_with_moved_clock(live, seeded_maker):
    emu = live.emu
    start = await staff(seeded_maker, emu, FORUM, forum=True)
    await report(emu, REPORTER, "QLVB", "Cả phường không đăng nhập được", severity="4")
    await emu.wait_for_messages(FORUM, since=start)
    ticket = await eventually(seeded_maker, select(Ticket).where(
        Ticket.card_message_id.is_not(None)))
    assert ticket.severity == "critical" and ticket.sla_due_at is not None
    desk = live.app.desk
    since_g, since_op = len(emu.sent(FORUM)), len(emu.sent(OPERATOR))
    assert await desk.sla_scan(ticket.sla_due_at - timedelta(minutes=90)) == (0, 0)
    assert await desk.sla_scan(ticket.sla_due_at - timedelta(minutes=30)) == (1, 0)
    [warn] = await emu.wait_for_messages(FORUM, since=since_g)
    assert "sắp quá hạn" in warn["text"] and warn["message_thread_id"] == ticket.topic_id
    assert await desk.sla_scan(ticket.sla_due_at - timedelta(minutes=20)) == (0, 0)  # once
    assert await desk.sla_scan(ticket.sla_due_at + timedelta(minutes=1)) == (0, 1)
    [breach] = await emu.wait_for_messages(FORUM, since=since_g + 1)
    assert "đã quá hạn" in breach["text"]
    [ops] = await emu.wait_for_messages(OPERATOR, since=since_op)
    assert ticket.code in ops["text"] and "quá hạn" in ops["text"]
    assert await desk.sla_scan(ticket.sla_due_at + timedelta(hours=2)) == (0, 0)
    assert len(emu.sent(OPERATOR)) == since_op + 1


async def test_incident_grouping_and_queue(live, seeded_maker):
    emu = live.emu
    await staff(seeded_maker, emu, FORUM, forum=True)
    reporters = [REPORTER, 9111, 9112, 9113]
    for i, uid in enumerate(reporters[1:]):
        await add_person(seeded_maker, f"Cán Bộ {i}", f"+8490000072{i}", BEN_THANH,
                         telegram_id=uid, verified=True)
        emu.add_user(uid, f"CB{i}")
    for uid in reporters[:3]:
        await report(emu, uid, "Hội nghị truyền hình", f"Phòng họp không kết nối ({uid})")
    proposal = await emu.wait_for_messages(
        FORUM, predicate=lambda m: "cùng một sự cố" in (m["text"] or ""))
    [proposal] = proposal
    assert proposal["message_thread_id"] is None  # in the group's general chat
    since = {uid: len(emu.sent(uid)) for uid in reporters[:3]}
    n = len(emu.calls)
    await emu.press_button(BYSTANDER, proposal, _data(proposal, "Gộp"))
    assert "Chỉ cán bộ hỗ trợ" in await alert_text(emu, n)
    since_g = len(emu.sent(FORUM))
    await emu.press_button(AGENT_A, proposal, _data(proposal, "Gộp"))
    [opened] = await emu.wait_for_messages(FORUM, since=since_g,
                                           predicate=lambda m: "Đã mở sự cố" in (m["text"] or ""))
    for uid in reporters[:3]:
        [known] = await emu.wait_for_messages(uid, since=since[uid])
        assert "sự cố đã ghi nhận" in known["text"]
    incident = await eventually(seeded_maker, select(Incident))
    # a new reporter on the same system is told it is known and joins the incident
    created = await report(emu, reporters[3], "Hội nghị truyền hình", "Không vào được phòng")
    assert "đã được ghi nhận" in created["text"]
    await eventually(seeded_maker, select(Ticket).where(
        Ticket.summary == "Không vào được phòng", Ticket.incident_id == incident.id))
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Ticket).where(
            Ticket.incident_id == incident.id)) == 4

    # the queue: agents only, filters
    await emu.wait_for_messages(FORUM, predicate=lambda m: "Không vào được phòng" in (
        m["text"] or ""))  # the fourth card is up

    async def queue(uid: int, text: str) -> str:
        since_g = len(emu.sent(FORUM))
        await emu.send_text(uid, text, chat_id=FORUM)
        [q] = await emu.wait_for_messages(FORUM, since=since_g, predicate=lambda m: any(
            k in (m["text"] or "") for k in ("Hàng đợi", "Không hiểu", "quyền")))
        return q["text"]

    q = await queue(AGENT_A, "/queue")
    assert "Hàng đợi" in q and q.count("HT-") == 4
    assert "Không có phiếu" in await queue(AGENT_A, "/queue mine")
    assert (await queue(AGENT_A, "/queue unassigned HNTH")).count("HT-") == 4
    assert "Không có phiếu" in await queue(AGENT_A, "/queue qlvb")
    assert (await queue(AGENT_A, "/queue phuong ben thanh")).count("HT-") == 4
    assert "Không hiểu bộ lọc" in await queue(AGENT_A, "/queue xyzzy khong co")
    assert "quyền" in (await queue(BYSTANDER, "/queue")).lower()

    # the incident is fixed: every linked reporter is told
    since = {uid: len(emu.sent(uid)) for uid in reporters}
    await emu.press_button(AGENT_A, opened, _data(opened, "khắc phục"))
    for uid in reporters:
        [done] = await emu.wait_for_messages(uid, since=since[uid])
        assert "đã được xử lý xong" in done["text"] and "khắc phục" in done["text"]
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(Ticket).where(
            Ticket.status == "resolved")) == 4

    # operators get the statistics in chat and as XLSX
    msgs = await say(emu, OPERATOR, "/ticketstats 7", count=2)
    assert "Số phiếu: 4" in msgs[0]["text"]
    assert msgs[1]["media_type"] == "document"


async def test_ticket_waits_for_the_support_group(live, seeded_maker):
    """Publication is driven by the ticket rows, not by the reporter's update: a ticket
    reported while no support group exists appears once an operator sets one up."""
    emu = live.emu
    await add_person(seeded_maker, "Trần Thị Báo", "+84900000701", BEN_THANH,
                     telegram_id=REPORTER, verified=True)
    await add_person(seeded_maker, "Điều Hành", "+84900000704", BEN_THANH, role="dtc_admin",
                     telegram_id=OPERATOR, verified=True)
    emu.add_user(REPORTER, "Báo")
    emu.add_user(OPERATOR, "ĐH")
    await report(emu, REPORTER, "Chữ ký số", "Không ký được văn bản")
    # a reply to the "created" notice before the group exists is kept, and said so
    created = emu.sent(REPORTER)[-1]
    since = len(emu.sent(REPORTER))
    await emu.send_text(REPORTER, "Lỗi từ sáng nay", reply_to_message_id=created["message_id"])
    [kept] = await emu.wait_for_messages(REPORTER, since=since)
    assert "ngay khi nhóm được thiết lập" in kept["text"]
    emu.create_group(PLAIN, "Hỗ trợ", members=[OPERATOR])
    await emu.send_text(OPERATOR, "/supportgroup", chat_id=PLAIN)
    [card] = await emu.wait_for_messages(PLAIN, predicate=lambda m: "🎫" in (m["text"] or ""))
    assert "Không ký được văn bản" in card["text"]
    ticket = await eventually(seeded_maker, select(Ticket).where(
        Ticket.card_message_id == card["message_id"]))
    assert ticket.group_chat_id == str(PLAIN)
    async with seeded_maker() as s:
        assert await s.scalar(select(func.count()).select_from(TicketMessage).where(
            TicketMessage.text == "Lỗi từ sáng nay")) == 1


async def test_queue_pages(live, seeded_maker):
    """/queue shows ten tickets a page, most urgent first, with a button to the next."""
    from services import tickets as tk
    from services.audit import Actor

    emu = live.emu
    reporter_id = await add_person(seeded_maker, "Trần Thị Báo", "+84900000701", BEN_THANH,
                                   verified=True)
    await add_person(seeded_maker, "Hỗ Trợ A", "+84900000702", BEN_THANH, role="support",
                     telegram_id=AGENT_A, verified=True)
    emu.add_user(AGENT_A, "A")
    async with seeded_maker() as s:
        reporter = await s.get(Person, reporter_id)
        made = [await tk.create_ticket(s, reporter, summary=f"Sự cố số {i}", system_code="qlvb",
                                       severity="critical" if i == 11 else "low",
                                       actor=Actor.system("test")) for i in range(12)]
        first, critical = made[0].code, made[-1].code
        await s.commit()
    [q] = await say(emu, AGENT_A, "/queue")
    assert "1–10 trên 12" in q["text"] and q["text"].count("HT-") == 10
    assert q["text"].index(critical) < q["text"].index(first)  # the critical one leads
    await emu.press_button(AGENT_A, q, _data(q, "Xem thêm"))
    for _ in range(100):
        rec = next(m for m in emu.sent(AGENT_A) if m["message_id"] == q["message_id"])
        if "11–12 trên 12" in rec["text"]:
            break
        await asyncio.sleep(0.05)
    assert "11–12 trên 12" in rec["text"] and rec["text"].count("HT-") == 2
    assert any("Trước" in b["text"] for b in buttons(rec))
