"""Unit search latency (p50/p99) on the full register, against the SQL LIKE search it replaced.

Not a test: run ``.venv/bin/python bench/bench_unit_search.py [--rounds N] [--pg | --url URL]``.
Builds a temporary SQLite database (``--pg``: a temporary PostgreSQL one; ``--url``: yours)
with the national register (3,321 units + ~10,700 defunct pre-2025 ones), then times ~200
queries the way officials type them: with and without diacritics, with one typo, kind words
abbreviated, old (pre-2025) names with their district. Both searches run through an
``AsyncSession`` on the same database in the same run, with ``include_defunct=True`` like the
registration handler. The baseline is the previous ``search_units``: folded-name LIKE
queries (word prefix, then substring), a COUNT and a page query per search.

Also printed: index build time, and top-1 accuracy for both approaches: the first result is
the expected unit (for an old name: the old unit or the unit it became) or one with exactly
the same name (namesakes in other provinces cannot be told apart by the query).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import ColumnElement, and_, case, func, or_, select, true  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession  # noqa: E402
from sqlalchemy.orm import aliased  # noqa: E402

from db.migrate import upgrade_async  # noqa: E402
from db.models import Province, Unit  # noqa: E402
from db.session import make_engine, make_sessionmaker  # noqa: E402
from services.audit import Actor  # noqa: E402
from services.folding import fold  # noqa: E402
from services.register import load_national_register  # noqa: E402
from services.unit_index import build_index, invalidate  # noqa: E402
from services.units import search_units  # noqa: E402

# --------------------------------------------------------------------------- baseline
# The search this replaces (services/units.py before the in-memory index), kept verbatim in
# behaviour: LIKE on units.name_folded, word-prefix first, then substring.

Result = tuple[str, str | None, str]  # code, merged_into, name

_KIND_WORDS = {("phuong",), ("p",), ("xa",), ("x",), ("dac", "khu"), ("dk",)}
_KIND_PREFIXES = ("phuong", "xa", "dac khu")


def _query_tokens(query: str) -> tuple[str, list[str]]:
    folded = fold(query[:200])
    tokens = folded.split()[:10]
    changed = True
    while changed and tokens:
        changed = False
        for kw in _KIND_WORDS:
            n = len(kw)
            if tuple(tokens[:n]) == kw and len(tokens) > n:
                tokens = tokens[n:]
                changed = True
                break
    return folded, tokens[:8]


def _like_escape(token: str) -> str:
    return token.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _token_filter(tokens: list[str], *, word_prefix: bool) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    for tok in tokens:
        t = _like_escape(tok)
        if word_prefix:
            conds.append(or_(Unit.name_folded.like(f"{t}%", escape="\\"),
                             Unit.name_folded.like(f"% {t}%", escape="\\")))
        else:
            conds.append(Unit.name_folded.like(f"%{t}%", escape="\\"))
    return and_(true(), *conds)


async def like_search(session: AsyncSession, query: str, limit: int = 8) -> list[Result]:
    """(code, merged_into, name) of the first ``limit`` results of the previous search."""
    folded, tokens = _query_tokens(query or "")
    core = " ".join(tokens)
    code_text = (query or "").strip()[:32]
    if not tokens:
        return []
    exact_names = {folded, core, *(f"{p} {core}" for p in _KIND_PREFIXES)} - {""}
    rank = case((Unit.name_folded.in_(sorted(exact_names)), 0), (Unit.code == code_text, 0),
                else_=1)
    match: ColumnElement[bool] = true()
    for word_prefix in (True, False):
        match = or_(_token_filter(tokens, word_prefix=word_prefix), Unit.code == code_text)
        total = (await session.execute(select(func.count()).select_from(Unit).where(match)))
        if total.scalar_one():
            break
    target = aliased(Unit)
    stmt = (
        select(Unit.code, Unit.merged_into, Unit.name, Province.name, target.name)
        .outerjoin(Province, Province.code == Unit.province_code)
        .outerjoin(target, target.code == Unit.merged_into)
        .where(match)
        .order_by(rank, Unit.active.desc(), func.length(Unit.name_folded), Unit.name_folded,
                  Unit.code)
        .limit(limit)
    )
    return [(r[0], r[1], r[2]) for r in (await session.execute(stmt)).all()]


async def index_search(session: AsyncSession, query: str, limit: int = 8) -> list[Result]:
    found = await search_units(session, query, include_defunct=True, limit=limit)
    return [(i.code, i.merged_into, i.name) for i in found.items]


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    text: str
    expect: frozenset[str]  # a first result with one of these codes (or merged into one) is right
    group: str
    name: str = ""  # … or with this name: the query cannot tell namesakes apart


def _typo(word: str, rng: random.Random) -> str:
    """One phone typo in a word of 4+ letters: swap, drop or double-tap a neighbour."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "dup"))
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


async def make_queries(session: AsyncSession, n_each: int, seed: int) -> list[Query]:
    rng = random.Random(seed)
    rows = (await session.execute(
        select(Unit.code, Unit.name, Unit.kind, Unit.merged_into, Unit.active)
        .order_by(Unit.code))).all()
    new = [r for r in rows if r.active and r.kind in ("ward", "commune", "special_zone")]
    old = [r for r in rows if r.kind == "old_ward" and r.merged_into]
    out: list[Query] = []
    for r in rng.sample(new, n_each):
        out.append(Query(r.name, frozenset({r.code}), "exact, diacritics", r.name))
    for r in rng.sample(new, n_each):
        name = fold(r.name).split(" ", 1)[-1] if rng.random() < 0.5 else fold(r.name)
        out.append(Query(name, frozenset({r.code}), "no diacritics", r.name))
    typo_pool = [r for r in new if any(len(w) >= 4 for w in fold(r.name).split()[1:])]
    for r in rng.sample(typo_pool, n_each):
        ws = fold(r.name).split()[1:]
        j = rng.choice([k for k, w in enumerate(ws) if len(w) >= 4])
        ws[j] = _typo(ws[j], rng)
        out.append(Query(" ".join(ws), frozenset({r.code}), "one typo", r.name))
    for r in rng.sample(old, n_each):
        ward, district = r.name.split(", ")[:2]
        text = f"{ward}, {district}" if rng.random() < 0.5 else fold(f"{ward} {district}")
        out.append(Query(text, frozenset({r.code, r.merged_into}), "old name + district",
                         r.name))
    fixed = [
        ("p. ben thanh", "26743"), ("P.Bến Thành", "26743"), ("ben thnah", "26743"),
        ("bn thanh", "26743"), ("ben thanh hcm", "26743"), ("x. tan phu dong nai", "26116"),
        ("phường Bến Nghé, quận 1", "26740"), ("q1", "old-d-760"), ("dak mil", "24670"),
        ("tp thu dau mot", "old-d-718"), ("26743", "26743"), ("tan", ""), ("xa", ""),
    ]
    out += [Query(t, frozenset({c}) if c else frozenset(), "fixed examples") for t, c in fixed]
    return out


# --------------------------------------------------------------------------- measuring

Search = Callable[[AsyncSession, str], Awaitable[list[Result]]]


async def measure(session: AsyncSession, fn: Search, queries: list[Query], rounds: int
                  ) -> tuple[list[float], float]:
    """Per-query latencies (ms, GC paused) and top-1 accuracy of the first round."""
    hits = 0
    scored = 0
    for q in queries:  # warm-up round, also scores accuracy
        first = (await fn(session, q.text))[:1]
        if q.expect:
            scored += 1
            hits += bool(first and (first[0][0] in q.expect or first[0][1] in q.expect
                                    or first[0][2] == q.name))
    out: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for q in queries:
                t = time.perf_counter_ns()
                await fn(session, q.text)
                out.append((time.perf_counter_ns() - t) / 1e6)
    finally:
        gc.enable()
    return out, hits / max(1, scored)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def run(url: str, rounds: int, n_each: int, seed: int) -> None:
    await upgrade_async(url)
    engine = make_engine(url)
    maker = make_sessionmaker(engine)
    try:
        async with maker() as s:
            t = time.perf_counter()
            if (await s.scalar(select(func.count()).select_from(Unit)) or 0) < 3321:
                await load_national_register(s, Actor.system("bench"))
                await s.commit()
            load_s = time.perf_counter() - t
        async with maker() as s:
            queries = await make_queries(s, n_each, seed)
            invalidate()
            t = time.perf_counter()
            index = await build_index(s)
            build_ms = (time.perf_counter() - t) * 1000
            ours, ours_acc = await measure(s, index_search, queries, rounds)
            base, base_acc = await measure(s, like_search, queries, rounds)
            groups: dict[str, list[float]] = {}
            per_query = len(queries)
            for i, v in enumerate(ours):
                groups.setdefault(queries[i % per_query].group, []).append(v)
    finally:
        await engine.dispose()

    print(f"database: {url.split('://')[0]}  units: {len(index.docs)}  "
          f"(register load {load_s:.1f} s)")
    print(f"queries: {len(queries)} x {rounds} rounds  index build: {build_ms:.0f} ms")
    print(f"{'':10} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'mean ms':>9} {'top-1':>7}")
    for name, values, acc in (("index", ours, ours_acc), ("LIKE", base, base_acc)):
        print(f"{name:10} {pct(values, 50):9.3f} {pct(values, 99):9.3f} {max(values):9.3f} "
              f"{statistics.fmean(values):9.3f} {acc:7.3f}")
    print(f"ratio index/LIKE: p50 {pct(ours, 50) / pct(base, 50):.3f}x, "
          f"p99 {pct(ours, 99) / pct(base, 99):.3f}x")
    print("index by query group:")
    for group, values in groups.items():
        print(f"  {group:22} p50 {pct(values, 50):7.3f} ms  p99 {pct(values, 99):7.3f} ms")
    ok = pct(ours, 99) < 5.0
    print(f"target p99 < 5 ms: {'met' if ok else 'NOT met'}")


async def run_pg(rounds: int, n_each: int, seed: int) -> None:
    from common import drop_pg_database, new_pg_database

    url, name = await new_pg_database()
    try:
        await run(url, rounds, n_each, seed)
    finally:
        await drop_pg_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-group", type=int, default=47,
                        help="generated queries per group (4 groups + 13 fixed)")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--pg", action="store_true",
                        help="a temporary PostgreSQL database (HOPNHAT_TEST_PG_DSN server)")
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.rounds, args.per_group, args.seed))
        return
    if args.pg:
        asyncio.run(run_pg(args.rounds, args.per_group, args.seed))
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        asyncio.run(run(url, args.rounds, args.per_group, args.seed))


if __name__ == "__main__":
    main()
