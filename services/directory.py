"""The directory the accounts live in: an interface and its LDAP (ldap3) implementation.

Layout under the base DN::

    ou=units                     one ``ou=<unit code>`` per unit (description = unit name)
      ou=<code>
        uid=<address>            inetOrgPerson: cn/sn/givenName in UTF-8 as typed,
                                 mail, employeeNumber = hopnhat person id
    ou=groups                    one groupOfNames per system role, ``cn=<system>-<role>``
    ou=policies / cn=default     the ppolicy default policy (pwdMustChange, pwdLockout)

Deactivation never deletes: the entry is locked (``pwdAccountLockedTime`` 000001010000Z, the
ppolicy administrative lock) and removed from every group. Every DN value goes through
``escape_rdn`` and every filter value through ``escape_filter_chars``, so a name such as
``*)(uid=*`` is stored literally and never widens a search.

ldap3 is synchronous: calls run in a worker thread, one connection, serialized by a lock.
A socket-level failure (server down, connection reset) is :class:`DirectoryUnavailable`, which
the job runner retries with backoff; anything else is :class:`DirectoryError` (not retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import ldap3
from ldap3.core import exceptions as lexc
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from ldap3.utils.hashed import hashed

from services import ldap_wire

T = TypeVar("T")
LOCKED_FOREVER = "000001010000Z"  # ppolicy: locked by an administrator, no expiry
_UNAVAILABLE_CODES = {51, 52, 80, 81}  # busy, unavailable, other, server down


_HEX_ESCAPE = re.compile(r"\\([0-9a-fA-F]{2})|\\(.)")


def unescape_rdn(value: str) -> str:
    """Inverse of ``escape_rdn`` for values as the server returns them (``\\2C`` or ``\\,``)."""
    raw = bytearray()
    pos = 0
    for m in _HEX_ESCAPE.finditer(value):
        raw += value[pos:m.start()].encode()
        raw += bytes([int(m.group(1), 16)]) if m.group(1) else m.group(2).encode()
        pos = m.end()
    raw += value[pos:].encode()
    return raw.decode("utf-8", errors="replace")


class DirectoryError(Exception):
    """The directory refused an operation (not worth retrying)."""


class DirectoryConflict(DirectoryError):
    """The address is taken by someone else's entry (made outside this service)."""


class DirectoryUnavailable(DirectoryError):
    """The directory cannot be reached now; try again later."""


@dataclass
class DirEntry:
    dn: str
    uid: str
    mail: str | None
    cn: str
    employee: str | None
    unit_code: str | None
    disabled: bool
    must_change: bool
    groups: list[str] = field(default_factory=list)


@dataclass
class NewEntry:
    uid: str
    mail: str
    full_name: str
    unit_code: str
    employee: str
    title: str | None = None
    phone: str | None = None


class Directory(Protocol):
    """What provisioning needs from a directory; :class:`LdapDirectory` is the real one."""

    async def ensure_unit(self, code: str, name: str) -> str: ...
    async def ensure_group(self, name: str, description: str) -> str: ...
    async def get(self, uid: str) -> DirEntry | None: ...
    async def by_employee(self, employee: str) -> list[DirEntry]: ...
    async def search_name(self, text: str) -> list[DirEntry]: ...
    async def taken_uids(self, prefix: str) -> set[str]: ...
    async def create(self, entry: NewEntry, password: str) -> DirEntry: ...
    async def set_password(self, uid: str, password: str, must_change: bool = True) -> None: ...
    async def add_to_group(self, uid: str, group: str) -> bool: ...
    async def disable(self, uid: str) -> list[str]: ...
    async def remove_from_group(self, uid: str, group: str) -> bool: ...
    async def taken_uids_many(self, prefixes: list[str]) -> set[str]: ...
    async def create_many(self, items: list[tuple[NewEntry, str]]
                          ) -> list[DirEntry | DirectoryError | None]: ...
    async def close(self) -> None: ...


def split_name(full_name: str) -> tuple[str, str]:
    """(family name, given name) of a Vietnamese full name, as typed (no folding)."""
    parts = full_name.split()
    if not parts:
        return full_name, full_name
    return (parts[0] if len(parts) > 1 else parts[0]), parts[-1]


class LdapDirectory:
    """An OpenLDAP (or any LDAPv3) directory through ldap3, bound as a service account."""

    def __init__(self, url: str, base_dn: str, bind_dn: str, password: str,
                 timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")  # ldap3 rejects "ldap://host:port/"
        self.base_dn = base_dn
        self.bind_dn = bind_dn
        self._password = password
        self.timeout = timeout
        self._conn: ldap3.Connection | None = None
        self._lock = threading.Lock()
        self._known: set[str] = set()  # DNs of containers known to exist

    # --- plumbing -----------------------------------------------------------------------

    def _connect(self) -> ldap3.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        server = ldap3.Server(self.url, connect_timeout=self.timeout, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, self.bind_dn, self._password,
                                receive_timeout=int(self.timeout), raise_exceptions=False,
                                auto_referrals=False)
        if not conn.bind():
            code = conn.result.get("result")
            conn.unbind()
            if code in _UNAVAILABLE_CODES:
                raise DirectoryUnavailable(f"bind: {conn.result.get('description')}")
            raise DirectoryError(f"service bind refused: {conn.result.get('description')}")
        self._conn = conn
        self._bootstrap(conn)
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._known.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # the socket is gone anyway
                conn.unbind()

    _SOCKET_ERRORS = (lexc.LDAPCommunicationError, lexc.LDAPSocketOpenError,
                      lexc.LDAPSessionTerminatedByServerError, lexc.LDAPSocketReceiveError,
                      lexc.LDAPSocketSendError, lexc.LDAPSocketCloseError,
                      lexc.LDAPResponseTimeoutError, OSError)

    def _sync(self, fn: Callable[[ldap3.Connection], T]) -> T:
        """Run ``fn`` on the connection. A connection that was open but died (the server
        restarted) is replaced and ``fn`` tried once more — every operation here is safe to
        repeat; a second failure, or no server at all, is :class:`DirectoryUnavailable`."""
        with self._lock:
            for attempt in (1, 2):
                had_connection = self._conn is not None
                try:
                    return fn(self._connect())
                except self._SOCKET_ERRORS as exc:
                    self._drop()
                    if attempt == 1 and had_connection:
                        continue
                    raise DirectoryUnavailable(type(exc).__name__) from None
                except DirectoryUnavailable:
                    self._drop()
                    if attempt == 1 and had_connection:
                        continue
                    raise
            raise DirectoryUnavailable("unreachable")  # pragma: no cover - loop returns

    async def _run(self, fn: Callable[[ldap3.Connection], T]) -> T:
        return await asyncio.to_thread(self._sync, fn)

    @staticmethod
    def _check(conn: ldap3.Connection, ok: bool, what: str, allow: tuple[int, ...] = ()) -> int:
        code = int(conn.result.get("result", 0)) if conn.result else 0
        if ok or code == 0 or code in allow:  # an empty search is "False" with success
            return code
        if code in _UNAVAILABLE_CODES or conn.closed:
            raise DirectoryUnavailable(f"{what}: {conn.result.get('description')}")
        raise DirectoryError(f"{what}: {conn.result.get('description')} "
                             f"{conn.result.get('message') or ''}".strip())

    def _ensure(self, conn: ldap3.Connection, dn: str, classes: list[str],
                attrs: dict[str, Any]) -> None:
        if dn in self._known:
            return
        ok = conn.add(dn, classes, attrs)
        self._check(conn, ok, f"add {dn}", allow=(68,))  # 68: already exists
        self._known.add(dn)

    def _bootstrap(self, conn: ldap3.Connection) -> None:
        first = ldap3.utils.dn.parse_dn(self.base_dn)[0]
        if first[0].lower() == "dc":
            self._ensure(conn, self.base_dn, ["dcObject", "organization"],
                         {"dc": first[1], "o": first[1]})
        for ou in ("units", "groups", "policies"):
            self._ensure(conn, f"ou={ou},{self.base_dn}", ["organizationalUnit"], {"ou": ou})
        self._ensure(conn, f"cn=default,ou=policies,{self.base_dn}", ["device", "pwdPolicy"], {
            "cn": "default", "pwdAttribute": "userPassword", "pwdMustChange": "TRUE",
            "pwdLockout": "TRUE", "pwdAllowUserChange": "TRUE", "pwdMaxFailure": "10",
        })

    def unit_dn(self, code: str) -> str:
        return f"ou={escape_rdn(code)},ou=units,{self.base_dn}"

    def group_dn(self, name: str) -> str:
        return f"cn={escape_rdn(name)},ou=groups,{self.base_dn}"

    def person_dn(self, uid: str, unit_code: str) -> str:
        return f"uid={escape_rdn(uid)},{self.unit_dn(unit_code)}"

    _ATTRS = ["uid", "mail", "cn", "employeeNumber", "pwdAccountLockedTime", "pwdReset"]

    def _entry(self, e: Any) -> DirEntry:
        a = e.entry_attributes_as_dict
        parent = ldap3.utils.dn.parse_dn(e.entry_dn)
        in_ou = len(parent) > 1 and parent[1][0].lower() == "ou"
        unit = unescape_rdn(parent[1][1]) if in_ou else None

        def one(name: str) -> Any:
            v = a.get(name) or []
            return v[0] if v else None

        return DirEntry(
            dn=e.entry_dn, uid=str(one("uid")), mail=one("mail"), cn=str(one("cn")),
            employee=one("employeeNumber"), unit_code=unit,
            disabled=one("pwdAccountLockedTime") is not None,
            must_change=bool(one("pwdReset")),
        )

    def _find(self, conn: ldap3.Connection, flt: str) -> list[DirEntry]:
        ok = conn.search(f"ou=units,{self.base_dn}", flt, attributes=self._ATTRS)
        self._check(conn, ok, "search", allow=(32,))  # 32: no such object
        return [self._entry(e) for e in conn.entries]

    def _groups_of(self, conn: ldap3.Connection, dn: str) -> list[str]:
        ok = conn.search(f"ou=groups,{self.base_dn}",
                         f"(&(objectClass=groupOfNames)(member={escape_filter_chars(dn)}))",
                         attributes=["cn"])
        self._check(conn, ok, "search groups", allow=(32,))
        return [str(e.entry_attributes_as_dict["cn"][0]) for e in conn.entries]

    def _get(self, conn: ldap3.Connection, uid: str) -> DirEntry | None:
        found = self._find(conn, f"(&(objectClass=inetOrgPerson)(uid={escape_filter_chars(uid)}))")
        if not found:
            return None
        entry = found[0]
        entry.groups = self._groups_of(conn, entry.dn)
        return entry

    # --- the interface ------------------------------------------------------------------

    async def ensure_unit(self, code: str, name: str) -> str:
        dn = self.unit_dn(code)
        await self._run(lambda c: self._ensure(c, dn, ["organizationalUnit"],
                                               {"ou": code, "description": name[:200] or code}))
        return dn

    async def ensure_group(self, name: str, description: str) -> str:
        dn = self.group_dn(name)
        # groupOfNames needs a member: the service account holds every group open
        await self._run(lambda c: self._ensure(c, dn, ["groupOfNames"], {
            "cn": name, "description": description or name, "member": [self.bind_dn]}))
        return dn

    async def get(self, uid: str) -> DirEntry | None:
        return await self._run(lambda c: self._get(c, uid))

    async def by_employee(self, employee: str) -> list[DirEntry]:
        flt = f"(&(objectClass=inetOrgPerson)(employeeNumber={escape_filter_chars(employee)}))"
        return await self._run(lambda c: self._find(c, flt))

    async def search_name(self, text: str) -> list[DirEntry]:
        """People whose cn contains ``text`` literally (metacharacters are escaped; runs of
        spaces collapse, as LDAP matching ignores insignificant spaces)."""
        text = " ".join(text.split())
        if not text:
            return []
        flt = f"(&(objectClass=inetOrgPerson)(cn=*{escape_filter_chars(text)}*))"
        return await self._run(lambda c: self._find(c, flt))

    async def taken_uids(self, prefix: str) -> set[str]:
        p = escape_filter_chars(prefix)
        flt = f"(&(objectClass=inetOrgPerson)(|(uid={p}*)(mail={p}*)))"

        def work(c: ldap3.Connection) -> set[str]:
            out: set[str] = set()
            for e in self._find(c, flt):
                out.add(e.uid)
                if e.mail:
                    out.add(e.mail.split("@", 1)[0])
            return out

        return await self._run(work)

    async def taken_uids_many(self, prefixes: list[str]) -> set[str]:
        """Addresses in use starting with any of ``prefixes``: one search per 100 prefixes."""
        out: set[str] = set()
        uniq = sorted(set(prefixes))
        for i in range(0, len(uniq), 100):
            terms = "".join(f"(uid={escape_filter_chars(p)}*)(mail={escape_filter_chars(p)}*)"
                            for p in uniq[i:i + 100])
            flt = f"(&(objectClass=inetOrgPerson)(|{terms}))"

            def work(c: ldap3.Connection, flt: str = flt) -> None:
                ok = c.search(f"ou=units,{self.base_dn}", flt, attributes=["uid", "mail"])
                self._check(c, ok, "search", allow=(32,))
                for e in c.response or []:
                    a = e.get("attributes") or {}
                    out.update(str(u) for u in a.get("uid") or [])
                    out.update(str(m).split("@", 1)[0] for m in a.get("mail") or [])

            await self._run(work)
        return out

    def _attrs(self, entry: NewEntry, password: str) -> dict[str, Any]:
        family, given = split_name(entry.full_name)
        attrs: dict[str, Any] = {
            "uid": entry.uid, "mail": entry.mail, "cn": entry.full_name, "sn": family,
            "givenName": given, "displayName": entry.full_name, "employeeNumber": entry.employee,
            "userPassword": hashed(ldap3.HASHED_SALTED_SHA, password), "pwdReset": "TRUE",
        }
        if entry.title:
            attrs["title"] = entry.title
        if entry.phone:
            attrs["telephoneNumber"] = entry.phone
        return attrs

    def _create_one(self, c: ldap3.Connection, entry: NewEntry, password: str) -> DirEntry:
        """Add with the password hashed client side and pwdReset TRUE. The same person's entry
        left by an earlier try is kept and given this password (the earlier one was never
        delivered); someone else's entry under the address is an error."""
        self._ensure(c, self.unit_dn(entry.unit_code), ["organizationalUnit"],
                     {"ou": entry.unit_code})
        dn = self.person_dn(entry.uid, entry.unit_code)
        ok = c.add(dn, ["inetOrgPerson"], self._attrs(entry, password))
        code = self._check(c, ok, f"add {entry.uid}", allow=(68,))  # 68: already exists
        if code != 68:
            return self._created(entry)
        existing = self._get(c, entry.uid)
        if existing is None or existing.employee != entry.employee:
            raise DirectoryConflict(f"{entry.uid} exists for someone else")
        ok = c.modify(existing.dn, {
            "userPassword": [(ldap3.MODIFY_REPLACE, [hashed(ldap3.HASHED_SALTED_SHA, password)])],
            "pwdReset": [(ldap3.MODIFY_REPLACE, ["TRUE"])]})
        self._check(c, ok, f"password {entry.uid}")
        existing.must_change = True
        return existing

    async def create_many(self, items: list[tuple[NewEntry, str]]
                          ) -> list[DirEntry | DirectoryError | None]:
        """Create several entries in one worker-thread call (bulk speed). Per item: the entry,
        the refusal, or None when the directory went away before it was tried."""
        out: list[DirEntry | DirectoryError | None] = [None] * len(items)

        def work(c: ldap3.Connection) -> None:
            slow = list(range(len(items)))
            if ldap_wire.supported(c):
                slow = self._add_pipelined(c, items, out)
            for i in slow:  # refusals and entries already there: one by one, as ever
                entry, password = items[i]
                try:
                    out[i] = self._create_one(c, entry, password)
                except DirectoryUnavailable:
                    raise
                except DirectoryError as exc:
                    out[i] = exc

        with contextlib.suppress(DirectoryUnavailable):  # the caller retries items still None
            await self._run(work)
        return out

    def _add_pipelined(self, c: ldap3.Connection, items: list[tuple[NewEntry, str]],
                       out: list[DirEntry | DirectoryError | None]) -> list[int]:
        """Plain adds with several in flight (see :mod:`services.ldap_wire`); fills ``out``
        for the entries created and returns the indexes that need the careful path."""
        for code in dict.fromkeys(e.unit_code for e, _ in items):
            self._ensure(c, self.unit_dn(code), ["organizationalUnit"], {"ou": code})
        requests = ((self.person_dn(e.uid, e.unit_code), ["inetOrgPerson"], self._attrs(e, pw))
                    for e, pw in items)
        slow: list[int] = []
        for i, result in ldap_wire.add_many(c, requests):
            if result["result"] != 0:
                slow.append(i)
                continue
            out[i] = self._created(items[i][0])
        return sorted(slow)

    def _created(self, entry: NewEntry) -> DirEntry:
        return DirEntry(dn=self.person_dn(entry.uid, entry.unit_code), uid=entry.uid,
                        mail=entry.mail, cn=entry.full_name, employee=entry.employee,
                        unit_code=entry.unit_code, disabled=False, must_change=True)

    async def create(self, entry: NewEntry, password: str) -> DirEntry:
        """One entry (see :meth:`_create_one`)."""
        return await self._run(lambda c: self._create_one(c, entry, password))

    async def set_password(self, uid: str, password: str, must_change: bool = True) -> None:
        def work(c: ldap3.Connection) -> None:
            e = self._get(c, uid)
            if e is None:
                raise DirectoryError(f"no entry {uid}")
            changes: dict[str, Any] = {
                "userPassword": [(ldap3.MODIFY_REPLACE, [hashed(ldap3.HASHED_SALTED_SHA,
                                                                password)])]}
            if must_change:
                changes["pwdReset"] = [(ldap3.MODIFY_REPLACE, ["TRUE"])]
            self._check(c, c.modify(e.dn, changes), f"password {uid}")

        await self._run(work)

    async def add_to_group(self, uid: str, group: str) -> bool:
        """True if added now, False if the person already was a member."""
        def work(c: ldap3.Connection) -> bool:
            e = self._get(c, uid)
            if e is None:
                raise DirectoryError(f"no entry {uid}")
            ok = c.modify(self.group_dn(group), {"member": [(ldap3.MODIFY_ADD, [e.dn])]})
            code = self._check(c, ok, f"group {group}", allow=(20,))  # 20: already a member
            return code != 20

        return await self._run(work)

    async def disable(self, uid: str) -> list[str]:
        """Lock the entry and take it out of every group; returns the groups it left."""
        def work(c: ldap3.Connection) -> list[str]:
            e = self._get(c, uid)
            if e is None:
                raise DirectoryError(f"no entry {uid}")
            for g in e.groups:
                ok = c.modify(self.group_dn(g), {"member": [(ldap3.MODIFY_DELETE, [e.dn])]})
                self._check(c, ok, f"leave {g}", allow=(16,))  # 16: no such value
            if not e.disabled:
                ok = c.modify(e.dn, {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE,
                                                               [LOCKED_FOREVER])]})
                self._check(c, ok, f"lock {uid}")
            return e.groups

        return await self._run(work)

    async def remove_from_group(self, uid: str, group: str) -> bool:
        """True if the person was a member and is not any more."""
        def work(c: ldap3.Connection) -> bool:
            e = self._get(c, uid)
            if e is None:
                raise DirectoryError(f"no entry {uid}")
            ok = c.modify(self.group_dn(group), {"member": [(ldap3.MODIFY_DELETE, [e.dn])]})
            code = self._check(c, ok, f"leave {group}", allow=(16, 32))  # no such value/group
            return code == 0

        return await self._run(work)

    async def close(self) -> None:
        def work() -> None:
            with self._lock:
                self._drop()

        await asyncio.to_thread(work)
