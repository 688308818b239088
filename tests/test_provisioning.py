"""Provisioning against a real slapd, on SQLite and PostgreSQL: policy, approvals (also
concurrent), durable idempotent jobs, LDAP outage mid-batch, collisions, expiry with a moved
clock, revocation for defunct units, passwords only to their owner."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import ldap3
import pytest
from sqlalchemy import func, select

from db.models import (
    Account,
    AuditLog,
    ChatIdentity,
    Person,
    ProvisioningRequest,
    ProvKind,
    ProvNotice,
    Unit,
    utcnow,
)
from db.session import make_engine, make_sessionmaker
from services import provisioning as prov
from services.audit import Actor
from services.directory import NewEntry
from services.folding import fold
from tasks.provisioning import Provisioner
from tests.ldap_server import ldap_search

A = Actor.system("test")
U1, U2 = "90001", "90002"


class Recorder:
    """A chat that records what the bot sends (the messenger seam, not the directory)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bool]] = []

    async def send(self, chat_id: str, text: str, *, protect: bool = False) -> bool:
        self.sent.append((chat_id, text, protect))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now


async def setup_units(s) -> None:
    s.add_all([
        Unit(code=U1, name="Phường Thử Một", name_folded="phuong thu mot", kind="ward",
             domain="thumot.gov.vn"),
        Unit(code=U2, name="Xã Thử Hai", name_folded="xa thu hai", kind="commune",
             domain="thuhai.gov.vn"),
    ])
    await s.flush()


async def person(s, name: str, unit: str = U1, role: str = "official",
                 chat: str | None = None) -> Person:
    p = Person(full_name=name, name_folded=fold(name), unit_code=unit, role=role,
               verified_at=utcnow())
    s.add(p)
    await s.flush()
    if chat:
        s.add(ChatIdentity(channel="telegram", external_id=chat, person_id=p.id))
        await s.flush()
    return p


def worker(maker, directory, **kw) -> Provisioner:
    kw.setdefault("messenger", Recorder())
    return Provisioner(maker, directory, retry_seconds=1.0, **kw)


async def test_policy_and_other_unit_refused(sessionmaker):
    async with sessionmaker() as s:
        await setup_units(s)
        official = await person(s, "Nguyễn Văn An")
        other = await person(s, "Trần Thị Bình", U2)
        admin = await person(s, "Lê Quản Trị", U1, "unit_admin")
        op = await person(s, "Phạm Vận Hành", U2, "dtc_admin")
        with pytest.raises(prov.ProvError) as exc:
            await prov.create_request(s, official, ProvKind.email, subject=other, actor=A)
        assert exc.value.code == "prov.err_other_unit"
        with pytest.raises(prov.ProvError):  # a unit admin, but of another unit
            await prov.create_request(s, admin, ProvKind.email, subject=other, actor=A)
        with pytest.raises(prov.ProvError):
            await prov.create_request(s, official, ProvKind.domain, unit_code=U1, actor=A,
                                      payload={"domain": "moi.gov.vn"})
        # email: unit admin approves; the unit admin asking for own staff is approved at once
        mine = await prov.create_request(s, official, ProvKind.email, subject=official, actor=A)
        assert mine.state == "submitted" and mine.needs_unit_admin and not mine.needs_operator
        assert [p.id for p in await prov.approvers_for(s, mine)] == [admin.id]
        staff = await person(s, "Đỗ Văn Cường")
        by_admin = await prov.create_request(s, admin, ProvKind.email, subject=staff, actor=A)
        assert by_admin.state == "approved"
        # unit with no admin: operators approve instead
        theirs = await prov.create_request(s, other, ProvKind.email, subject=other, actor=A)
        assert theirs.needs_operator and not theirs.needs_unit_admin
        assert [p.id for p in await prov.approvers_for(s, theirs)] == [op.id]
        # system account: both, in either order; each part once
        s.add(Account(person_id=official.id, system_code="email", login="annv", status="active"))
        sysacc = await prov.create_request(s, official, ProvKind.system_account,
                                           subject=official, system_code="qlvb",
                                           role="van_thu", actor=A)
        assert (await prov.approve(s, sysacc.id, official, A)).outcome == "forbidden"
        assert (await prov.approve(s, sysacc.id, op, A)).outcome == "partly"
        assert (await prov.approve(s, sysacc.id, op, A)).outcome == "already"  # double press
        assert (await prov.approve(s, sysacc.id, admin, A)).outcome == "approved"
        assert (await prov.approve(s, sysacc.id, admin, A)).outcome == "already"
        with pytest.raises(prov.ProvError):
            await prov.create_request(s, official, ProvKind.system_account, subject=official,
                                      system_code="qlvb", role="root", actor=A)
        rej = await prov.create_request(s, official, ProvKind.password_reset, subject=official,
                                        actor=A)
        assert (await prov.reject(s, rej.id, admin, "không rõ lý do", A)).outcome == "rejected"
        assert (await prov.approve(s, rej.id, admin, A)).outcome == "already"
        await s.commit()
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action.like("provisioning.%"))) >= 8


async def test_concurrent_approvals_approve_once(db_url, sessionmaker):
    async with sessionmaker() as s:
        await setup_units(s)
        official = await person(s, "Nguyễn Văn An")
        admins = [await person(s, f"Quản Trị {i}", U1, "unit_admin") for i in range(3)]
        ops = [await person(s, f"Vận Hành {i}", U2, "dtc_admin") for i in range(2)]
        s.add(Account(person_id=official.id, system_code="email", login="annv", status="active"))
        req = await prov.create_request(s, official, ProvKind.system_account, subject=official,
                                        system_code="tthc", role="mot_cua", actor=A)
        await s.commit()
        rid = req.id
    engine = make_engine(db_url, immediate=True)  # as the bot's engine
    maker = make_sessionmaker(engine)

    async def press(who: Person):
        async with maker() as s2:
            d = await prov.approve(s2, rid, await s2.get(Person, who.id), A)
            await s2.commit()
            return d.outcome

    outcomes = await asyncio.gather(*[press(p) for p in [*admins, *ops, *admins]])
    await engine.dispose()
    assert sorted(outcomes).count("approved") == 1
    assert outcomes.count("partly") == 1
    async with sessionmaker() as s:
        r = await s.get(ProvisioningRequest, rid)
        assert r.state == "approved" and r.unit_approved_by and r.operator_approved_by
        assert await s.scalar(select(func.count()).select_from(ProvNotice).where(
            ProvNotice.key == "prov.n_approved")) == 1


async def test_email_job_creates_entry_and_sends_password_privately(
        sessionmaker, directory, slapd_server, caplog):
    caplog.set_level(logging.DEBUG)
    async with sessionmaker() as s:
        await setup_units(s)
        admin = await person(s, "Lê Quản Trị", U1, "unit_admin", chat="501")
        p = await person(s, "Nguyễn Văn An", chat="502")
        req = await prov.create_request(s, admin, ProvKind.email, subject=p, actor=A)
        await s.commit()
    chat = Recorder()
    w = worker(sessionmaker, directory, messenger=chat)
    assert await w.run_until_idle() == 1
    [entry] = ldap_search(slapd_server, "(mail=annv@thumot.gov.vn)", ["cn", "uid"])
    assert entry["cn"] == ["Nguyễn Văn An"]
    assert entry["dn"] == f"uid=annv,ou={U1},ou=units,dc=hopnhat,dc=test"
    [pw_msg] = [m for m in chat.sent if "Mật khẩu tạm thời" in m[1]]
    assert pw_msg[0] == "502" and pw_msg[2] is True  # owner only, protected
    password = pw_msg[1].split("<code>")[1].split("</code>")[0]
    assert len(password) >= 16
    conn = ldap3.Connection(ldap3.Server(slapd_server.url.rstrip("/")), entry["dn"], password)
    assert conn.bind()  # the sent password works (and must be changed: pwdReset)
    conn.unbind()
    assert password not in caplog.text
    async with sessionmaker() as s:
        r = await s.get(ProvisioningRequest, req.id)
        assert r.state == "done" and r.result["address"] == "annv@thumot.gov.vn"
        for row in await s.scalars(select(AuditLog)):
            assert password not in repr((row.before, row.after))
        for n in await s.scalars(select(ProvNotice)):
            assert password not in repr(n.params)
        keys = [n.key for n in await s.scalars(select(ProvNotice).order_by(ProvNotice.id))]
        assert "prov.n_in_progress" in keys and "prov.n_done" in keys
        acc = await s.scalar(select(Account).where(Account.request_id == req.id))
        assert acc.status == "active" and acc.password_sent_at is not None
    # the admin (requester) is told done, but never gets the password
    assert not [m for m in chat.sent if m[0] == "501" and password in m[1]]
    # running the job again (final commit lost) changes nothing twice
    async with sessionmaker() as s:
        r = await s.get(ProvisioningRequest, req.id)
        r.state, r.next_attempt_at = "approved", None
        acc = await s.scalar(select(Account).where(Account.request_id == req.id))
        acc.status = "pending"
        await s.commit()
    assert await w.run_until_idle() == 1
    assert len(ldap_search(slapd_server, "(uid=annv*)")) == 1
    async with sessionmaker() as s:
        assert await s.scalar(select(func.count()).select_from(Account)) == 1


async def test_collisions_numbered_against_directory_and_db(sessionmaker, directory,
                                                            slapd_server):
    await directory.create(NewEntry(uid="annv", mail="annv@old.gov.vn", full_name="Ngô Văn An",
                                    unit_code="old", employee="x-1"), "Pre-existing-123")
    async with sessionmaker() as s:
        await setup_units(s)
        people = [await person(s, "Nguyễn Văn An", U1 if i % 2 else U2) for i in range(3)]
        for p in people:
            await prov.create_request(s, None, ProvKind.email, subject=p, actor=A,
                                      auto_approve=True)
        await s.commit()
    await worker(sessionmaker, directory).run_until_idle()
    mails = sorted(e["mail"][0] for e in ldap_search(slapd_server, "(employeeNumber=*)",
                                                    ["mail"]))
    assert mails == ["annv1@thuhai.gov.vn", "annv2@thumot.gov.vn", "annv3@thuhai.gov.vn",
                     "annv@old.gov.vn"]


async def test_ldap_down_mid_batch_then_back(sessionmaker, directory, slapd_server):
    names = [f"Nguyễn Văn {n}" for n in ("An", "Bình", "Cường", "Dũng", "Em")] * 6  # 30
    async with sessionmaker() as s:
        await setup_units(s)
        for i, name in enumerate(names):
            p = await person(s, name, U1 if i % 3 else U2)
            await prov.create_request(s, None, ProvKind.email, subject=p, actor=A,
                                      auto_approve=True, batch="b1")
        await s.commit()
    clock = Clock()
    stopped = []

    def stop_after_first_chunk(batch, done, total):
        if not stopped:
            slapd_server.stop()
            stopped.append(done)

    w = worker(sessionmaker, directory, clock=clock, chunk=8, on_progress=stop_after_first_chunk)
    assert await w.run_once() == 8  # first chunk done, then the directory goes away
    assert stopped == [8]
    assert await w.run_once() == 8  # claimed, tried, put back with backoff
    assert await w.run_once() == 8
    async with sessionmaker() as s:
        waiting = list(await s.scalars(select(ProvisioningRequest).where(
            ProvisioningRequest.state == "in_progress", ProvisioningRequest.attempts == 1,
            ProvisioningRequest.next_attempt_at > clock.now)))
        assert len(waiting) >= 16 and all(r.last_error for r in waiting)
    slapd_server.start()
    clock.now += timedelta(minutes=10)  # past backoff and lease
    await w.run_until_idle()
    async with sessionmaker() as s:
        states = list(await s.scalars(select(ProvisioningRequest.state)))
        assert states == ["done"] * 30
        assert await s.scalar(select(func.count(func.distinct(Account.login)))) == 30
    entries = ldap_search(slapd_server, "(employeeNumber=*)", ["employeeNumber", "uid"])
    assert len(entries) == 30
    assert len({e["employeeNumber"][0] for e in entries}) == 30  # no duplicate person
    assert len({e["uid"][0] for e in entries}) == 30


async def test_last_try_fails_and_alerts_operators(sessionmaker, directory, slapd_server):
    async with sessionmaker() as s:
        await setup_units(s)
        op = await person(s, "Phạm Vận Hành", U2, "dtc_admin", chat="900")
        p = await person(s, "Nguyễn Văn An", chat="901")
        req = await prov.create_request(s, op, ProvKind.email, subject=p, actor=A)
        assert req.state == "approved"
        await s.commit()
    clock = Clock()
    chat = Recorder()
    w = worker(sessionmaker, directory, clock=clock, max_attempts=3, messenger=chat)
    slapd_server.stop()
    try:
        for _ in range(3):
            await w.run_once()
            clock.now += timedelta(hours=2)
        await w.send_notices()
    finally:
        slapd_server.start()
    async with sessionmaker() as s:
        r = await s.get(ProvisioningRequest, req.id)
        assert r.state == "failed" and r.attempts == 3
        assert await s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "provisioning.retry")) == 2
    alerts = [m for m in chat.sent if m[0] == "900" and "thất bại sau 3 lần" in m[1]]
    assert len(alerts) == 1
    assert any(m[0] == "900" and "chưa thực hiện được" in m[1] for m in chat.sent)
    assert await w.run_until_idle() == 0  # failed jobs are not retried


async def test_parallel_account_expires_after_three_months(sessionmaker, directory,
                                                           slapd_server):
    await directory.create(NewEntry(uid="an.nguyen", mail="an.nguyen@binhduong.gov.vn",
                                    full_name="Nguyễn Văn An", unit_code="bd-old",
                                    employee="old"), "Old-password-123")
    async with sessionmaker() as s:
        await setup_units(s)
        p = await person(s, "Nguyễn Văn An", chat="777")
        old = Account(person_id=p.id, system_code="email", login="an.nguyen",
                      address="an.nguyen@binhduong.gov.vn", status="active")
        s.add(old)
        await prov.create_request(s, None, ProvKind.email, subject=p, actor=A, auto_approve=True)
        await s.commit()
        old_id = old.id
    clock = Clock()
    chat = Recorder()
    w = worker(sessionmaker, directory, clock=clock, messenger=chat)
    await w.run_until_idle()
    async with sessionmaker() as s:
        old = await s.get(Account, old_id)
        assert old.expires_at is not None
        assert timedelta(days=89) < old.expires_at - clock.now <= timedelta(days=90)
    clock.now += timedelta(days=80)
    assert (await w.sweep())["warned"] == 0
    clock.now += timedelta(days=4)  # 6 days before the end
    assert (await w.sweep())["warned"] == 1
    assert (await w.sweep())["warned"] == 0  # once
    await w.send_notices()
    assert any(m[0] == "777" and "sẽ bị khóa" in m[1] for m in chat.sent)
    clock.now += timedelta(days=7)
    assert (await w.sweep())["expired"] == 1
    assert (await w.sweep())["expired"] == 0  # the job is open already
    await w.run_until_idle()
    assert (await directory.get("an.nguyen")).disabled
    assert not (await directory.get("annv")).disabled
    async with sessionmaker() as s:
        assert (await s.get(Account, old_id)).status == "disabled"


async def test_admin_accounts_of_defunct_units_revoked(sessionmaker, directory):
    async with sessionmaker() as s:
        await setup_units(s)
        admin = await person(s, "Lê Quản Trị", U2, "unit_admin")
        clerk = await person(s, "Trần Văn Thư", U2)
        for p in (admin, clerk):
            await prov.create_request(s, None, ProvKind.email, subject=p, actor=A,
                                      auto_approve=True)
        await s.commit()
    w = worker(sessionmaker, directory)
    await w.run_until_idle()
    async with sessionmaker() as s:
        for p, role in ((admin, "quan_tri"), (clerk, "van_thu")):
            await prov.create_request(s, None, ProvKind.system_account, subject=p,
                                      system_code="qlvb", role=role, actor=A, auto_approve=True)
        await s.commit()
    await w.run_until_idle()
    assert (await directory.get("trilq")).groups == ["qlvb-quan_tri"]
    async with sessionmaker() as s:
        (await s.get(Unit, U2)).merged_into = U1
        await s.commit()
    out = await w.sweep()
    assert out["revoked"] == 1 and out["demoted"] == 1
    await w.run_until_idle()
    admin_entry = await directory.get("trilq")
    assert admin_entry.groups == [] and not admin_entry.disabled  # mailbox kept
    assert (await directory.get("thutv")).groups == ["qlvb-van_thu"]
    async with sessionmaker() as s:
        assert (await s.get(Person, admin.id)).role == "official"
        assert await s.scalar(select(Account.status).where(Account.role == "quan_tri")) == \
            "disabled"


async def test_catalog_items_update_the_unit(sessionmaker):
    async with sessionmaker() as s:
        await setup_units(s)
        (await s.get(Unit, U2)).domain = "cu.thuhai.gov.vn"
        admin = await person(s, "Lê Quản Trị", U2, "unit_admin")
        op = await person(s, "Phạm Vận Hành", U1, "dtc_admin")
        with pytest.raises(prov.ProvError):
            await prov.create_request(s, admin, ProvKind.domain, unit_code=U2, actor=A,
                                      payload={"domain": "not a domain"})
        dom = await prov.create_request(s, admin, ProvKind.domain, unit_code=U2, actor=A,
                                        payload={"domain": "thuhai.lamdong.gov.vn",
                                                 "keep_old": True})
        eid = await prov.create_request(s, admin, ProvKind.e_id_code, unit_code=U2, actor=A)
        for r in (dom, eid):
            assert (await prov.approve(s, r.id, op, A)).outcome == "approved"
            assert r.state == "in_progress"
        await prov.toggle_check(s, dom.id, "register", op, A)
        with pytest.raises(prov.ProvError):
            await prov.record_outcome(s, eid.id, admin, "H39.1.2", A)  # operators only
        with pytest.raises(prov.ProvError):
            await prov.record_outcome(s, eid.id, op, "*)(x", A)
        await prov.record_outcome(s, eid.id, op, "H39.1.2", A)
        await prov.record_outcome(s, dom.id, op, "ThuHai.LamDong.gov.vn", A)
        with pytest.raises(prov.ProvError):
            await prov.record_outcome(s, dom.id, op, "again.gov.vn", A)
        u = await s.get(Unit, U2)
        assert u.e_id_code == "H39.1.2" and u.domain == "thuhai.lamdong.gov.vn"
        assert u.old_domains == "cu.thuhai.gov.vn"
        assert dom.checklist["register"] is True
        keys = [n.key for n in await s.scalars(select(ProvNotice).where(
            ProvNotice.person_id == admin.id))]
        assert keys.count("prov.n_catalog_done") == 2


async def test_password_reset_and_deactivation(sessionmaker, directory, slapd_server):
    async with sessionmaker() as s:
        await setup_units(s)
        admin = await person(s, "Lê Quản Trị", U1, "unit_admin", chat="601")
        p = await person(s, "Nguyễn Văn An", chat="602")
        await prov.create_request(s, admin, ProvKind.email, subject=p, actor=A)
        await s.commit()
    chat = Recorder()
    w = worker(sessionmaker, directory, messenger=chat)
    await w.run_until_idle()
    async with sessionmaker() as s:
        p = await s.get(Person, p.id)
        admin = await s.get(Person, admin.id)
        await prov.create_request(s, admin, ProvKind.system_account, subject=p,
                                  system_code="tthc", role="mot_cua", actor=A)
        reset = await prov.create_request(s, p, ProvKind.password_reset, subject=p, actor=A)
        assert reset.state == "submitted"
        assert (await prov.approve(s, reset.id, admin, A)).outcome == "approved"
        await s.commit()
    op_needed = await w.run_until_idle()
    assert op_needed == 1  # the system account still waits for an operator
    [_, reset_msg] = [m for m in chat.sent if "Mật khẩu tạm thời" in m[1]]
    assert reset_msg[0] == "602" and reset_msg[2] is True and "đặt lại" in reset_msg[1]
    new_pw = reset_msg[1].split("<code>")[1].split("</code>")[0]
    dn = f"uid=annv,ou={U1},ou=units,dc=hopnhat,dc=test"
    conn = ldap3.Connection(ldap3.Server(slapd_server.url.rstrip("/")), dn, new_pw)
    assert conn.bind()
    conn.unbind()
    assert (await directory.get("annv")).must_change
    async with sessionmaker() as s:
        op = await person(s, "Phạm Vận Hành", U2, "dtc_admin")
        sysreq = await s.scalar(select(ProvisioningRequest).where(
            ProvisioningRequest.kind == "system_account"))
        assert (await prov.approve(s, sysreq.id, op, A)).outcome == "approved"
        await s.commit()
    await w.run_until_idle()
    assert (await directory.get("annv")).groups == ["tthc-mot_cua"]
    async with sessionmaker() as s:
        admin = await s.get(Person, admin.id)
        p = await s.get(Person, p.id)
        await prov.create_request(s, admin, ProvKind.deprovision, subject=p, actor=A)
        await s.commit()
    await w.run_until_idle()
    e = await directory.get("annv")
    assert e.disabled and e.groups == []
    assert len(ldap_search(slapd_server, "(uid=annv)")) == 1  # kept, never deleted
    async with sessionmaker() as s:
        statuses = set(await s.scalars(select(Account.status)))
        assert statuses == {"disabled"}


async def test_password_reaches_owner_who_registers_later(sessionmaker, directory,
                                                          slapd_server):
    async with sessionmaker() as s:
        await setup_units(s)
        p = await person(s, "Nguyễn Văn An")  # on a staff list, no chat yet
        await prov.create_email_batch(s, None, [p], actor=A, batch="b-late")
        await s.commit()
    chat = Recorder()
    w = worker(sessionmaker, directory, messenger=chat)
    await w.run_until_idle()
    assert chat.sent == [] and await w.redeliver() == 0
    async with sessionmaker() as s:
        acc = await s.scalar(select(Account))
        assert acc.status == "active" and acc.password_sent_at is None
        s.add(ChatIdentity(channel="telegram", external_id="888", person_id=p.id))
        await s.commit()
    assert await w.redeliver() == 1
    [(chat_id, text, protect)] = chat.sent
    assert chat_id == "888" and protect is True
    pw = text.split("<code>")[1].split("</code>")[0]
    dn = f"uid=annv,ou={U1},ou=units,dc=hopnhat,dc=test"
    conn = ldap3.Connection(ldap3.Server(slapd_server.url.rstrip("/")), dn, pw)
    assert conn.bind()
    conn.unbind()
    assert await w.redeliver() == 0  # once
