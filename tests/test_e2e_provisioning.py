"""Account requests end to end: the real bot polling the emulator over HTTP, its
provisioning task creating the entry in a real slapd, visible with an LDAP search."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from db.models import ProvisioningRequest, Unit
from tests.ldap_server import ADMIN_DN, ADMIN_PW, BASE_DN, ldap_search, wipe_directory
from tests.live import OPERATOR_ID, LiveBot, settings_for
from tests.test_e2e_registration import add_person, eventually, say
from tests.test_e2e_status import buttons, press

BEN_THANH = "26743"
SAI_GON = "26740"


@pytest.fixture
async def live_ldap(emu, seeded_maker, db_url, slapd_server):
    if slapd_server.proc is None:
        slapd_server.start()
    wipe_directory(slapd_server)
    async with seeded_maker() as s:
        (await s.get(Unit, BEN_THANH)).domain = "benthanh.hochiminhcity.gov.vn"
        await s.commit()
    settings = settings_for(f"http://127.0.0.1:{emu.port}", db_url, ldap_url=slapd_server.url,
                            ldap_base_dn=BASE_DN, ldap_bind_dn=ADMIN_DN, ldap_password=ADMIN_PW,
                            prov_retry_seconds=0.2)
    bot = await LiveBot(emu, settings).start()
    yield bot
    await bot.stop()


async def wait_text(emu, chat: int, fragment: str, since: int = 0, timeout: float = 15.0):
    msgs = await emu.wait_for_messages(chat, since=since, timeout=timeout,
                                       predicate=lambda m: fragment in (m.get("text") or ""))
    return msgs[0]


async def test_email_request_approved_and_created_in_ldap(live_ldap, seeded_maker,
                                                          slapd_server):
    emu = live_ldap.emu
    await add_person(seeded_maker, "Nguyễn Văn Hùng", "+84900000901", BEN_THANH,
                     telegram_id=9101, verified=True)
    await add_person(seeded_maker, "Lê Thị Quản", "+84900000902", BEN_THANH, role="unit_admin",
                     telegram_id=9102, verified=True)
    emu.add_user(9101, "Hùng")
    emu.add_user(9102, "Quản")
    [menu] = await say(emu, 9101, "/request")
    labels = " ".join(b["text"] for b in buttons(menu))
    assert "Hộp thư công vụ mới" in labels and "Mã định danh" not in labels  # not an admin
    [summary] = await say(emu, 9101, "1")  # typed choice: new mailbox, for myself
    assert "Xác nhận yêu cầu" in summary["text"] and "Nguyễn Văn Hùng" in summary["text"]
    assert "quản trị CNTT đơn vị" in summary["text"]
    since_admin = len(emu.sent(9102))
    [sent] = await press(emu, 9101, summary, "Gửi yêu cầu")
    assert "Đã gửi yêu cầu #" in sent["text"] and "chờ duyệt" in sent["text"]
    card = await wait_text(emu, 9102, "hộp thư công vụ", since=since_admin)
    assert "Nguyễn Văn Hùng" in card["text"]
    since = len(emu.sent(9101))
    [ok] = await press(emu, 9102, card, "Duyệt")
    assert "Bạn đã duyệt" in ok["text"]
    # double press on the same card: approved once
    await emu.press_button(9102, card, buttons(card)[0]["callback_data"], force=True)
    pw_msg = await wait_text(emu, 9101, "Mật khẩu tạm thời", since=since)
    assert pw_msg["protect_content"] is True
    done = await wait_text(emu, 9101, "đã hoàn thành", since=since)
    assert "hungnv@benthanh.hochiminhcity.gov.vn" in done["text"]
    texts = [m.get("text") or "" for m in emu.sent(9101)[since:]]
    assert any("đã được duyệt" in x for x in texts)
    assert any("đang được thực hiện" in x for x in texts)
    password = pw_msg["text"].split("Mật khẩu tạm thời: ")[1].split("\n")[0].strip()
    assert all(password not in (m.get("text") or "") for m in emu.sent(9102))
    [entry] = ldap_search(slapd_server, "(mail=hungnv@benthanh.hochiminhcity.gov.vn)",
                          ["cn", "uid"])
    assert entry["cn"] == ["Nguyễn Văn Hùng"] and entry["uid"] == ["hungnv"]
    assert f"ou={BEN_THANH},ou=units" in entry["dn"]
    [listing] = await say(emu, 9101, "/requests")
    assert "hoàn thành" in listing["text"] and "hungnv@" in listing["text"]
    async with seeded_maker() as s:
        rows = list(await s.scalars(select(ProvisioningRequest)))
        assert len(rows) == 1 and rows[0].state == "done"
    # password reset: the same form, approved by the unit admin, a new protected password
    [menu] = await say(emu, 9101, "/request")
    [summary] = await press(emu, 9101, menu, "Đặt lại mật khẩu")
    since_admin = len(emu.sent(9102))
    await press(emu, 9101, summary, "Gửi yêu cầu")
    card = await wait_text(emu, 9102, "đặt lại mật khẩu", since=since_admin)
    since = len(emu.sent(9101))
    await press(emu, 9102, card, "Duyệt")
    reset = await wait_text(emu, 9101, "đã được đặt lại", since=since)
    assert reset["protect_content"] is True
    new_pw = reset["text"].split("Mật khẩu tạm thời: ")[1].split("\n")[0].strip()
    assert new_pw != password
    import ldap3

    conn = ldap3.Connection(ldap3.Server(slapd_server.url.rstrip("/")), entry["dn"], new_pw)
    assert conn.bind()
    conn.unbind()


async def test_non_admin_for_other_unit_refused_and_reject_with_reason(live_ldap,
                                                                       seeded_maker):
    emu = live_ldap.emu
    await add_person(seeded_maker, "Trần Văn Tâm", "+84900000911", BEN_THANH, telegram_id=9111,
                     verified=True)
    await add_person(seeded_maker, "Lê Thị Quản", "+84900000912", BEN_THANH, role="unit_admin",
                     telegram_id=9112, verified=True)
    other = await add_person(seeded_maker, "Phạm Sài Gòn", "+84900000913", SAI_GON,
                             verified=True)
    emu.add_user(9111, "Tâm")
    emu.add_user(9112, "Quản")
    [menu] = await say(emu, 9111, "/request")
    since = len(emu.sent(9111))
    await emu.press_button(9111, menu, f"pp:{other}", force=True)  # forged: another unit
    [refused] = await emu.wait_for_messages(9111, since=since)
    assert "chỉ có thể yêu cầu cho chính mình" in refused["text"]
    async with seeded_maker() as s:
        assert not list(await s.scalars(select(ProvisioningRequest)))
    # the unit admin asks for staff of the unit: typed name, picked, approved at once
    [menu] = await say(emu, 9112, "/request")
    [whom] = await say(emu, 9112, "Khóa tài khoản")
    [ask_staff] = await press(emu, 9112, whom, "Cho cán bộ")
    [found] = await say(emu, 9112, "tran van tam")
    [summary] = await press(emu, 9112, found, "Trần Văn Tâm")
    assert "Cho: Trần Văn Tâm" in summary["text"]
    [refusal] = await press(emu, 9112, summary, "Gửi yêu cầu")
    assert "chưa có tài khoản" in refusal["text"]  # nothing to deactivate yet
    # an official asks for a mailbox; the unit admin rejects, giving a reason
    [menu] = await say(emu, 9111, "/request")
    [summary] = await press(emu, 9111, menu, "Hộp thư công vụ")
    since_admin = len(emu.sent(9112))
    await press(emu, 9111, summary, "Gửi yêu cầu")
    card = await wait_text(emu, 9112, "Trần Văn Tâm", since=since_admin)
    [ask_reason] = await press(emu, 9112, card, "Từ chối")
    assert "lý do" in ask_reason["text"]
    since = len(emu.sent(9111))
    [rejected] = await say(emu, 9112, "Chưa có quyết định tuyển dụng")
    assert "Bạn đã từ chối" in rejected["text"]
    told = await wait_text(emu, 9111, "bị từ chối", since=since)
    assert "Chưa có quyết định tuyển dụng" in told["text"]
    await asyncio.sleep(0)


async def test_operator_domain_catalog_item(live_ldap, seeded_maker):
    emu = live_ldap.emu
    await add_person(seeded_maker, "Lê Thị Quản", "+84900000922", BEN_THANH, role="unit_admin",
                     telegram_id=9122, verified=True)
    await add_person(seeded_maker, "Vận Hành", "+84900000923", SAI_GON, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    emu.add_user(9122, "Quản")
    emu.add_user(OPERATOR_ID, "Op")
    [menu] = await say(emu, 9122, "/request")
    [ask_domain] = await press(emu, 9122, menu, "tên miền")
    [bad] = await say(emu, 9122, "không phải tên miền")
    assert "không hợp lệ" in bad["text"]
    [keep] = await say(emu, 9122, "phuongbenthanh.hochiminhcity.gov.vn")
    [summary] = await say(emu, 9122, "1")  # keep the old domain
    assert "giữ tên miền cũ" in summary["text"]
    since_op = len(emu.sent(OPERATOR_ID))
    await press(emu, 9122, summary, "Gửi yêu cầu")
    card = await wait_text(emu, OPERATOR_ID, "tên miền", since=since_op)
    await press(emu, OPERATOR_ID, card, "Duyệt")
    await wait_text(emu, OPERATOR_ID, "/catalog", since=since_op)
    [item] = await say(emu, OPERATOR_ID, "/catalog")
    assert "phuongbenthanh" in item["text"]
    since = len(emu.sent(OPERATOR_ID))
    await emu.press_button(OPERATOR_ID, item, buttons(item)[0]["callback_data"])
    await emu.wait_for_call("editMessageText", since=0)
    [ask_value] = await say(emu, OPERATOR_ID, "Ghi kết quả")
    assert since >= 0 and "tên miền đã đăng ký" in ask_value["text"]
    since_admin = len(emu.sent(9122))
    [saved] = await say(emu, OPERATOR_ID, "phuongbenthanh.hochiminhcity.gov.vn")
    assert "Đã ghi kết quả" in saved["text"]
    await wait_text(emu, 9122, "đã xong", since=since_admin)
    unit = await eventually(seeded_maker, select(Unit).where(
        Unit.code == BEN_THANH, Unit.domain == "phuongbenthanh.hochiminhcity.gov.vn"))
    assert unit.old_domains == "benthanh.hochiminhcity.gov.vn"
    # an operator asks an e-ID code for any unit: looked up by name, approved at once
    [menu] = await say(emu, OPERATOR_ID, "/request")
    [ask_unit] = await press(emu, OPERATOR_ID, menu, "Mã định danh")
    assert "Gõ tên đơn vị" in ask_unit["text"]
    [found] = await say(emu, OPERATOR_ID, "phuong ben thanh")
    [summary] = await press(emu, OPERATOR_ID, found, "Phường Bến Thành")
    assert "Đơn vị: Phường Bến Thành" in summary["text"]
    [sent] = await press(emu, OPERATOR_ID, summary, "Gửi yêu cầu")
    assert "đang thực hiện" in sent["text"]  # approved at once: on the checklist
    req = await eventually(seeded_maker, select(ProvisioningRequest).where(
        ProvisioningRequest.kind == "e_id_code"))  # the reply comes before the commit
    assert req.unit_code == BEN_THANH and req.state == "in_progress"


async def test_operator_bulk_file_with_progress_and_result(live_ldap, seeded_maker,
                                                           slapd_server):
    emu = live_ldap.emu
    await add_person(seeded_maker, "Vận Hành", "+84900000933", SAI_GON, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    emu.add_user(OPERATOR_ID, "Op")
    csv = ("full_name,phone,unit_code,position\n"
           "Nguyễn Văn Lợi,0912300001,26743,Văn thư\n"
           "Nguyễn Văn Lợi,0912300002,26743,Chuyên viên\n"
           "Trần Thị Mận,0912300003,26743,\n"
           "Sai Số,12,26743,\n").encode()
    [ask_file] = await say(emu, OPERATOR_ID, "/provision")
    assert "CSV hoặc XLSX" in ask_file["text"]
    since = len(emu.sent(OPERATOR_ID))
    await emu.send_document(OPERATOR_ID, csv, "ds.csv")
    msgs = await emu.wait_for_messages(OPERATOR_ID, count=2, since=since)
    plan, confirm = msgs
    assert "Sẽ tạo: 3 hộp thư (1 địa chỉ trùng" in plan["text"]
    assert "loinv1@benthanh.hochiminhcity.gov.vn" in plan["text"]
    assert "Dòng không hợp lệ: 1" in plan["text"]
    assert ldap_search(slapd_server, "(objectClass=inetOrgPerson)") == []  # dry run
    since = len(emu.sent(OPERATOR_ID))
    [progress] = await press(emu, OPERATOR_ID, confirm, "Tạo 3 hộp thư")
    assert "0/3" in progress["text"]
    doc = await emu.wait_for_messages(OPERATOR_ID, since=since, timeout=30,
                                      predicate=lambda m: m.get("document") is not None)
    assert "3/3" in doc[0]["caption"]
    edited = next(m for m in emu.sent(OPERATOR_ID) if m["message_id"] == progress["message_id"])
    assert "3/3" in edited["text"]  # the progress message was edited in place
    mails = sorted(e["mail"][0] for e in ldap_search(slapd_server, "(employeeNumber=*)",
                                                    ["mail"]))
    assert mails == ["loinv1@benthanh.hochiminhcity.gov.vn",
                     "loinv@benthanh.hochiminhcity.gov.vn",
                     "mantt@benthanh.hochiminhcity.gov.vn"]


async def test_system_account_with_role_needs_both_approvals(live_ldap, seeded_maker,
                                                             slapd_server):
    from db.models import Account
    from services.directory import LdapDirectory, NewEntry

    emu = live_ldap.emu
    pid = await add_person(seeded_maker, "Đặng Thị Thu", "+84900000941", BEN_THANH,
                           telegram_id=9141, verified=True)
    await add_person(seeded_maker, "Lê Thị Quản", "+84900000942", BEN_THANH, role="unit_admin",
                     telegram_id=9142, verified=True)
    await add_person(seeded_maker, "Vận Hành", "+84900000943", SAI_GON, role="dtc_admin",
                     telegram_id=OPERATOR_ID, verified=True)
    d = LdapDirectory(slapd_server.url, BASE_DN, ADMIN_DN, ADMIN_PW)
    await d.create(NewEntry(uid="thudt", mail="thudt@benthanh.hochiminhcity.gov.vn",
                            full_name="Đặng Thị Thu", unit_code=BEN_THANH, employee=str(pid)),
                   "Some-password-123")
    await d.close()
    async with seeded_maker() as s:
        s.add(Account(person_id=pid, system_code="email", login="thudt", status="active",
                      address="thudt@benthanh.hochiminhcity.gov.vn"))
        await s.commit()
    for uid, name in ((9141, "Thu"), (9142, "Quản"), (OPERATOR_ID, "Op")):
        emu.add_user(uid, name)
    [menu] = await say(emu, 9141, "/request")
    [systems] = await press(emu, 9141, menu, "Tài khoản hệ thống")
    assert any("QLVB" in b["text"] for b in buttons(systems))
    [roles] = await say(emu, 9141, "qlvb")  # typed: the system's code
    [summary] = await press(emu, 9141, roles, "văn thư")
    assert "nhóm văn thư" in summary["text"] and "và bộ phận vận hành" in summary["text"]
    before = (len(emu.sent(9142)), len(emu.sent(OPERATOR_ID)))
    [sent] = await press(emu, 9141, summary, "Gửi yêu cầu")
    assert "2 người duyệt" in sent["text"]
    admin_card = await wait_text(emu, 9142, "tài khoản hệ thống", since=before[0])
    op_card = await wait_text(emu, OPERATOR_ID, "tài khoản hệ thống", since=before[1])
    [partly] = await press(emu, OPERATOR_ID, op_card, "Duyệt")
    assert "còn chờ người duyệt khác" in partly["text"]
    since = len(emu.sent(9141))
    [ok] = await say(emu, 9142, "1")  # typed on the card: approve
    assert "Bạn đã duyệt yêu cầu" in ok["text"] and admin_card
    await wait_text(emu, 9141, "đã hoàn thành", since=since)
    [group] = ldap_search(slapd_server, "(cn=qlvb-van_thu)", ["member"])
    assert f"uid=thudt,ou={BEN_THANH},ou=units,{BASE_DN}" in group["member"]
