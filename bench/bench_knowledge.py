"""Knowledge-base search latency (p50/p99) over the test question set, against a baseline.

Not a test: run ``.venv/bin/python bench/bench_knowledge.py [--rounds N]``. The baseline,
measured in the same run on the same entries, is the naive approach the search replaces:
fold the query and count, for every entry, how many query words occur as substrings of the
entry's folded text. Ratios above 1 mean the real search is slower than that naive scan;
top-1 accuracy is printed for both so the cost can be weighed against what it buys.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from knowledge.search import KnowledgeBase, strip_html  # noqa: E402
from services.folding import fold  # noqa: E402


def naive_scanner(kb: KnowledgeBase) -> Callable[[str], str | None]:
    """Substring scan over folded entry text: the baseline."""
    texts = [
        (
            e.id,
            fold(
                " ".join(
                    (
                        *e.questions_vi,
                        *e.questions_en,
                        *e.tags,
                        strip_html(e.answer_vi),
                        strip_html(e.answer_en),
                    )
                )
            ),
        )
        for e in kb.entries
    ]

    def search(query: str) -> str | None:
        words = [w for w in fold(query).split() if len(w) > 1]
        best, best_score = None, 0
        for eid, text in texts:
            score = sum(1 for w in words if w in text)
            if score > best_score:
                best, best_score = eid, score
        return best

    return search


def measure(fn: Callable[[str], object], queries: list[str], rounds: int) -> list[float]:
    """Per-call latencies in milliseconds (GC paused, as a server warm loop would see)."""
    for q in queries:
        fn(q)
    out: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for q in queries:
                t = time.perf_counter_ns()
                fn(q)
                out.append((time.perf_counter_ns() - t) / 1e6)
    finally:
        gc.enable()
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    t = time.perf_counter()
    kb = KnowledgeBase.load()
    build_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    kb.reload()
    reload_ms = (time.perf_counter() - t) * 1000

    data = tomllib.loads((ROOT / "tests" / "data" / "questions.toml").read_text("utf-8"))
    items = data["questions"] + data["holdout"]
    queries = [i["q"] for i in items] + data["out_of_domain"]

    def ours(q: str) -> str | None:
        hits = kb.search(q, limit=3)
        return hits[0].entry.id if hits else None

    naive = naive_scanner(kb)
    lat = measure(ours, queries, args.rounds)
    base = measure(naive, queries, args.rounds)

    def accuracy(fn: Callable[[str], str | None]) -> float:
        return sum(fn(i["q"]) == i["id"] for i in items) / len(items)

    print(f"entries: {len(kb)}  queries: {len(queries)} x {args.rounds} rounds")
    print(f"index build: load {build_ms:.1f} ms, reload {reload_ms:.1f} ms")
    print(f"{'':10} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'mean ms':>9} {'top-1':>7}")
    for name, values, fn in (("search", lat, ours), ("baseline", base, naive)):
        print(
            f"{name:10} {pct(values, 50):9.4f} {pct(values, 99):9.4f} {max(values):9.4f} "
            f"{statistics.fmean(values):9.4f} {accuracy(fn):7.3f}"
        )
    print(
        f"ratio search/baseline: p50 {pct(lat, 50) / pct(base, 50):.2f}x, "
        f"p99 {pct(lat, 99) / pct(base, 99):.2f}x"
    )
    ok = pct(lat, 99) < 5.0
    print(f"target p99 < 5 ms: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
