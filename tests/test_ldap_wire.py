"""Pipelined bulk adds (services/ldap_wire.py) against a real slapd: the same entries as the
one-by-one ldap3 path, every outcome per item, valid BER, and a restart mid-way."""

from __future__ import annotations

import ldap3
import pytest
from ldap3.protocol.rfc4511 import LDAPMessage
from pyasn1.codec.ber import decoder

from services import ldap_wire
from services.directory import DirectoryConflict, DirectoryError, DirEntry, NewEntry
from tests.ldap_server import ldap_search
from tests.test_directory import NASTY

ATTRS = ["uid", "mail", "cn", "sn", "givenName", "displayName", "employeeNumber", "title",
         "telephoneNumber", "pwdReset"]


def entry(i: int, unit: str, name: str | None = None, **kw) -> NewEntry:
    base = dict(uid=f"{unit}-u{i}", mail=f"u{i}@{unit}.gov.vn",
                full_name=name or NASTY[i % len(NASTY)] + f" {i}", unit_code=unit,
                employee=str(1000 + i), title="Chuyên viên, \"tổ\" <1>" if i % 2 else None,
                phone=f"09{i:08d}" if i % 3 else None)
    base.update(kw)
    return NewEntry(**base)


def stored(server, uid: str) -> dict:
    [e] = ldap_search(server, f"(uid={uid})", ATTRS)
    return {k: v for k, v in e.items() if k != "dn"}


def bind(server, dn: str, password: str) -> bool:
    conn = ldap3.Connection(ldap3.Server(server.url.rstrip("/")), dn, password)
    try:
        return conn.bind()
    finally:
        conn.unbind()


async def test_bulk_entries_equal_the_one_by_one_ones(directory, slapd_server):
    n = ldap_wire.WINDOW * 2 + 5  # several windows
    for i in range(4):
        await directory.create(entry(i, "a"), "Tmp-pass-123456")
    items = [(entry(i, "b"), f"Bulk-pass-{i:06d}") for i in range(n)]
    out = await directory.create_many(items)
    assert all(isinstance(r, DirEntry) for r in out)
    for i in range(4):
        one, bulk = stored(slapd_server, f"a-u{i}"), stored(slapd_server, f"b-u{i}")
        for k in ("uid", "mail"):
            one.pop(k), bulk.pop(k)
        assert one == bulk
    assert len(ldap_search(slapd_server, "(uid=b-u*)")) == n
    last = stored(slapd_server, f"b-u{n - 1}")
    assert last["cn"] == [items[-1][0].full_name] and last["pwdReset"] == [True]
    assert out[7].dn == directory.person_dn("b-u7", "b")
    assert bind(slapd_server, out[7].dn, "Bulk-pass-000007")


async def test_every_outcome_per_item(directory, slapd_server):
    await directory.create(entry(1, "c"), "Old-pass-1234567")  # same person, earlier try
    await directory.create(entry(2, "c"), "Old-pass-1234567")
    items = [
        (entry(0, "c"), "New-pass-0000000"),                   # plain add
        (entry(1, "c"), "New-pass-1111111"),                   # already there: password set
        (entry(2, "c", employee="someone-else"), "x-Pass-1234567"),  # someone else's
        (entry(3, "c", mail="ánh@c.gov.vn"), "x-Pass-1234567"),  # mail must be ASCII (IA5)
        (entry(4, "c"), "New-pass-4444444"),
    ]
    out = await directory.create_many(items)
    assert isinstance(out[0], DirEntry) and isinstance(out[4], DirEntry)
    assert isinstance(out[1], DirEntry) and out[1].must_change
    assert bind(slapd_server, out[1].dn, "New-pass-1111111")
    assert not bind(slapd_server, out[1].dn, "Old-pass-1234567")
    assert isinstance(out[2], DirectoryConflict)
    assert isinstance(out[3], DirectoryError) and not isinstance(out[3], DirectoryConflict)
    assert stored(slapd_server, "c-u2")["employeeNumber"] == ["1002"]  # left alone
    assert ldap_search(slapd_server, "(uid=c-u3)") == []


async def test_a_restart_between_calls_and_an_outage(directory, slapd_server):
    await directory.create(entry(0, "d"), "Tmp-pass-123456")  # a connection is open
    slapd_server.stop()
    slapd_server.start()  # that connection is dead: replaced, the whole call redone
    out = await directory.create_many([(entry(i, "d"), "Tmp-pass-123456") for i in range(40)])
    assert all(isinstance(r, DirEntry) for r in out)  # entry 0 included: same person
    assert len(ldap_search(slapd_server, "(uid=d-u*)")) == 40
    slapd_server.stop()
    try:
        out = await directory.create_many([(entry(50, "d"), "Tmp-pass-123456")])
        assert out == [None]  # unknown: the caller retries it later
    finally:
        slapd_server.start()


@pytest.mark.parametrize("size", [1, 127, 128, 255, 256, 70_000])
def test_encoding_is_the_ldap_message_pyasn1_reads(size):
    value = "ă" * (size // 2) + "x" * (size % 2)
    raw = ldap_wire.encode_add(300 + size, "uid=a\\,b,ou=u,dc=x", ["inetOrgPerson", "top"],
                               {"cn": value, "mail": ["a@x", b"b@x"], "pwdReset": "TRUE"})
    msg, rest = decoder.decode(raw, asn1Spec=LDAPMessage())
    assert rest == b""
    assert int(msg["messageID"]) == 300 + size
    add = msg["protocolOp"]["addRequest"]
    assert bytes(add["entry"]) == b"uid=a\\,b,ou=u,dc=x"
    got = {str(a["type"]): [bytes(v) for v in a["vals"]] for a in add["attributes"]}
    assert got == {"objectClass": [b"inetOrgPerson", b"top"], "cn": [value.encode()],
                   "mail": [b"a@x", b"b@x"], "pwdReset": [b"TRUE"]}


async def test_server_stopped_with_adds_in_flight(directory, slapd_server):
    """The server goes away in the middle of a pipelined call: what it had not answered is
    None (unknown), retried after the restart; every person ends up once, none missing."""
    import asyncio

    items = [(entry(i, "e", full_name=f"Người {i}"), "Tmp-pass-123456") for i in range(1000)]
    call = asyncio.create_task(directory.create_many(items))
    for _ in range(3000):  # poll the server (another process) until 40 entries are there
        if len(await asyncio.to_thread(ldap_search, slapd_server, "(uid=e-u*)", ["uid"])) >= 40:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(slapd_server.stop)
    first = await call
    slapd_server.start()
    unknown = [i for i, r in enumerate(first) if r is None]
    assert unknown, "the stop came too late to test anything"
    assert all(isinstance(r, DirEntry) for r in first if r is not None)
    again = await directory.create_many([items[i] for i in unknown])
    assert all(isinstance(r, DirEntry) for r in again)
    found = ldap_search(slapd_server, "(uid=e-u*)", ["employeeNumber"])
    assert sorted(int(e["employeeNumber"][0]) for e in found) == [1000 + i for i in range(1000)]
