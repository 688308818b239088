"""The LDAP directory against a real slapd: layout, UTF-8 names, escaping, groups, ppolicy."""

from __future__ import annotations

import ldap3
import pytest

from services.addresses import AddressError, local_part, numbered
from services.directory import DirectoryError, NewEntry
from tests.ldap_server import ldap_search

NASTY = ["*)(uid=*", "Trần, Văn + Bình", "Lê \\ Thị #Hoa", "#Nguyễn An", "  Phạm  Minh",
         "Đỗ (Văn)* Ánh", "Võ=Thị;Lan"]


def test_address_convention():
    assert local_part("Nguyễn Văn An") == "annv"
    assert local_part("Đặng Thị Ngọc Ánh") == "anhdtn"
    assert local_part("Lê Đức") == "ducl"
    assert local_part("An") == "an"
    assert local_part("  Phạm  Minh ") == "minhp"
    assert local_part("Nguyễn Văn An", "{family}.{given}") == "nguyenan"
    assert local_part("*)(uid=*") == "uid"
    with pytest.raises(AddressError):
        local_part("*)(=*")
    assert numbered("annv", set()) == "annv"
    assert numbered("annv", {"annv"}) == "annv1"
    assert numbered("annv", {"annv", "annv1", "annv3"}) == "annv2"


async def test_person_in_unit_ou_with_utf8_name_and_forced_change(directory, slapd_server):
    await directory.ensure_unit("26743", "Phường Bến Thành")
    e = await directory.create(NewEntry(uid="annv", mail="annv@benthanh.gov.vn",
                                        full_name="Nguyễn Văn An", unit_code="26743",
                                        employee="7"), "Tmp-pass-123456")
    assert e.dn == "uid=annv,ou=26743,ou=units,dc=hopnhat,dc=test"
    assert e.must_change and not e.disabled
    [found] = ldap_search(slapd_server, "(uid=annv)", ["cn", "sn", "givenName", "mail",
                                                     "userPassword"])
    assert found["cn"] == ["Nguyễn Văn An"] and found["sn"] == ["Nguyễn"]
    assert found["givenName"] == ["An"] and found["mail"] == ["annv@benthanh.gov.vn"]
    assert found["userPassword"][0].lower().startswith(b"{ssha}")  # never in clear
    [ou] = ldap_search(slapd_server, "(ou=26743)", ["description"])
    assert ou["description"] == ["Phường Bến Thành"]
    # ppolicy pwdReset: the owner can bind but may only change the password
    user = ldap3.Connection(ldap3.Server(slapd_server.url.rstrip("/")), e.dn, "Tmp-pass-123456")
    assert user.bind()
    assert not user.search("dc=hopnhat,dc=test", "(uid=annv)")
    assert user.result["result"] == 50
    user.unbind()
    # creating the same person again is a no-op, someone else under that uid is refused
    again = await directory.create(NewEntry(uid="annv", mail="annv@benthanh.gov.vn",
                                            full_name="Nguyễn Văn An", unit_code="26743",
                                            employee="7"), "Other-pass-123456")
    assert again.dn == e.dn
    with pytest.raises(DirectoryError):
        await directory.create(NewEntry(uid="annv", mail="annv@x.gov.vn", full_name="Ngô Văn An",
                                        unit_code="26743", employee="8"), "x-Pass-123456789")
    assert len(ldap_search(slapd_server, "(uid=annv)")) == 1


async def test_metacharacters_stored_literally_and_never_widen(directory, slapd_server):
    unit = "#u,1+2\\ x"  # DN metacharacters in a unit code, leading '#'
    await directory.ensure_unit(unit, " Đơn vị, thử + nghiệm")
    for i, name in enumerate(NASTY):
        await directory.create(NewEntry(uid=f"p{i}", mail=f"p{i}@x.gov.vn", full_name=name,
                                        unit_code=unit, employee=f"10{i}"), "Tmp-pass-123456")
    everyone = ldap_search(slapd_server, "(objectClass=inetOrgPerson)", ["cn"])
    assert sorted(e["cn"][0] for e in everyone) == sorted(NASTY)
    for i, name in enumerate(NASTY):
        hits = await directory.search_name(name)
        assert [h.uid for h in hits] == [f"p{i}"], name
        assert hits[0].cn == name and hits[0].unit_code == unit
    # a literal '*' finds only the names containing one, not everybody
    assert sorted(h.uid for h in await directory.search_name("*")) == ["p0", "p5"]
    assert await directory.search_name("*)(cn=") == []
    assert await directory.get("*") is None
    assert await directory.get("p0)(uid=*") is None
    assert await directory.by_employee("*") == []
    assert await directory.taken_uids("*") == set()
    assert await directory.taken_uids("p") == {f"p{i}" for i in range(len(NASTY))}


async def test_groups_and_deactivation_keep_the_entry(directory, slapd_server):
    await directory.ensure_group("qlvb-van_thu", "QLVB: văn thư")
    await directory.ensure_group("tthc-mot_cua", "TTHC: một cửa")
    await directory.create(NewEntry(uid="binhtv", mail="binhtv@x.gov.vn", full_name="Trần Văn Bình",
                                    unit_code="26743", employee="9"), "Tmp-pass-123456")
    assert await directory.add_to_group("binhtv", "qlvb-van_thu") is True
    assert await directory.add_to_group("binhtv", "qlvb-van_thu") is False  # idempotent
    assert await directory.add_to_group("binhtv", "tthc-mot_cua") is True
    assert sorted((await directory.get("binhtv")).groups) == ["qlvb-van_thu", "tthc-mot_cua"]
    left = await directory.disable("binhtv")
    assert sorted(left) == ["qlvb-van_thu", "tthc-mot_cua"]
    e = await directory.get("binhtv")
    assert e is not None and e.disabled and e.groups == []
    assert await directory.disable("binhtv") == []  # twice changes nothing
    [g] = ldap_search(slapd_server, "(cn=qlvb-van_thu)", ["member"])
    assert g["member"] == ["cn=admin,dc=hopnhat,dc=test"]
    user = ldap3.Connection(ldap3.Server(slapd_server.url.rstrip("/")), e.dn, "Tmp-pass-123456")
    assert not user.bind()  # locked


async def test_server_restart_is_transparent_and_outage_is_reported(directory, slapd_server):
    from services.directory import DirectoryUnavailable

    await directory.ensure_unit("u9", "Đơn vị chín")
    slapd_server.stop()
    slapd_server.start()  # the open connection is dead now: replaced, the call succeeds
    assert await directory.get("nobody") is None
    slapd_server.stop()
    try:
        with pytest.raises(DirectoryUnavailable):
            await directory.get("nobody")
        with pytest.raises(DirectoryUnavailable):
            await directory.taken_uids("an")
    finally:
        slapd_server.start()
    assert await directory.taken_uids("an") == set()
