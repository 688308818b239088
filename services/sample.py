"""Labelled sample data for demos and the console: a few HCMC departments and eight staff.

Why labelled: demo data that looks real ends up believed. Every sample person's name ends with
" (mẫu)" and has ``is_sample=True``, phones are in the +84 900 000 0xx block and the Telegram
ids (900001…) are fictional; sample units have ``source="sample"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import ChatIdentity, Person, Province, Role, Unit, UnitKind, utcnow
from services.audit import Actor, audit
from services.folding import fold
from services.phones import normalize_phone

HCMC = "79"
BEN_THANH = "26743"
SAI_GON = "26740"
THU_DAU_MOT = "25747"
SKHCN = "79-SKHCN"
DTC = "79-TTCDS"
SAMPLE_SOURCE = "sample"
SAMPLE_SUFFIX = " (mẫu)"


class SampleDataError(RuntimeError):
    """The sample needs the national register (wards 26743, 26740, 25747 and province 79)."""


@dataclass(frozen=True)
class SampleUnit:
    code: str
    name: str
    kind: UnitKind
    parent_code: str | None = None
    domain: str | None = None


@dataclass(frozen=True)
class SamplePerson:
    full_name: str
    phone: str
    unit_code: str
    role: Role
    telegram_id: int
    position: str | None = None


SAMPLE_UNITS: list[SampleUnit] = [
    SampleUnit(SKHCN, "Sở Khoa học và Công nghệ TP.HCM", UnitKind.department),
    SampleUnit(DTC, "Trung tâm Chuyển đổi số TP.HCM", UnitKind.department, parent_code=SKHCN),
    SampleUnit("79-SNV", "Sở Nội vụ TP.HCM", UnitKind.department),
    SampleUnit("79-VPUBND", "Văn phòng Ủy ban nhân dân TP.HCM", UnitKind.province_office),
    SampleUnit("79-VPTU", "Văn phòng Thành ủy TP.HCM", UnitKind.party_office),
]

SAMPLE_PEOPLE: list[SamplePerson] = [
    SamplePerson("Nguyễn Văn An (mẫu)", "+84900000001", BEN_THANH, Role.official, 900001,
                 "Chuyên viên Văn phòng HĐND và UBND phường"),
    SamplePerson("Trần Thị Bình (mẫu)", "+84900000002", SAI_GON, Role.official, 900002,
                 "Chuyên viên Phòng Kinh tế"),
    SamplePerson("Lê Hoàng Cường (mẫu)", "+84900000003", BEN_THANH, Role.unit_admin, 900003,
                 "Chuyên viên CNTT"),
    SamplePerson("Phạm Thị Dung (mẫu)", "+84900000004", SAI_GON, Role.unit_admin, 900004,
                 "Chuyên viên CNTT"),
    SamplePerson("Hoàng Minh Đức (mẫu)", "+84900000005", DTC, Role.support, 900005,
                 "Kỹ sư hỗ trợ kỹ thuật"),
    SamplePerson("Võ Thị Hạnh (mẫu)", "+84900000006", DTC, Role.dtc_admin, 900006,
                 "Phó Giám đốc Trung tâm"),
    SamplePerson("Đặng Quốc Huy (mẫu)", "+84900000007", THU_DAU_MOT, Role.official, 900007,
                 "Chuyên viên Văn phòng HĐND và UBND phường"),
    SamplePerson("Bùi Thị Lan (mẫu)", "+84900000008", SKHCN, Role.official, 900008,
                 "Chuyên viên Phòng Bưu chính, Viễn thông và Công nghệ thông tin"),
]


async def _require_register(session: AsyncSession) -> None:
    needed = {BEN_THANH, SAI_GON, THU_DAU_MOT}
    have = set(
        (await session.execute(select(Unit.code).where(Unit.code.in_(needed)))).scalars()
    )
    if await session.get(Province, HCMC) is None or have != needed:
        raise SampleDataError(
            "The national register is not loaded (province 79 and wards 26743, 26740, 25747 are"
            " missing): run services.register.load_national_register first."
        )


async def load_sample_data(
    session: AsyncSession, actor: Actor, *, link_telegram: bool = False
) -> dict[str, Any]:
    """Upsert the sample units and people; idempotent (a second run changes nothing).

    With ``link_telegram`` the people also get verified Telegram identities with their fixed
    fictional ids, so a console can act as them without the registration flow.
    """
    await _require_register(session)
    counts = {"units_created": 0, "units_updated": 0, "people_created": 0,
              "people_updated": 0, "identities_created": 0}

    for su in SAMPLE_UNITS:
        want = {"name": su.name, "name_folded": fold(su.name), "kind": su.kind.value,
                "province_code": HCMC, "parent_code": su.parent_code, "active": True,
                "source": SAMPLE_SOURCE}
        unit = await session.get(Unit, su.code)
        if unit is None:
            session.add(Unit(code=su.code, **want))
            counts["units_created"] += 1
        elif any(getattr(unit, k) != v for k, v in want.items()):
            for k, v in want.items():
                setattr(unit, k, v)
            counts["units_updated"] += 1
        await session.flush()  # children reference parents

    now = utcnow()
    for sp in SAMPLE_PEOPLE:
        phone = normalize_phone(sp.phone)
        want = {"full_name": sp.full_name, "name_folded": fold(sp.full_name),
                "unit_code": sp.unit_code, "role": sp.role.value, "position": sp.position,
                "is_sample": True, "active": True}
        person = (
            await session.execute(select(Person).where(Person.phone == phone))
        ).scalar_one_or_none()
        if person is None:
            person = Person(phone=phone, **want)
            session.add(person)
            counts["people_created"] += 1
        elif any(getattr(person, k) != v for k, v in want.items()):
            for k, v in want.items():
                setattr(person, k, v)
            counts["people_updated"] += 1
        await session.flush()
        if link_telegram:
            ext = str(sp.telegram_id)
            ident = (
                await session.execute(
                    select(ChatIdentity).where(
                        ChatIdentity.channel == "telegram", ChatIdentity.external_id == ext
                    )
                )
            ).scalar_one_or_none()
            if ident is None:
                session.add(ChatIdentity(channel="telegram", external_id=ext,
                                         person_id=person.id, display_name=sp.full_name))
                counts["identities_created"] += 1
            elif ident.person_id != person.id:
                ident.person_id = person.id
            if person.verified_at is None:
                person.verified_at = now
    await session.flush()
    if any(counts.values()):
        await audit(session, actor, "sample.load", "sample", None, after=counts)
    return counts
