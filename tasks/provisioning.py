"""The provisioning task: executes approved requests against the directory, sends the
notices the bot owes people, and runs the scheduled expiry/revocation sweeps.

Every job is a ``provisioning_requests`` row. Executing one is check-then-act keyed by the
request: the address is reserved (an ``accounts`` row carrying the request id) and committed
before the directory is touched, and the directory add accepts the same person's entry left
by an earlier try. So a job run twice (crash, lease expiry, LDAP outage) ends with one entry.
A directory outage puts the job back with exponential backoff; after the last try it is
``failed`` and operators are alerted.

Temporary passwords exist only in memory: generated here, hashed into the directory, sent to
the owner's private chat with ``protect_content``; never logged nor stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import (
    Account,
    AccountStatus,
    AuditLog,
    ChatIdentity,
    Person,
    ProvisioningRequest,
    ProvKind,
    ProvNotice,
    ProvState,
    Role,
    Unit,
    utcnow,
)
from services import provisioning as prov
from services.addresses import DEFAULT_PATTERN, AddressError, local_part, numbered
from services.audit import Actor, audit
from services.directory import (
    Directory,
    DirectoryConflict,
    DirectoryError,
    DirectoryUnavailable,
    NewEntry,
)
from services.texts import norm_lang, t

log = logging.getLogger(__name__)
ACTOR = Actor.system("task:provisioning")
LEASE = timedelta(minutes=5)
MAX_BACKOFF = timedelta(hours=1)
WARN_BEFORE = timedelta(days=7)
REDELIVER_EVERY = timedelta(minutes=2)  # owners who registered after their mailbox was made
_ALPHABET = string.ascii_letters + string.digits


def temp_password(length: int = 16) -> str:
    """Strong random: letters, digits and a symbol; always all four classes."""
    while True:
        core = "".join(secrets.choice(_ALPHABET) for _ in range(length - 2))
        pw = core + secrets.choice("!@#%*-_=+") + secrets.choice(string.digits)
        if any(c.islower() for c in pw) and any(c.isupper() for c in pw):
            return pw


class Messenger(Protocol):
    """Sends a private message; False if the chat cannot be reached (blocked, unknown)."""

    async def send(self, chat_id: str, text: str, *, protect: bool = False) -> bool: ...


class BotMessenger:
    """The aiogram bot as a :class:`Messenger` (HTML texts, as every template)."""

    def __init__(self, bot: Any) -> None:
        self.bot = bot

    async def send(self, chat_id: str, text: str, *, protect: bool = False) -> bool:
        from aiogram.exceptions import (
            TelegramBadRequest,
            TelegramForbiddenError,
            TelegramRetryAfter,
        )

        for _ in range(3):
            try:
                await self.bot.send_message(int(chat_id), text, protect_content=protect)
            except TelegramRetryAfter as exc:  # flood control: wait as told, then again
                await asyncio.sleep(exc.retry_after)
                continue
            except (TelegramForbiddenError, TelegramBadRequest):
                return False  # blocked or unknown chat
            return True
        return False


@dataclass
class Job:
    req: ProvisioningRequest
    person: Person | None
    unit: Unit | None


@dataclass
class Provisioner:
    maker: async_sessionmaker[AsyncSession]
    directory: Directory
    messenger: Messenger | None = None
    clock: Callable[[], datetime] = utcnow
    max_attempts: int = 6
    retry_seconds: float = 5.0
    mail_domain: str | None = None
    pattern: str = DEFAULT_PATTERN
    parallel_days: int = 90
    default_lang: str = "vi"
    chunk: int = 200
    on_progress: Callable[[str, int, int], Any] | None = None
    # addresses known to be taken and the prefixes already asked of the directory: each
    # prefix is searched once per process, not once per chunk (a conflict forgets it)
    _taken: set[str] = field(default_factory=set)
    _asked: set[str] = field(default_factory=set)
    _alerted: set[str] = field(default_factory=set)  # batches operators were alerted about

    @classmethod
    def from_settings(cls, maker: async_sessionmaker[AsyncSession], directory: Directory,
                      settings: Any, messenger: Messenger | None = None) -> Provisioner:
        return cls(maker, directory, messenger, max_attempts=settings.prov_max_attempts,
                   retry_seconds=settings.prov_retry_seconds, mail_domain=settings.mail_domain,
                   pattern=settings.address_pattern, parallel_days=settings.parallel_days,
                   default_lang=settings.default_lang)

    # --- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Until ``stop``: jobs, notices, and the daily sweeps (expiry, defunct units)."""
        last_sweep: datetime | None = None
        last_redeliver: datetime | None = None
        while not stop.is_set():
            try:
                now = self.clock()
                if last_sweep is None or now - last_sweep > timedelta(hours=1):
                    await self.sweep()
                    last_sweep = now
                if last_redeliver is None or now - last_redeliver > REDELIVER_EVERY:
                    last_redeliver = now
                    await self.redeliver()
                busy = await self.run_once()
                await self.send_notices()
            except Exception:
                log.exception("provisioning loop error")
                busy = 0
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)

    async def run_until_idle(self, max_rounds: int = 1000) -> int:
        """Process everything due now (tests, CLI); returns the jobs processed."""
        total = 0
        for _ in range(max_rounds):
            n = await self.run_once()
            await self.send_notices()
            total += n
            if n == 0:
                break
        return total

    async def run_once(self) -> int:
        """Claim up to ``chunk`` due jobs and execute them; returns how many were claimed."""
        now = self.clock()
        T = ProvisioningRequest
        async with self.maker() as s:
            ids = list(await s.scalars(select(T.id).where(prov.due_clause(now))
                                       .order_by(T.id).limit(self.chunk)))
            if not ids:
                return 0
            claimed = list(await s.execute(
                update(T).where(T.id.in_(ids), prov.due_clause(now))
                .values(state=ProvState.in_progress.value, attempts=T.attempts + 1,
                        next_attempt_at=now + LEASE, updated_at=now)
                .returning(T.id, T.attempts, T.batch, T.requester_id, T.kind)))
            for rid, attempts, batch, requester, kind in claimed:
                if attempts == 1 and batch is None:
                    await prov.notice(s, requester, "prov.n_in_progress", rid, id=rid, kind=kind)
            await s.commit()
        claimed_ids = sorted(r[0] for r in claimed)
        emails = []
        others = []
        for rid, _a, _b, _r, kind in sorted(claimed):
            (emails if kind == ProvKind.email.value else others).append(rid)
        if emails:
            await self._guard(emails, self._emails)
        for rid in others:
            await self._guard([rid], self._one)
        return len(claimed_ids)

    async def _guard(self, ids: list[int], work: Callable[[list[int]], Any]) -> None:
        try:
            left = await work(ids)
        except DirectoryUnavailable as exc:
            await self._back_off(ids, str(exc))
            return
        except (DirectoryError, prov.ProvError, AddressError) as exc:
            code = exc.code if isinstance(exc, prov.ProvError) else type(exc).__name__
            for rid in ids:
                await self._fail(rid, code, str(exc))
            return
        except Exception as exc:  # a bug or the database: retried, failed after the last try
            log.exception("provisioning jobs %s", ids[:5])
            await self._back_off(ids, type(exc).__name__)
            return
        if left:
            await self._back_off(left, "directory unavailable")

    # --- outcomes -------------------------------------------------------------------------

    async def _back_off(self, ids: list[int], error: str) -> None:
        now = self.clock()
        async with self.maker() as s:
            for req in await s.scalars(select(ProvisioningRequest).where(
                    ProvisioningRequest.id.in_(ids),
                    ProvisioningRequest.state == ProvState.in_progress.value)):
                if req.attempts >= self.max_attempts:
                    await self._mark_failed(s, req, "prov.err_unreachable", error)
                    continue
                delay = min(timedelta(seconds=self.retry_seconds * 2 ** (req.attempts - 1)),
                            MAX_BACKOFF)
                req.next_attempt_at = now + delay
                req.last_error = error[:500]
                await audit(s, ACTOR, "provisioning.retry", "provisioning_request", req.id,
                            after={"attempts": req.attempts, "error": error[:200],
                                   "next": req.next_attempt_at.isoformat()})
            await s.commit()

    async def _fail(self, rid: int, code: str, error: str) -> None:
        async with self.maker() as s:
            req = await s.get(ProvisioningRequest, rid)
            if req is not None and req.state == ProvState.in_progress.value:
                await self._mark_failed(s, req, code, error)
            await s.commit()

    async def _mark_failed(self, s: AsyncSession, req: ProvisioningRequest, code: str,
                           error: str) -> None:
        req.state = ProvState.failed.value
        req.last_error = error[:500]
        req.finished_at = self.clock()
        req.result = {"error": code}
        await audit(s, ACTOR, "provisioning.failed", "provisioning_request", req.id,
                    after={"error": code, "attempts": req.attempts})
        if req.batch is not None:  # a bulk run: its operator sees the counts; alert once
            if req.batch in self._alerted:
                return
            self._alerted.add(req.batch)
        else:
            await prov.notice(s, req.requester_id, "prov.n_failed", req.id, id=req.id,
                              kind=req.kind, error=code)
        for op in await prov.operators(s):
            await prov.notice(s, op.id, "prov.alert_failed", req.id, id=req.id, kind=req.kind,
                              error=code, detail=error[:200], attempts=req.attempts)

    async def _done(self, s: AsyncSession, req: ProvisioningRequest, result: dict[str, Any],
                    **params: Any) -> None:
        req.state = ProvState.done.value
        req.finished_at = self.clock()
        req.next_attempt_at = None
        req.result = result
        await audit(s, ACTOR, f"provisioning.{req.kind}_done", "provisioning_request", req.id,
                    after=result)
        if req.batch is None:
            await prov.notice(s, req.requester_id, "prov.n_done", req.id, id=req.id,
                              kind=req.kind, **params)
            if req.subject_id != req.requester_id:
                await prov.notice(s, req.subject_id, "prov.n_done", req.id, id=req.id,
                                  kind=req.kind, **params)

    async def _load(self, s: AsyncSession, ids: list[int]) -> list[Job]:
        rows = await s.execute(
            select(ProvisioningRequest, Person, Unit)
            .outerjoin(Person, Person.id == ProvisioningRequest.subject_id)
            .outerjoin(Unit, Unit.code == ProvisioningRequest.unit_code)
            .where(ProvisioningRequest.id.in_(ids),
                   ProvisioningRequest.state == ProvState.in_progress.value)
            .order_by(ProvisioningRequest.id))
        return [Job(r, p, u) for r, p, u in rows]

    async def _deliver_password(self, s: AsyncSession, person: Person, address: str,
                                password: str, key: str = "prov.password") -> bool:
        """Send the temporary password to its owner's private chat only (protected)."""
        if self.messenger is None:
            return False
        ident = await prov.identity_of(s, person.id)
        if ident is None:
            return False
        lang = norm_lang(ident.lang or person.lang or self.default_lang)
        return await self.messenger.send(ident.external_id, t(key, lang, address=address,
                                                              password=password), protect=True)

    # --- new official email (bulk-capable) ------------------------------------------------

    async def _emails(self, ids: list[int]) -> list[int]:
        """Reserve addresses (committed), create the entries in one directory call, send
        passwords, mark done. Returns the ids to retry (directory went away mid-way)."""
        async with self.maker() as s:
            jobs = await self._load(s, ids)
            reserved = {a.request_id: a for a in await s.scalars(select(Account).where(
                Account.request_id.in_(ids), Account.system_code == "email"))}
            need = [j for j in jobs if j.req.id not in reserved]
            bases: dict[int, str] = {}
            audits: list[dict[str, Any]] = []
            now = self.clock()
            for j in need:
                if j.person is None or j.unit is None:
                    await self._mark_failed(s, j.req, "prov.err_no_subject", "no subject")
                    continue
                if not (j.unit.domain or self.mail_domain):
                    await self._mark_failed(s, j.req, "prov.err_no_domain", j.unit.code)
                    continue
                try:
                    bases[j.req.id] = local_part(j.person.full_name, self.pattern)
                except AddressError:
                    await self._mark_failed(s, j.req, "prov.err_address", j.person.full_name)
            if bases:
                fresh = set(bases.values()) - self._asked
                if fresh:
                    self._taken |= await self.directory.taken_uids_many(sorted(fresh))
                    self._asked |= fresh
                taken = set(self._taken)
                likes = [Account.login.like(f"{b}%") for b in set(bases.values())]
                for i in range(0, len(likes), 100):
                    taken |= set(await s.scalars(select(Account.login).where(
                        Account.system_code == "email", or_(*likes[i:i + 100]))))
                for j in need:
                    if j.req.id not in bases:
                        continue
                    assert j.person is not None and j.unit is not None
                    uid = numbered(bases[j.req.id], taken)
                    taken.add(uid)
                    self._taken.add(uid)
                    acc = Account(person_id=j.person.id, system_code="email", login=uid,
                                  address=f"{uid}@{j.unit.domain or self.mail_domain}",
                                  status=AccountStatus.pending.value, request_id=j.req.id)
                    s.add(acc)
                    reserved[j.req.id] = acc
                    audits.append(_audit_row(now, "account.reserved", j.req.id,
                                             {"login": uid, "address": acc.address}))
                if audits:
                    await s.execute(insert(AuditLog), audits)
            await s.commit()  # reservations are durable before the directory is touched
            todo = [j for j in jobs if j.req.id in reserved and j.req.state ==
                    ProvState.in_progress.value]
            units = {j.unit.code: j.unit.name for j in todo if j.unit is not None}
            for code, name in units.items():
                await self.directory.ensure_unit(code, name)
            items: list[tuple[Job, Account, str]] = []
            for j in todo:
                acc = reserved[j.req.id]
                if acc.status == AccountStatus.active.value:
                    continue
                items.append((j, acc, temp_password()))
            results = await self.directory.create_many([
                (NewEntry(uid=acc.login, mail=acc.address or "", full_name=j.person.full_name,
                          unit_code=j.unit.code, employee=str(j.person.id),
                          title=j.person.position, phone=j.person.phone), pw)
                for j, acc, pw in items if j.person is not None and j.unit is not None])
            retry: list[int] = []
            now = self.clock()
            created: list[Account] = []
            bulk: list[tuple[ProvisioningRequest, Account, str, bool]] = []
            chats = await self._chats(s, [j.person.id for j, _a, _p in items if j.person])
            to_send: list[tuple[int, str, str, str, str]] = []  # account, chat, lang, addr, pw
            with s.no_autoflush:
                for (j, acc, pw), res in zip(items, results, strict=True):
                    assert j.person is not None
                    if res is None:
                        retry.append(j.req.id)
                        continue
                    if isinstance(res, DirectoryConflict):  # taken meanwhile: renumber later
                        self._taken.add(acc.login)
                        self._asked.discard(_base_of(acc.login))
                        await s.delete(acc)
                        retry.append(j.req.id)
                        continue
                    if isinstance(res, DirectoryError):
                        acc.status = AccountStatus.disabled.value
                        acc.login = f"{acc.login}#x{acc.id}"[:120]  # frees the address
                        await self._mark_failed(s, j.req, "prov.err_directory", str(res))
                        continue
                    chat = chats.get(j.person.id)
                    sent = chat is not None and self.messenger is not None
                    if sent:
                        assert chat is not None
                        to_send.append((acc.id, chat[0], chat[1], acc.address or acc.login, pw))
                    del pw
                    created.append(acc)
                    if j.req.batch is not None:  # bulk: written below in a few statements
                        bulk.append((j.req, acc, res.dn, sent))
                        continue
                    acc.status = AccountStatus.active.value
                    acc.dn = res.dn
                    acc.activated_at = now
                    await self._done(s, j.req, {"login": acc.login, "address": acc.address,
                                                "dn": res.dn, "password_sent": sent},
                                     address=acc.address, sent=sent)
                if bulk:
                    await self._done_bulk(s, bulk, now)
                await self._parallel(s, created, now)
            await s.commit()
        # Passwords go out after the commit, outside any transaction (a send must not hold the
        # database); a crash before ``password_sent_at`` is written is repaired by
        # :meth:`redeliver`, which issues a fresh password.
        await self._send_passwords(to_send)
        if self.on_progress is not None:
            batch = next((j.req.batch for j in jobs if j.req.batch), None)
            if batch:
                await _maybe_await(self.on_progress(batch, len(items) - len(retry),
                                                    len(jobs)))
        return retry

    async def _chats(self, s: AsyncSession, person_ids: list[int]) -> dict[int, tuple[str, str]]:
        """Private chat and language of each person who has a Telegram identity."""
        out: dict[int, tuple[str, str]] = {}
        for i in range(0, len(person_ids), 500):
            rows = await s.execute(
                select(ChatIdentity.person_id, ChatIdentity.external_id, ChatIdentity.lang,
                       Person.lang)
                .join(Person, Person.id == ChatIdentity.person_id)
                .where(ChatIdentity.person_id.in_(person_ids[i:i + 500]),
                       ChatIdentity.channel == "telegram").order_by(ChatIdentity.id))
            for pid, ext, ilang, plang in rows:
                out[pid] = (ext, norm_lang(ilang or plang or self.default_lang))
        return out

    async def _send_passwords(self, items: list[tuple[int, str, str, str, str]]) -> None:
        if self.messenger is None or not items:
            return
        sent: list[int] = []
        for account_id, chat_id, lang, address, pw in items:
            try:
                ok = await self.messenger.send(chat_id, t("prov.password", lang, address=address,
                                                          password=pw), protect=True)
            except Exception as exc:  # never the text: it holds the password
                log.warning("password for account %s not sent: %s", account_id,
                            type(exc).__name__)
                ok = False
            if ok:
                sent.append(account_id)
        items.clear()
        if sent:
            async with self.maker() as s:
                await s.execute(update(Account).where(Account.id.in_(sent))
                                .values(password_sent_at=self.clock()))
                await s.commit()

    async def redeliver(self, limit: int = 100) -> int:
        """Mailboxes we created whose password never reached the owner (no chat yet at
        creation, a failed send, a crash before it was recorded): once the owner has a chat,
        set a fresh temporary password and send it. Returns how many were sent."""
        if self.messenger is None:
            return 0
        async with self.maker() as s:
            rows = list(await s.execute(
                select(Account.id, Account.login, Account.address, Account.person_id)
                .join(ChatIdentity, and_(ChatIdentity.person_id == Account.person_id,
                                         ChatIdentity.channel == "telegram"))
                .where(Account.system_code == "email",
                       Account.status == AccountStatus.active.value,
                       Account.request_id.is_not(None), Account.password_sent_at.is_(None))
                .distinct().limit(limit)))
            chats = await self._chats(s, [r[3] for r in rows])
        items = []
        for account_id, login, address, person_id in rows:
            pw = temp_password()
            try:
                await self.directory.set_password(login, pw, must_change=True)
            except DirectoryUnavailable:
                break
            except DirectoryError:
                log.warning("cannot reset the password of account %s", account_id)
                continue
            chat_id, lang = chats[person_id]
            items.append((account_id, chat_id, lang, address or login, pw))
            async with self.maker() as s:
                await audit(s, ACTOR, "account.password_redelivered", "account", account_id)
                await s.commit()
        n = len(items)
        await self._send_passwords(items)
        return n

    async def _done_bulk(self, s: AsyncSession,
                         rows: list[tuple[ProvisioningRequest, Account, str, bool]],
                         now: datetime) -> None:
        """Batch jobs done: accounts, requests and audit rows in three executemany
        statements (the ORM unit of work cost more than the directory adds)."""
        await s.execute(update(Account), [
            {"id": acc.id, "status": AccountStatus.active.value, "dn": dn, "activated_at": now,
             "password_sent_at": now if sent else None} for _r, acc, dn, sent in rows])
        results = [{"login": acc.login, "address": acc.address, "dn": dn, "password_sent": sent}
                   for _r, acc, dn, sent in rows]
        await s.execute(update(ProvisioningRequest), [
            {"id": req.id, "state": ProvState.done.value, "finished_at": now,
             "next_attempt_at": None, "result": res, "updated_at": now}
            for (req, _a, _d, _s), res in zip(rows, results, strict=True)])
        await s.execute(insert(AuditLog), [
            _audit_row(now, "provisioning.email_done", req.id, res)
            for (req, _a, _d, _s), res in zip(rows, results, strict=True)])

    async def _parallel(self, s: AsyncSession, created: list[Account], now: datetime) -> None:
        """Older active email accounts of these people stay usable for the parallel period,
        then close (one query for the whole chunk)."""
        if not created:
            return
        new_of = {a.person_id: a for a in created}
        for i in range(0, len(created), 500):
            part = [a.person_id for a in created[i:i + 500]]
            olds = await s.scalars(select(Account).where(
                Account.person_id.in_(part), Account.system_code == "email",
                Account.status == AccountStatus.active.value,
                Account.id.not_in([a.id for a in created]), Account.expires_at.is_(None)))
            for old in olds:
                old.expires_at = now + timedelta(days=self.parallel_days)
                await audit(s, ACTOR, "account.parallel", "account", old.id,
                            after={"expires_at": old.expires_at.isoformat(),
                                   "new": new_of[old.person_id].address})

    # --- one-at-a-time kinds --------------------------------------------------------------

    async def _one(self, ids: list[int]) -> list[int]:
        async with self.maker() as s:
            for j in await self._load(s, ids):
                if j.person is None:
                    raise prov.ProvError("prov.err_no_subject")
                kind = ProvKind(j.req.kind)
                if kind is ProvKind.system_account:
                    await self._system_account(s, j)
                elif kind is ProvKind.password_reset:
                    await self._password_reset(s, j)
                elif kind is ProvKind.deprovision:
                    await self._deprovision(s, j)
            await s.commit()
        return []

    async def _system_account(self, s: AsyncSession, j: Job) -> None:
        assert j.person is not None
        req = j.req
        email = await prov.active_account(s, j.person.id)
        if email is None:
            raise prov.ProvError("prov.err_need_email")
        group = f"{req.system_code}-{req.role}"
        await self.directory.ensure_group(group, f"{req.system_code}: {req.role}")
        added = await self.directory.add_to_group(email.login, group)
        acc = await s.scalar(select(Account).where(Account.system_code == req.system_code,
                                                   Account.login == email.login))
        if acc is None:
            acc = Account(person_id=j.person.id, system_code=req.system_code or "",
                          login=email.login, request_id=req.id)
            s.add(acc)
        acc.role, acc.status, acc.dn = req.role, AccountStatus.active.value, email.dn
        acc.activated_at, acc.disabled_at = self.clock(), None
        await self._done(s, req, {"login": email.login, "group": group, "added": added},
                         address=email.login, group=group)

    async def _password_reset(self, s: AsyncSession, j: Job) -> None:
        assert j.person is not None
        acc = await prov.active_account(s, j.person.id)
        if acc is None:
            raise prov.ProvError("prov.err_no_account")
        if await prov.identity_of(s, j.person.id) is None:
            raise prov.ProvError("prov.err_no_chat")
        pw = temp_password()
        await self.directory.set_password(acc.login, pw, must_change=True)
        sent = await self._deliver_password(s, j.person, acc.address or acc.login, pw,
                                            "prov.password_reset")
        del pw
        if not sent:
            raise prov.ProvError("prov.err_no_chat")
        acc.password_sent_at = self.clock()
        await self._done(s, j.req, {"login": acc.login, "password_sent": True},
                         address=acc.address)

    async def _deprovision(self, s: AsyncSession, j: Job) -> None:
        """Email account (or the whole person): lock the entry and leave every group. A system
        account: leave only that system's group. Nothing is deleted."""
        assert j.person is not None
        account_id = (j.req.payload or {}).get("account_id")
        q = select(Account).where(Account.person_id == j.person.id,
                                  Account.status != AccountStatus.disabled.value)
        if account_id is not None:
            q = q.where(Account.id == int(account_id))
        accounts = list(await s.scalars(q))
        now = self.clock()
        done: list[str] = []
        for acc in accounts:
            if acc.system_code == "email":
                left = await self.directory.disable(acc.login)
                for other in await s.scalars(select(Account).where(
                        Account.login == acc.login, Account.status != "disabled")):
                    other.status, other.disabled_at = AccountStatus.disabled.value, now
                done.append(f"{acc.login} (-{','.join(left) or '0'})")
            else:
                await self.directory.remove_from_group(acc.login, f"{acc.system_code}-{acc.role}")
                done.append(f"{acc.login}:{acc.system_code}-{acc.role}")
            acc.status, acc.disabled_at = AccountStatus.disabled.value, now
            await audit(s, ACTOR, "account.disabled", "account", acc.id,
                        after={"login": acc.login, "system": acc.system_code})
        await self._done(s, j.req, {"disabled": done}, address=", ".join(done) or "-")
        why = (j.req.payload or {}).get("why")
        if why:  # the system's own jobs: tell the owner their account closed and why
            await prov.notice(s, j.person.id, "prov.n_closed", j.req.id,
                              address=", ".join(done), why=why)

    # --- notices --------------------------------------------------------------------------

    async def send_notices(self, limit: int = 100) -> int:
        """Send queued notices (after their transaction committed); undeliverable ones are
        dropped after 5 tries."""
        if self.messenger is None:
            return 0
        async with self.maker() as s:
            rows = list(await s.execute(
                select(ProvNotice, ChatIdentity, Person)
                .join(Person, Person.id == ProvNotice.person_id)
                .outerjoin(ChatIdentity, and_(ChatIdentity.person_id == ProvNotice.person_id,
                                              ChatIdentity.channel == "telegram"))
                .where(ProvNotice.sent_at.is_(None)).order_by(ProvNotice.id).limit(limit)))
            sent = 0
            seen: set[int] = set()
            for n, ident, person in rows:
                if n.id in seen:
                    continue
                seen.add(n.id)
                if ident is None:
                    n.sent_at = self.clock()  # nobody to tell: no chat identity
                    continue
                lang = norm_lang(ident.lang or person.lang or self.default_lang)
                try:
                    ok = await self.messenger.send(ident.external_id,
                                                   t(n.key, lang, **(n.params or {})))
                except Exception as exc:  # network: try again next round
                    n.attempts += 1
                    if n.attempts >= 5:
                        n.sent_at = self.clock()
                    log.warning("notice %s not sent: %s", n.id, type(exc).__name__)
                    continue
                n.sent_at = self.clock()
                sent += int(ok)
            await s.commit()
            return sent

    # --- scheduled sweeps -----------------------------------------------------------------

    async def sweep(self) -> dict[str, int]:
        """Expiry of parallel accounts (warning a week before) and revocation of the admin
        accounts of defunct units; both only create jobs and notices, the loop executes."""
        now = self.clock()
        out = {"warned": 0, "expired": 0, "revoked": 0, "demoted": 0}
        async with self.maker() as s:
            for acc in await s.scalars(select(Account).where(
                    Account.status == AccountStatus.active.value,
                    Account.expires_at.is_not(None), Account.warned_at.is_(None),
                    Account.expires_at <= now + WARN_BEFORE, Account.expires_at > now)):
                acc.warned_at = now
                await prov.notice(s, acc.person_id, "prov.n_expiry_warning", None,
                                  address=acc.address or acc.login, at=acc.expires_at.isoformat())
                await audit(s, ACTOR, "account.expiry_warned", "account", acc.id)
                out["warned"] += 1
            for acc in list(await s.scalars(select(Account).where(
                    Account.status == AccountStatus.active.value,
                    Account.expires_at.is_not(None), Account.expires_at <= now))):
                if await self._deprovision_job(s, acc, "expired"):
                    out["expired"] += 1
            defunct = select(Unit.code).where(or_(Unit.active.is_(False),
                                                  Unit.merged_into.is_not(None)))
            for acc in list(await s.scalars(select(Account).join(
                    Person, Person.id == Account.person_id).where(
                    Person.unit_code.in_(defunct), Account.role.in_(prov.ADMIN_ROLES),
                    Account.status == AccountStatus.active.value))):
                if await self._deprovision_job(s, acc, "defunct_unit"):
                    out["revoked"] += 1
            for p in await s.scalars(select(Person).where(
                    Person.unit_code.in_(defunct), Person.role == Role.unit_admin.value)):
                p.role = Role.official.value
                await audit(s, ACTOR, "person.admin_revoked", "person", p.id,
                            before={"role": Role.unit_admin.value},
                            after={"role": Role.official.value, "why": "defunct_unit"})
                out["demoted"] += 1
            await s.commit()
        return out

    async def _deprovision_job(self, s: AsyncSession, acc: Account, why: str) -> bool:
        open_ = await s.scalar(select(ProvisioningRequest.id).where(
            ProvisioningRequest.kind == ProvKind.deprovision.value,
            ProvisioningRequest.subject_id == acc.person_id,
            ProvisioningRequest.state.in_(prov.OPEN_STATES)).limit(1))
        if open_ is not None:
            return False
        person = await s.get(Person, acc.person_id)
        assert person is not None
        await prov.create_request(s, None, ProvKind.deprovision, actor=ACTOR, subject=person,
                                  payload={"account_id": acc.id, "why": why}, auto_approve=True,
                                  batch=f"sweep:{why}")
        return True


def _base_of(login: str) -> str:
    return login.rstrip("0123456789")


def _audit_row(now: datetime, action: str, request_id: int,
               after: dict[str, Any]) -> dict[str, Any]:
    return {"at": now, "actor": ACTOR.label, "actor_person_id": None, "action": action,
            "object_type": "provisioning_request", "object_id": str(request_id),
            "after": after}


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value


def start_provisioning(app: Any) -> None:
    """Run the provisioning loop beside the bot when a directory is configured
    (``HOPNHAT_LDAP_URL``); without one, approved requests wait."""
    from services.directory import LdapDirectory

    settings = app.settings
    if not settings.ldap_url:
        log.info("HOPNHAT_LDAP_URL not set: provisioning jobs are not executed")
        return
    password = settings.ldap_password.get_secret_value() if settings.ldap_password else ""
    directory = LdapDirectory(settings.ldap_url, settings.ldap_base_dn, settings.ldap_bind_dn,
                              password)
    worker = Provisioner.from_settings(app.maker, directory, settings, BotMessenger(app.bot))

    async def loop() -> None:
        try:
            await worker.run(app.stop_background, interval=0.5)
        finally:
            await directory.close()

    app.background.append(asyncio.create_task(loop()))
