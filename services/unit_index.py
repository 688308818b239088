"""In-memory index of administrative units for search as officials type it on phones.

Why in memory: officials type "ben thnah", "p.ben thanh hcm" or "bến nghé q1" on phones, and
the bot answers every keystroke of inline mode. Typo tolerance, kind words, province hints and
old (pre-2025) names are awkward and slow in SQL LIKE, and would differ between SQLite and
PostgreSQL; the whole register (3,321 units + ~10,700 defunct ones) is a few MB in Python, is
indexed in about half a second, and a query then takes a fraction of a millisecond (p99 ~3 ms,
``bench/bench_unit_search.py``). The index is built once per process and database from the
``units`` table and rebuilt when units change (see ``get_index``).

How a unit is seen (``Doc``): its own name split into a kind phrase ("phuong", "xa", "dac khu",
"thanh pho", ...) and core tokens ("ben", "thanh"); and context phrases that may narrow a
query but never count as the name: its province ("ho chi minh", "hcm", "dong nai"), and for
old units their old district ("quan 1", "thu dau mot") and old province ("binh duong").
Keeping context apart is what stops "ben thanh" from matching "Xã Thành Triệu, Huyện Châu
Thành, Tỉnh Bến Tre".

How a query is read: folded (accents, đ→d, punctuation), abbreviations expanded ("p." →
phuong, "tp" → thanh pho, "q1" → quan 1), then every way of reading some runs of words as
context phrases is tried ("tan phu dong nai" = name "tan phu" in province "dong nai").
Kind words left over are optional (they rank, they do not filter). Each remaining word must
match a word of the unit's core: exactly, as a prefix (typing is incremental) or, only when
nothing matches that way, with a typo (SymSpell-style deletion neighbourhoods: edit distance
1 for words of 4+ letters, 2 for 8+, a dropped letter for 2-3 letters).
"""

from __future__ import annotations

import bisect
import gc
import heapq
import logging
import math
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, NamedTuple

from sqlalchemy import event, func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import UpdateBase

from db.models import Province, Unit
from services.folding import fold

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 200  # a unit name with its district and province is shorter
MEMO_SIZE = 4096  # remembered answers per index (a few MB at most)
MAX_TOKENS = 12
MAX_SPAN_TOKENS = 7  # longest context phrase ("thanh pho ho chi minh" is 5)
MAX_INTERPRETATIONS = 24
VERSION_CHECK_SECONDS = 30.0  # how stale another process's unit changes may be
RECHECK_WINDOW_SECONDS = 2.0  # after a local write, re-read the version on every search

# Abbreviations officials type; applied to queries and to indexed names alike.
ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "p": ("phuong",),
    "x": ("xa",),
    "q": ("quan",),
    "h": ("huyen",),
    "tp": ("thanh", "pho"),
    "tx": ("thi", "xa"),
    "tt": ("thi", "tran"),
    "dk": ("dac", "khu"),
    "tphcm": ("thanh", "pho", "hcm"),
    "hcmc": ("hcm",),
    "tphn": ("thanh", "pho", "hn"),
}
_NUMBERED = re.compile(r"^([pqx])(\d{1,3})$")  # "p1", "q10": Phường 1, Quận 10
KIND_WORDS = frozenset({"phuong", "xa", "quan", "huyen", "tinh"})
KIND_PAIRS = frozenset({"dac khu", "thi tran", "thi xa", "thanh pho"})
# Informal province names that are not derivable from the official ones.
PROVINCE_ALIASES: dict[str, tuple[str, ...]] = {
    "79": ("hcm", "thanh pho hcm"),
    "01": ("hn", "thanh pho hn"),
}

# Ranking key, compared as a tuple (smaller is better), in effect:
# (class, typos, source, uncovered, prefixes, order, kind_mismatch, -accents_matched,
#  -similarity, len(name), folded name, code); see _full_key.
CLASS_CODE = -1  # the query is the unit's code
CLASS_EXACT = 0  # the query names the unit exactly (kind word, if typed, agrees)
CLASS_EXACT_OTHER_KIND = 1  # exact name, but the query said "xa" and it is a phuong
CLASS_AREA = 1  # the query is exactly a province/district name: units in that area
CLASS_PARTIAL = 2  # every query word matches a word of the name
SOURCE_DIRECT = 0
SOURCE_VIA_OLD = 1  # an active unit found through the old name of a unit merged into it
SOURCE_DEFUNCT = 2

Key = tuple[Any, ...]


def words(folded: str, limit: int = MAX_TOKENS) -> list[str]:
    """Folded text → words with abbreviations expanded ("p ben thanh q1" → phuong … quan 1)."""
    out: list[str] = []
    for tok in folded.split():
        if len(out) >= limit:
            break
        expanded = ABBREVIATIONS.get(tok)
        if expanded:
            out.extend(expanded)
            continue
        m = _NUMBERED.match(tok)
        if m:
            out.extend((*ABBREVIATIONS[m.group(1)], m.group(2)))
        else:
            out.append(tok)
    return out[:limit]


def split_kind(tokens: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """Leading kind phrase and the rest: [phuong, ben, thanh] → ("phuong", (ben, thanh))."""
    if len(tokens) > 2 and " ".join(tokens[:2]) in KIND_PAIRS:
        return " ".join(tokens[:2]), tuple(tokens[2:])
    if len(tokens) > 1 and tokens[0] in KIND_WORDS:
        return tokens[0], tuple(tokens[1:])
    return None, tuple(tokens)


def split_query_kinds(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """Kind phrases anywhere in a query, and the content words: "xa tan phu" → [xa], [tan, phu]."""
    kinds: list[str] = []
    content: list[str] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i : i + 2])
        if pair in KIND_PAIRS:
            kinds.append(pair)
            i += 2
        elif tokens[i] in KIND_WORDS:
            kinds.append(tokens[i])
            i += 1
        else:
            content.append(tokens[i])
            i += 1
    return kinds, content


def place_phrases(name: str, *, province: bool = False) -> set[str]:
    """Ways to say a place: "Thành phố Thủ Dầu Một" → thanh pho thu dau mot, thu dau mot, …

    A bare number ("1" of "Quận 1") is not a phrase on its own: it would match everywhere.
    Provinces also answer to "tinh <name>" (the register drops "Tỉnh") and to their aliases.
    """
    toks = words(fold(name), limit=MAX_SPAN_TOKENS + 2)
    if not toks:
        return set()
    kind, core = split_kind(toks)
    out = {" ".join(toks)}
    if core and not all(t.isdigit() for t in core):
        out.add(" ".join(core))
        if len(core) > 1:
            out.add("".join(core))  # "dongnai", "thudaumot"
        if province or kind == "tinh":
            out.add("tinh " + " ".join(core))
    return {p for p in out if len(p.split()) <= MAX_SPAN_TOKENS}


# Old-style tone placement ("hoà", "thuỷ") → new style ("hòa", "thủy"), at a word's end only
# ("hoàng" is right either way). The register mixes both ("Xã Bình Hoà", "Xã Bình Hòa").
_TONE_MOVES = {
    old: new
    for pair in ("oa", "oe", "uy")
    for tone in ("\u0300", "\u0301", "\u0309", "\u0303", "\u0323")
    for old, new in [(
        unicodedata.normalize("NFC", pair[0] + pair[1] + tone),
        unicodedata.normalize("NFC", pair[0] + tone + pair[1]),
    )]
}
_WORD_SPLIT = re.compile(r"[^\w]+", re.UNICODE)


def accent_words(text: str) -> frozenset[str]:
    """Lowercase words keeping diacritics, tone placement normalized: "Bình Hoà" → bình, hòa."""
    out: set[str] = set()
    for w in _WORD_SPLIT.split(unicodedata.normalize("NFC", text).lower()):
        if w:
            tail = _TONE_MOVES.get(w[-2:])
            out.add(w[:-2] + tail if tail else w)
    return frozenset(out)


def osa_distance(a: str, b: str, cap: int) -> int:
    """Optimal string alignment distance (transpositions cost 1); cap+1 when above cap."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        row_min = cur[0]
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v
            row_min = min(row_min, v)
        if row_min > cap:
            return cap + 1
        prev2, prev = prev, cur
    return prev[-1] if prev[-1] <= cap else cap + 1


def _deletes(word: str, depth: int) -> set[str]:
    out: set[str] = set()
    frontier = {word}
    for _ in range(depth):
        nxt = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        out |= nxt
        frontier = nxt
    return out


def _similarity(a: str, b: str) -> float:
    """Tie-break between typo matches at the same distance ("tanh": thanh before tan)."""
    return SequenceMatcher(None, a, b).ratio() + (0.05 if a[:1] == b[:1] else 0.0)


@dataclass(eq=False, slots=True)
class Doc:
    """One unit as the index sees it (display fields plus the folded parts matched)."""

    idx: int
    code: str
    name: str
    name_folded: str
    kind: str
    province_code: str | None
    province_name: str | None
    active: bool
    merged_into: str | None
    kind_phrase: str | None
    core: tuple[str, ...]
    core_set: frozenset[str]
    context_words: frozenset[str] = frozenset()  # words of its province/old district names
    accent_set: frozenset[str] = frozenset()  # own-name words with diacritics (tie-breaks)
    merged_into_name: str | None = None
    successor: Doc | None = None  # the active unit it became (following merges)
    tail: int = 0  # rank among all units by (name length, folded name, code): last keys


class Hit(NamedTuple):
    """A unit found, as pages return it (``Matches`` keeps plain tuples, cheaper to make)."""

    key: Key
    doc: Doc
    via: Doc | None  # the defunct unit whose old name matched, for successors


@dataclass(frozen=True)
class Matches:
    """All hits of a query, unsorted; ``page`` sorts only what it returns."""

    hits: list[tuple[Key, Doc, Doc | None]]  # as Hit
    fuzzy: bool  # typo tolerance was needed

    @property
    def total(self) -> int:
        return len(self.hits)

    def page(self, offset: int, limit: int) -> list[Hit]:
        n = offset + limit
        with _gc_paused():
            if n >= len(self.hits):
                ranked = sorted(self.hits, key=_hit_key)
            else:
                ranked = heapq.nsmallest(n, self.hits, key=_hit_key)
        return [Hit(*h) for h in ranked[offset:n]]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC during one (synchronous, milliseconds-long) search.

    A query listing 10,000 units ("xa") makes 10,000 short-lived tuples; they live long enough
    to be promoted, which triggers full collections walking the whole index (measured: 30 ms
    instead of 6). Everything made here dies by reference counting anyway.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _hit_key(hit: tuple[Key, Doc, Doc | None]) -> Key:
    return hit[0]


@dataclass(frozen=True, slots=True)
class UnitRow:
    """What the index needs of one ``units`` row."""

    code: str
    name: str
    kind: str
    province_code: str | None
    active: bool
    merged_into: str | None


@dataclass(slots=True)
class _Interp:
    hints: tuple[str, ...]
    rest: list[str]  # the words not read as context, in query order
    kinds: list[str]
    content: list[str]


Alts = dict[str, tuple[int, int, float]]  # vocabulary word → (typos, is_prefix, -similarity)


@dataclass
class UnitIndex:
    """The searchable register. Immutable once built; build a new one when units change."""

    docs: list[Doc] = field(default_factory=list)
    by_code: dict[str, Doc] = field(default_factory=dict)
    postings: dict[str, list[int]] = field(default_factory=dict)  # core word → doc ids
    vocab: list[str] = field(default_factory=list)  # sorted, for prefix lookups
    deletes: dict[str, set[str]] = field(default_factory=dict)  # deletion variant → words
    phrase_docs: dict[str, set[int]] = field(default_factory=dict)  # context phrase → docs
    kind_docs: dict[str, set[int]] = field(default_factory=dict)
    province_docs: dict[str, set[int]] = field(default_factory=dict)
    active_ids: set[int] = field(default_factory=set)
    max_word: int = 0
    # Recent answers: the same communes are looked up again and again (a unit's staff, a
    # ward's name in every province's chat). The index never changes once built (a change
    # to the units builds a new one), so an answer stays right for the index's life.
    memo: dict[tuple[str, str | None, bool], Matches] = field(default_factory=dict,
                                                               repr=False)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        rows: Iterable[UnitRow],
        provinces: Mapping[str, str],
        old_provinces: Mapping[str, str] | None = None,
    ) -> UnitIndex:
        """Index units; ``provinces`` maps code → name, ``old_provinces`` old unit → old province.

        Old units (``old_ward``/``old_district``) carry their old district and province after
        commas in their name ("Phường Bến Nghé, Quận 1"); those parts become context phrases.
        """
        self = cls()
        old_provinces = old_provinces or {}
        province_phrases = {
            code: place_phrases(name, province=True) | set(PROVINCE_ALIASES.get(code, ()))
            for code, name in provinces.items()
        }
        phrase_cache: dict[str, set[str]] = {}

        def phrases_of(text: str, province: bool = False) -> set[str]:
            got = phrase_cache.get(text)
            if got is None:
                got = phrase_cache[text] = place_phrases(text, province=province)
            return got

        postings: dict[str, list[int]] = {}
        context_words: dict[frozenset[str], frozenset[str]] = {}
        for row in rows:
            idx = len(self.docs)
            is_old = row.kind in ("old_ward", "old_district")
            parts = [p.strip() for p in row.name.split(",")] if is_old else [row.name]
            kind_phrase, core = split_kind(words(fold(parts[0]), limit=32))
            doc = Doc(
                idx=idx,
                code=row.code,
                name=row.name,
                name_folded=fold(row.name),
                kind=row.kind,
                province_code=row.province_code,
                province_name=provinces.get(row.province_code or ""),
                active=row.active,
                merged_into=row.merged_into,
                kind_phrase=kind_phrase,
                core=core,
                core_set=frozenset(core),
            )
            self.docs.append(doc)
            self.by_code[row.code] = doc
            if row.active:
                self.active_ids.add(idx)
            for tok in doc.core_set:
                postings.setdefault(tok, []).append(idx)
            if kind_phrase:
                self.kind_docs.setdefault(kind_phrase, set()).add(idx)
            context = set(province_phrases.get(row.province_code or "", ()))
            for part in parts[1:]:  # old district, then old province if it differs
                context |= phrases_of(part)
            old_province = old_provinces.get(row.code)
            if old_province:
                context |= phrases_of(old_province, province=True)
            for phrase in context:
                self.phrase_docs.setdefault(phrase, set()).add(idx)
            ckey = frozenset(context)
            cwords = context_words.get(ckey)
            if cwords is None:
                cwords = context_words[ckey] = frozenset(w for p in context for w in p.split())
            doc.context_words = cwords
            doc.accent_set = accent_words(parts[0])
            if row.province_code:
                self.province_docs.setdefault(row.province_code, set()).add(idx)

        self.postings = postings
        self.vocab = sorted(postings)
        self.max_word = max((len(w) for w in self.vocab), default=0)
        for w in self.vocab:
            if len(w) < 3:
                continue  # typos against 1-2 letter words are noise
            for variant in {w} | _deletes(w, 2 if len(w) >= 5 else 1):
                self.deletes.setdefault(variant, set()).add(w)
        by_name = sorted(self.docs, key=lambda x: (len(x.name), x.name_folded, x.code))
        for rank, doc in enumerate(by_name):
            doc.tail = rank
        for doc in self.docs:
            target = self.by_code.get(doc.merged_into or "")
            doc.merged_into_name = target.name if target else None
            hops = 0
            while target is not None and not target.active and hops < 5:
                target = self.by_code.get(target.merged_into or "")
                hops += 1
            doc.successor = target if target is not None and target.active else None
        return self

    # ------------------------------------------------------------------ words

    def _prefixed(self, q: str) -> Iterable[str]:
        i = bisect.bisect_left(self.vocab, q)
        while i < len(self.vocab) and self.vocab[i].startswith(q):
            yield self.vocab[i]
            i += 1

    def neighbours(self, q: str, *, loose: bool = False) -> list[tuple[str, int]]:
        """Vocabulary words within typo distance of ``q`` (not ``q`` itself).

        Search: 1 edit for 4+ letters, 2 for 8+; a 2-3 letter word may only have lost a
        letter ("bn" → ben) or swapped two ("bne" → ben). ``loose`` (suggestions): 1 edit
        of any kind from 2 letters, 2 edits from 5.
        """
        n = len(q)
        if n < 2 or n > self.max_word + 2:
            return []
        depth = (2 if n >= 5 else 1) if loose else (2 if n >= 8 else 1)
        variants = {q} | _deletes(q, depth if (loose or n >= 3) else 0)
        found: set[str] = set()
        for v in variants:
            found |= self.deletes.get(v, set())
        out: list[tuple[str, int]] = []
        for t in found:
            if t == q:
                continue
            d = osa_distance(q, t, depth)
            if d > depth:
                continue
            if not loose and n < 4:
                inserted = len(t) == n + 1
                swapped = len(t) == n == 3 and sorted(t) == sorted(q)
                if not (inserted or swapped):
                    continue
            out.append((t, d))
        return out

    def _alternatives(self, q: str, *, fuzzy: bool, prefix: bool, cache: dict[Any, Alts]) -> Alts:
        ck = (q, fuzzy, prefix)
        got = cache.get(ck)
        if got is not None:
            return got
        alts: Alts = {}
        if q in self.postings:
            alts[q] = (0, 0, -1.0)
        if prefix:
            for t in self._prefixed(q):
                if t != q:
                    alts[t] = (0, 1, -len(q) / len(t))
        if fuzzy:
            for t, d in self.neighbours(q):
                if t not in alts:
                    alts[t] = (d, 0, -_similarity(q, t))
        cache[ck] = alts
        return alts

    def _split_glued(self, q: str) -> list[str] | None:
        """"benthanh" → [ben, thanh]: two known words typed without a space."""
        if q in self.postings or not 4 <= len(q) <= 2 * self.max_word:
            return None
        best: tuple[int, list[str]] | None = None
        for i in range(2, len(q) - 1):
            a, b = q[:i], q[i:]
            if a in self.postings and b in self.postings:
                weight = len(self.postings[a]) + len(self.postings[b])
                if best is None or weight > best[0]:
                    best = (weight, [a, b])
        return best[1] if best else None

    # ------------------------------------------------------------------ queries

    def _interpretations(self, tokens: list[str]) -> list[_Interp]:
        """Every reading of runs of words as context phrases (none, one, or two of them)."""
        spans: list[tuple[int, int, str]] = []
        for i in range(len(tokens)):
            for j in range(i + 1, min(len(tokens), i + MAX_SPAN_TOKENS) + 1):
                phrase = " ".join(tokens[i:j])
                if phrase in self.phrase_docs:
                    spans.append((i, j, phrase))
        spans.sort(key=lambda s: s[0] - s[1])  # longest first
        spans = spans[:12]
        choices: list[tuple[tuple[int, int, str], ...]] = [()]
        choices += [(s,) for s in spans]
        for a_i, a in enumerate(spans):
            for b in spans[a_i + 1 :]:
                if a[1] <= b[0] or b[1] <= a[0]:
                    choices.append((a, b))
        out: list[_Interp] = []
        for choice in choices[:MAX_INTERPRETATIONS]:
            used = {k for s in choice for k in range(s[0], s[1])}
            rest = [t for k, t in enumerate(tokens) if k not in used]
            kinds, content = split_query_kinds(rest)
            out.append(_Interp(tuple(s[2] for s in choice), rest, kinds, content))
        return out

    def _evaluate(
        self,
        interp: _Interp,
        *,
        fuzzy: bool,
        province_code: str | None,
        include_defunct: bool,
        accents: frozenset[str],
        cache: dict[Any, Alts],
        out: dict[int, Key],
    ) -> None:
        """Add the docs this reading of the query matches to ``out`` (best key per doc)."""
        filters: list[set[int]] = [self.phrase_docs[h] for h in interp.hints]
        if province_code:
            filters.append(self.province_docs.get(province_code, set()))
        content = list(interp.content)
        if not content:
            self._evaluate_area(interp, filters, include_defunct=include_defunct, out=out)
            return
        variants: list[tuple[list[str], dict[str, list[str]]]] = [(content, {})]
        if fuzzy:  # also read "benthanh" as "ben thanh" (a missing space counts as a typo)
            glue: dict[str, list[str]] = {}
            glued: list[str] = []
            for q in content:
                parts = self._split_glued(q)
                if parts:
                    glue[q] = parts
                glued.extend(parts or [q])
            if glue:
                variants.append((glued[:MAX_TOKENS], glue))
        for words_, glue_ in variants:
            self._match(
                interp, words_, glue_, fuzzy=fuzzy, filters=list(filters), accents=accents,
                cache=cache, out=out,
            )

    def _match(
        self,
        interp: _Interp,
        content: list[str],
        glue: dict[str, list[str]],
        *,
        fuzzy: bool,
        filters: list[set[int]],
        accents: frozenset[str],
        cache: dict[Any, Alts],
        out: dict[int, Key],
    ) -> None:
        """Docs whose core has a match for every content word (and pass every filter)."""
        kinds = interp.kinds
        n = len(content)
        alts_list = [
            self._alternatives(
                q, fuzzy=fuzzy, prefix=len(q) >= 2 or (i == n - 1 and n > 1), cache=cache
            )
            for i, q in enumerate(content)
        ]
        if any(not a for a in alts_list):
            return
        # Seed from the most selective word or filter; check the others per candidate.
        sizes = [sum(len(self.postings[t]) for t in alts) for alts in alts_list]
        seed_i = min(range(n), key=sizes.__getitem__)
        filters.sort(key=len)
        seeds: Iterable[int]
        if filters and len(filters[0]) < sizes[seed_i]:
            seeds = filters[0]
        else:
            seed_set: set[int] = set()
            for t in alts_list[seed_i]:
                seed_set.update(self.postings[t])
            seeds = seed_set
        docs = self.docs
        for d in seeds:
            if filters and not all(d in f for f in filters):
                continue
            doc = docs[d]
            core = doc.core
            typos = len(glue)
            prefixes = 0
            sim = 0.0
            matched: set[str] = set()
            first = ""
            for alts in alts_list:
                best: tuple[int, int, float] | None = None
                best_t = ""
                for t in core:
                    m = alts.get(t)
                    if m is not None and (best is None or m < best):
                        best, best_t = m, t
                if best is None:
                    break
                typos += best[0]
                prefixes += best[1]
                sim += best[2]
                matched.add(best_t)
                first = first or best_t
            else:
                kind_mismatch = 0
                in_core: list[str] = []
                for k in kinds:
                    if k in doc.core_set and " " not in k:
                        in_core.append(k)
                        matched.add(k)
                    elif k != doc.kind_phrase:
                        kind_mismatch = 1
                exact = (
                    typos == 0
                    and prefixes == 0
                    and len(content) + len(in_core) == len(core)
                    and _name_sequence(interp.rest, glue, doc.core_set) == core
                )
                if exact:
                    cls = CLASS_EXACT_OTHER_KIND if kind_mismatch else CLASS_EXACT
                else:
                    cls = CLASS_PARTIAL
                uncovered = sum(1 for t in core if t not in matched)
                order = 0 if first == core[0] else 1  # "tan": Tân An before Pa Tần
                # typed with diacritics: "Tân Thành" before "Tân Thanh"
                accent = -len(accents & doc.accent_set) if accents else 0
                key = (cls, typos, uncovered, prefixes, order, kind_mismatch, accent, sim)
                old = out.get(d)
                if old is None or key < old:
                    out[d] = key

    def _evaluate_area(
        self,
        interp: _Interp,
        filters: list[set[int]],
        *,
        include_defunct: bool,
        out: dict[int, Key],
    ) -> None:
        """A query of place names and kind words only: "dak lak", "quan 1", "xa dong nai".

        Kind words alone ("xa") list units of that kind, current ones only unless defunct
        ones were asked for (an old name cannot say more than the kind word did).
        """
        kinds = interp.kinds
        if not filters and not kinds:
            return
        if filters:
            filters = sorted(filters, key=len)
            seeds: Iterable[int] = filters[0]
            rest = filters[1:]
            cls = CLASS_AREA
        else:
            seed_set: set[int] = set()
            for k in kinds:
                seed_set |= self.kind_docs.get(k, set())
                for d in self.postings.get(k, ()):
                    seed_set.add(d)
            if not include_defunct:
                seed_set &= self.active_ids
            seeds, rest, cls = seed_set, [], CLASS_PARTIAL
        key = (cls, 0, 0, 0, 0, 0, 0, 0.0)
        check_kinds = bool(kinds and filters)  # seeds from kind words need no check
        if not out and not rest and not check_kinds:  # "xa": thousands, at C speed
            out.update(dict.fromkeys(seeds, key))
            return
        for d in seeds:
            if rest and not all(d in f for f in rest):
                continue
            if check_kinds:
                doc = self.docs[d]
                if not any(k == doc.kind_phrase or k in doc.core_set for k in kinds):
                    continue
            old = out.get(d)
            if old is None or key < old:
                out[d] = key

    def search(
        self, query: str, *, province_code: str | None = None, include_defunct: bool = False
    ) -> Matches:
        """Every unit the query finds, with ranking keys (see the module docstring).

        Words must match without typos first; only if that finds nothing are typos allowed,
        so "ben thanh" lists Bến Thành and not forty "Bến Th…" look-alikes. Without
        ``include_defunct``, defunct units found by their old name are replaced by the unit
        they became (``Hit.via``) when they match better than any active unit does.
        """
        key = (query[:MAX_QUERY_CHARS] if isinstance(query, str) else "", province_code,
               include_defunct)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        with _gc_paused():
            found = self._search(
                query, province_code=province_code, include_defunct=include_defunct
            )
        if len(self.memo) >= MEMO_SIZE:
            self.memo.clear()
        self.memo[key] = found
        return found

    def _search(
        self, query: str, *, province_code: str | None, include_defunct: bool
    ) -> Matches:
        if not isinstance(query, str):
            return Matches([], False)
        text = query[:MAX_QUERY_CHARS]
        tokens = words(fold(text))
        code_doc = self.by_code.get(text.strip()[:32])
        if not tokens and code_doc is None:
            return Matches([], False)
        interps = self._interpretations(tokens) if tokens else []
        accents = accent_words(text) if not text.isascii() else frozenset()
        cache: dict[Any, Alts] = {}
        for fuzzy in (False, True):
            found: dict[int, Key] = {}
            if not fuzzy and code_doc is not None and (
                not province_code or code_doc.province_code == province_code
            ):
                found[code_doc.idx] = (CLASS_CODE, 0, 0, 0, 0, 0, 0, 0.0)
            for interp in interps:
                if fuzzy and not interp.content:
                    continue  # area readings have no words to misspell
                self._evaluate(
                    interp,
                    fuzzy=fuzzy,
                    province_code=province_code,
                    include_defunct=include_defunct,
                    accents=accents,
                    cache=cache,
                    out=found,
                )
            hits = self._hits(found, include_defunct=include_defunct)
            if hits:
                return Matches(hits, fuzzy)
        return Matches([], True)

    def _hits(
        self, found: dict[int, Key], *, include_defunct: bool
    ) -> list[tuple[Key, Doc, Doc | None]]:
        """Matched docs → hits, replacing defunct units by their successors when asked to.

        Successors are listed only when some old name matches strictly better (class, then
        typos) than every current unit: "Bến Nghé" → Phường Sài Gòn, but "An Phú" lists the
        current An Phús, not the units that absorbed one of the dozens of old An Phú wards.
        """
        direct: dict[str, tuple[Key, Doc, Doc | None]] = {}
        defunct: list[tuple[Key, Doc]] = []
        for d, k in found.items():
            doc = self.docs[d]
            if doc.active or include_defunct:
                source = SOURCE_DIRECT if doc.active else SOURCE_DEFUNCT
                direct[doc.code] = (_full_key(k, source, doc), doc, None)
            elif doc.successor is not None:
                defunct.append((k, doc))
        if not defunct:
            return list(direct.values())
        best_direct = min((h[0][:2] for h in direct.values()), default=None)
        best_old = min(k[:2] for k, _ in defunct)
        if best_direct is not None and best_old >= best_direct:
            return list(direct.values())  # an active unit matches at least as well
        hits = dict(direct)
        for k, old in defunct:
            succ = old.successor
            assert succ is not None
            key = _full_key(k, SOURCE_VIA_OLD, succ)
            have = hits.get(succ.code)
            if have is None or key < have[0]:
                hits[succ.code] = (key, succ, old)
        return list(hits.values())

    # ------------------------------------------------------------------ suggestions

    def suggest(self, query: str, *, limit: int = 5) -> list[Hit]:
        """"Did you mean": current units sharing most words with the query, typos allowed.

        Looser than ``search``: only half the words need to match a word of the name
        (rounded up), a word may have one edit of any kind from 2 letters and two from 5,
        and words that name no unit may still name its province or old district (with a
        typo: "dong nia"). Scores: exact word 1, prefix 0.6-0.9, typo 0.25-0.5, place word
        0.3 (0.15 with a typo). Defunct units are shown as the unit they became (``via``).
        """
        with _gc_paused():
            return self._suggest(query, limit)

    def _suggest(self, query: str, limit: int) -> list[Hit]:
        if not isinstance(query, str):
            return []
        tokens = words(fold(query[:MAX_QUERY_CHARS]))
        _kinds, content = split_query_kinds(tokens)
        content = content or tokens
        if not content:
            return []
        per_doc: dict[int, dict[int, float]] = {}  # doc → query word → best name score
        for qi, q in enumerate(content):
            for t, score in self._loose_alternatives(q).items():
                for d in self.postings[t]:
                    got = per_doc.setdefault(d, {})
                    if score > got.get(qi, 0.0):
                        got[qi] = score
        need = max(1, math.ceil(len(content) / 2))
        ranked: list[tuple[Key, Doc, Doc | None]] = []
        for d, got in per_doc.items():
            if len(got) < need:
                continue
            doc = self.docs[d]
            shown, via = (doc, None) if doc.active else (doc.successor, doc)
            if shown is None:
                continue
            score = sum(got.values()) - 0.05 * max(0, len(doc.core) - len(got))
            for qi, q in enumerate(content):
                if qi in got:
                    continue
                if q in doc.context_words:
                    score += 0.3
                elif len(q) >= 3 and any(
                    osa_distance(q, w, 1) <= 1 for w in doc.context_words
                ):
                    score += 0.15
            key = (
                -round(score, 6),
                0 if via is None else 1,
                len(shown.name),
                shown.name_folded,
                shown.code,
            )
            ranked.append((key, shown, via))
        out: list[Hit] = []
        seen: set[str] = set()
        for key, shown, via in sorted(ranked, key=lambda r: r[0]):
            if shown.code in seen:
                continue
            seen.add(shown.code)
            out.append(Hit(key, shown, via))
            if len(out) >= limit:
                break
        return out

    def _loose_alternatives(self, q: str) -> dict[str, float]:
        alts: dict[str, float] = {}
        if q in self.postings:
            alts[q] = 1.0
        if len(q) >= 2:
            for t in self._prefixed(q):
                alts.setdefault(t, 0.6 + 0.3 * len(q) / len(t))
        for t, dist in self.neighbours(q, loose=True):
            base = 0.5 if len(q) >= 4 else 0.3
            alts.setdefault(t, base / dist)
        return alts


def _name_sequence(
    rest: Sequence[str], glue: Mapping[str, list[str]], core_set: frozenset[str]
) -> tuple[str, ...]:
    """The query's words that name the unit, in order: kind words only if in its name."""
    seq: list[str] = []
    i = 0
    while i < len(rest):
        if " ".join(rest[i : i + 2]) in KIND_PAIRS:
            i += 2
            continue
        tok = rest[i]
        if tok not in KIND_WORDS or tok in core_set:
            seq.extend(glue.get(tok, (tok,)))
        i += 1
    return tuple(seq)


def _full_key(k: Key, source: int, doc: Doc) -> Key:
    """(class, typos, source, <the match key again>, rank by (len(name), name, code)).

    Nested rather than flat: a query listing 10,000 units builds 10,000 of these.
    """
    return (k[0], k[1], source, k, doc.tail)


# ---------------------------------------------------------------------- cache and invalidation


@dataclass
class _Entry:
    index: UnitIndex
    version: tuple[Any, ...]
    generation: int
    checked_at: float


_cache: dict[str, _Entry] = {}
_generation = 0
_recheck_until = 0.0
_WRITE_FLAG = "hopnhat.units_written"


def invalidate() -> None:
    """Forget every index: the next search rebuilds (for writes the listeners cannot see)."""
    global _generation
    _cache.clear()
    _generation += 1


def _bump() -> None:
    global _generation, _recheck_until
    _generation += 1
    _recheck_until = time.monotonic() + RECHECK_WINDOW_SECONDS


def _after_execute(
    conn: Connection, clause: Any, _multiparams: Any, _params: Any, _options: Any, result: Any
) -> None:
    """Note INSERT/UPDATE/DELETE on ``units`` through any SQLAlchemy engine in this process."""
    if not isinstance(clause, UpdateBase):
        return
    table = getattr(clause, "table", None)
    if getattr(table, "name", None) != Unit.__tablename__:
        return
    try:
        if result is not None and result.rowcount == 0:
            return  # e.g. the test fixtures' "delete non-register units" that deletes none
    except Exception:  # some results cannot tell; assume a change
        pass
    conn.info[_WRITE_FLAG] = True
    _bump()


def _after_transaction(conn: Connection) -> None:
    """Commit or rollback of a transaction that wrote units: others may now see (or not)."""
    if conn.info.pop(_WRITE_FLAG, False):
        _bump()


def _install_listeners() -> None:
    for name, fn in (
        ("after_execute", _after_execute),
        ("commit", _after_transaction),
        ("rollback", _after_transaction),
    ):
        if not event.contains(Engine, name, fn):
            event.listen(Engine, name, fn)


_install_listeners()


def _db_key(session: AsyncSession) -> str:
    bind = session.get_bind()
    url = bind.engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return f"sqlite-memory:{id(bind.engine)}"
    return url.render_as_string(hide_password=True)


async def _version(session: AsyncSession) -> tuple[Any, ...]:
    row = (
        await session.execute(select(func.count(), func.max(Unit.updated_at)).select_from(Unit))
    ).one()
    return (row[0], row[1])


def _old_provinces() -> dict[str, str]:
    """Old unit code → its pre-2025 province name, from the packages (cached there)."""
    try:
        from services.register import old_units_by_code

        return {code: r.province_name for code, r in old_units_by_code().items()}
    except Exception:  # the packages are optional for the index: names carry most of it
        log.warning("old unit provinces unavailable; searching without them", exc_info=True)
        return {}


async def build_index(session: AsyncSession) -> UnitIndex:
    """Read every unit and province (one query each) and index them."""
    provinces = {
        code: name
        for code, name in (await session.execute(select(Province.code, Province.name))).all()
    }
    result = await session.execute(
        select(
            Unit.code, Unit.name, Unit.kind, Unit.province_code, Unit.active, Unit.merged_into
        ).order_by(Unit.code)
    )
    rows = [UnitRow(*r) for r in result.all()]
    has_old = any(r.kind in ("old_ward", "old_district") for r in rows)
    return UnitIndex.build(rows, provinces, _old_provinces() if has_old else None)


async def get_index(session: AsyncSession) -> UnitIndex:
    """The index for this session's database, rebuilt if units changed.

    A write to ``units`` through SQLAlchemy in this process (imports, the register load, the
    sample data) is seen by engine events, and the version (row count and latest
    ``updated_at``) is then re-read on every search for a couple of seconds, which covers the
    moment the writer commits. Writes by other processes are noticed by the same version
    check at most ``VERSION_CHECK_SECONDS`` later; ``invalidate()`` forces a rebuild.
    An index built inside a transaction that wrote units includes them before the commit
    (the importer sees what it imported); a rollback changes the version, so it is rebuilt.
    """
    key = _db_key(session)
    entry = _cache.get(key)
    now = time.monotonic()
    generation = _generation
    if (
        entry is not None
        and entry.generation == generation
        and now >= _recheck_until
        and now - entry.checked_at < VERSION_CHECK_SECONDS
    ):
        return entry.index
    version = await _version(session)
    if entry is not None and entry.version == version:
        entry.generation, entry.checked_at = generation, now
        return entry.index
    started = time.perf_counter()
    index = await build_index(session)
    _cache[key] = _Entry(index, version, generation, now)
    log.info(
        "unit index built: %d units in %.0f ms", len(index.docs),
        1000 * (time.perf_counter() - started),
    )
    return index
