"""FAQ retrieval for officials typing on phones: accent-insensitive BM25 with synonyms and typos.

Officials type without diacritics, with abbreviations (QLVB, TTHC, UBND) and typos, in
Vietnamese or English; the same question must find the same entry. Text is folded
(services.folding); unknown query words are corrected to a vocabulary word one edit away
(preferring one that completes a known phrase); known phrases are replaced by concept
tokens on both sides (``synonyms.toml``: "phần mềm văn bản", "QLVB" and "document
management" all become ``~qlvb``); stopwords and domain-generic words are dropped. BM25F
then ranks entries over weighted fields (questions > tags > answers) plus adjacent-unit
pairs as a phrase bonus. A confidence in 0..1 (the idf-weighted share of the query the
entry explains x the strength of the match) lets the bot answer only when it reaches
``CONFIDENT`` and otherwise offer the closest entries.

Pure Python, no heavy dependencies: the index builds in tens of milliseconds and a search
takes well under a millisecond, so operators can import extra entries (TOML, CSV, XLSX) at
run time without a restart."""

from __future__ import annotations

import csv
import html
import io
import math
import re
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.folding import fold

FAQ_PATH = Path(__file__).with_name("faq.toml")
VOCABULARY_PATH = Path(__file__).with_name("synonyms.toml")

#: Answer when a hit's confidence reaches this; below it, offer the closest entries instead.
CONFIDENT = 0.4

#: Longest answer accepted: the smaller channel limit (Zalo sendMessage, 2000 chars).
MAX_ANSWER = 2000

FIELD_WEIGHTS = {"q": 3.0, "tags": 2.0, "a": 1.0}
BIGRAM_WEIGHT = 0.5
TYPO_WEIGHT = 0.8
#: Share of a typo-corrected word's weight that counts as covered in the confidence.
TYPO_CREDIT = 0.5
K1 = 1.2
B = 0.5
#: Score at which the strength factor of the confidence reaches one half.
SCORE_HALF = 6.0
#: Relative weight, in coverage, of a query word the knowledge base has never seen.
UNKNOWN_WEIGHT = 0.6

_VOWELS = set("aeiouy")
_ALLOWED_TAGS = {"b", "strong", "i", "em", "u", "s", "code", "pre", "a"}
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)([^<>]*)>")
_BAD_AMP = re.compile(r"&(?!(?:amp|lt|gt|quot|#\d+|#x[0-9a-fA-F]+);)")
_ID_RE = re.compile(r"^[a-z0-9_][a-z0-9_.-]{0,63}$")


class KnowledgeError(ValueError):
    """A knowledge file is invalid; ``problems`` lists every bad row with the reason."""

    def __init__(self, problems: Iterable[str], origin: str = "faq") -> None:
        self.problems = list(problems)
        self.origin = origin
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{origin}: {len(self.problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class Vocabulary:
    """Concepts with their phrases, generic phrases and stopwords (``synonyms.toml``)."""

    concepts: dict[str, tuple[str, ...]]
    generic: tuple[str, ...] = ()
    stopwords: frozenset[str] = frozenset()


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read and check ``synonyms.toml``; KnowledgeError names each bad concept."""
    path = Path(path) if path else VOCABULARY_PATH
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KnowledgeError([f"cannot read vocabulary: {exc}"], str(path)) from exc
    problems: list[str] = []
    concepts: dict[str, tuple[str, ...]] = {}
    table = raw.get("concepts")
    if not isinstance(table, dict) or not table:
        problems.append("no [concepts] table")
        table = {}
    for name, phrases in table.items():
        if not re.fullmatch(r"[a-z0-9_]+", name):
            problems.append(f"concept {name!r}: name must be a-z, 0-9, _")
        elif not isinstance(phrases, list) or not all(isinstance(x, str) for x in phrases):
            problems.append(f"concept {name!r}: must be a list of strings")
        elif any(not fold(x) for x in phrases):
            problems.append(f"concept {name!r}: has an empty phrase")
        else:
            concepts[name] = tuple(phrases)
    generic = raw.get("generic", [])
    if not isinstance(generic, list) or not all(isinstance(x, str) for x in generic):
        problems.append("generic must be a list of strings")
        generic = []
    stopwords = raw.get("stopwords", "")
    if not isinstance(stopwords, str):
        problems.append("stopwords must be one string of words")
        stopwords = ""
    if problems:
        raise KnowledgeError(problems, str(path))
    return Vocabulary(
        concepts=concepts,
        generic=tuple(generic),
        stopwords=frozenset(fold(stopwords).split()),
    )


@dataclass(frozen=True)
class Entry:
    """One FAQ entry; answers are Telegram HTML (see :func:`check_html`)."""

    id: str
    questions_vi: tuple[str, ...]
    questions_en: tuple[str, ...]
    answer_vi: str
    answer_en: str
    source: str
    tags: tuple[str, ...] = ()
    systems: tuple[str, ...] = ()
    origin: str = field(default="faq.toml", compare=False)

    def question(self, lang: str = "vi") -> str:
        first, other = (
            (self.questions_en, self.questions_vi)
            if lang == "en"
            else (self.questions_vi, self.questions_en)
        )
        return (first or other)[0]

    def answer(self, lang: str = "vi") -> str:
        """The HTML answer in ``lang``, falling back to the other language if missing."""
        if lang == "en":
            return self.answer_en or self.answer_vi
        return self.answer_vi or self.answer_en

    def answer_text(self, lang: str = "vi") -> str:
        """The answer as plain text, for channels without HTML (Zalo)."""
        return strip_html(self.answer(lang))

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.source.split(",") if s.strip())


@dataclass(frozen=True)
class Hit:
    """A ranked entry: raw BM25 ``score`` and ``confidence`` in 0..1 (compare to CONFIDENT)."""

    entry: Entry
    score: float
    confidence: float

    @property
    def confident(self) -> bool:
        return self.confidence >= CONFIDENT


# ------------------------------------------------------------------------------ text helpers


def strip_html(text: str) -> str:
    """Telegram HTML → plain text."""
    return html.unescape(_TAG_RE.sub("", text))


def check_html(text: str) -> list[str]:
    """Problems that would make Telegram reject the text with parse_mode=HTML (empty if OK)."""
    problems: list[str] = []
    stack: list[str] = []
    for m in _TAG_RE.finditer(text):
        closing, tag, attrs = m[1] == "/", m[2].lower(), m[3]
        if tag not in _ALLOWED_TAGS:
            problems.append(f"tag <{tag}> is not allowed (use b, i, u, s, code, pre, a)")
            continue
        if closing:
            if not stack or stack[-1] != tag:
                problems.append(f"</{tag}> closes nothing open")
            else:
                stack.pop()
        else:
            if tag == "a" and "href=" not in attrs:
                problems.append("<a> needs href")
            stack.append(tag)
    if stack:
        problems.append("unclosed " + ", ".join(f"<{t}>" for t in stack))
    bare = _TAG_RE.sub("", text)
    if "<" in bare or ">" in bare:
        problems.append("bare < or > (write &lt; &gt;)")
    if _BAD_AMP.search(text):
        problems.append("bare & (write &amp;)")
    return problems


def _edit1(a: str, b: str) -> bool:
    """Damerau-Levenshtein (optimal string alignment) distance between a and b is at most 1."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        if a[i + 1 :] == b[i + 1 :]:
            return True
        return i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]
    if la < lb:
        return a[i:] == b[i + 1 :]
    return a[i + 1 :] == b[i:]


def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


# ------------------------------------------------------------------------------ the index


@dataclass
class _Analyzed:
    """A text as a sequence of units: a plain word, or the concepts a phrase stands for."""

    units: list[tuple[str, ...]]
    corrected: set[int] = field(default_factory=set)  # positions of typo-corrected units


class _Analyzer:
    """Folding, typo correction, phrase → concept replacement and stopwords."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.stopwords = vocabulary.stopwords
        phrases: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for concept, variants in vocabulary.concepts.items():
            for v in variants:
                toks = tuple(fold(v).split())
                if toks:
                    phrases[toks].add("~" + concept)
        for v in vocabulary.generic:
            phrases.setdefault(tuple(fold(v).split()), set())
        self.phrases = {k: tuple(sorted(v)) for k, v in phrases.items()}
        self.max_len = max((len(k) for k in self.phrases), default=1)
        self.phrase_words = {t for k in self.phrases for t in k}
        self.vocab: dict[str, int] = {}
        self.delete_index: dict[str, set[str]] = {}

    def set_vocab(self, df: Mapping[str, int]) -> None:
        """Words the corrector may map unknown query words onto (with document frequency)."""
        vocab = {t: n for t, n in df.items() if not t.startswith("~") and " " not in t}
        for w in self.phrase_words:
            vocab.setdefault(w, 1)
        self.vocab = vocab
        index: dict[str, set[str]] = defaultdict(set)
        for w in vocab:
            if len(w) >= 3 and not w.isdigit():
                index[w].add(w)
                for d in _deletes(w):
                    index[d].add(w)
        self.delete_index = dict(index)

    def _in_phrase(self, tokens: list[str], i: int, word: str) -> bool:
        """Whether ``word`` at position i completes a known phrase with its neighbours."""
        trial = [*tokens[:i], word, *tokens[i + 1 :]]
        for size in range(2, self.max_len + 1):
            for start in range(max(0, i - size + 1), min(i, len(trial) - size) + 1):
                if tuple(trial[start : start + size]) in self.phrases:
                    return True
        return False

    def correct(self, token: str, tokens: list[str] | None = None, i: int = 0) -> str | None:
        """The vocabulary word one edit away from an unknown token, if any: preferably one
        that completes a phrase with the neighbouring words, else the most frequent.

        Three-letter words are only corrected for swapped letters ("vna" → "van") or, when
        they have no vowel and so cannot be a Vietnamese syllable, a missing one ("hnh").
        """
        if token in self.vocab or token in self.stopwords or token.isdigit() or len(token) < 3:
            return None
        short = len(token) == 3
        vowelless = not (set(token) & _VOWELS)
        candidates: set[str] = set()
        for key in (token, *_deletes(token)):
            candidates |= self.delete_index.get(key, set())
        best: tuple[int, int, str] | None = None
        for c in candidates:
            if c == token or not _edit1(token, c):
                continue
            if short and not (sorted(c) == sorted(token) or (vowelless and len(c) == 4)):
                continue
            fits = tokens is not None and c in self.phrase_words and self._in_phrase(tokens, i, c)
            if c in self.stopwords and not fits:  # "bna" may be "bản" of "văn bản", never "bạn"
                continue
            rank = (int(fits), self.vocab.get(c, 0), c)
            if best is None or rank > best:
                best = rank
        return best[2] if best else None

    def analyze(self, text: str, query: bool = False) -> _Analyzed:
        tokens = fold(text).split()
        fixed: set[int] = set()
        if query and self.vocab:
            for i, t in enumerate(tokens):
                c = self.correct(t, tokens, i)
                if c:
                    tokens[i] = c
                    fixed.add(i)
        units: list[tuple[str, ...]] = []
        corrected: set[int] = set()
        i, n = 0, len(tokens)
        while i < n:
            for size in range(min(self.max_len, n - i), 0, -1):
                concepts = self.phrases.get(tuple(tokens[i : i + size]))
                if concepts is not None:
                    break
            else:
                size, concepts = 1, None
            if concepts is None:
                if tokens[i] not in self.stopwords:
                    units.append((tokens[i],))
                    if i in fixed:
                        corrected.add(len(units) - 1)
            elif concepts:  # generic phrases ("hệ thống", "phần mềm") map to nothing
                units.append(concepts)
                if fixed & set(range(i, i + size)):
                    corrected.add(len(units) - 1)
            i += size
        return _Analyzed(units=units, corrected=corrected)


def _terms(a: _Analyzed) -> Counter[str]:
    """Index terms: every unit's words or concepts, and adjacent-unit pairs (phrase bonus)."""
    counts: Counter[str] = Counter()
    for unit in a.units:
        counts.update(unit)
    for left, right in zip(a.units, a.units[1:], strict=False):
        counts.update(f"{x} {y}" for x in left for y in right)
    return counts


class _Index:
    """An immutable BM25F snapshot over a list of entries (swapped whole on reload)."""

    def __init__(self, entries: Sequence[Entry], analyzer: _Analyzer) -> None:
        self.entries = list(entries)
        self.analyzer = analyzer
        weighted: list[dict[str, float]] = []
        for e in self.entries:
            fields = {
                "q": " . ".join((*e.questions_vi, *e.questions_en)),
                "tags": " . ".join(e.tags),
                "a": " . ".join((strip_html(e.answer_vi), strip_html(e.answer_en))),
            }
            tf: dict[str, float] = defaultdict(float)
            for name, text in fields.items():
                w = FIELD_WEIGHTS[name]
                for term, c in _terms(analyzer.analyze(text)).items():
                    tf[term] += w * c * (BIGRAM_WEIGHT if " " in term else 1.0)
            weighted.append(tf)
        n = max(len(weighted), 1)
        lengths = [sum(v for t, v in tf.items() if " " not in t) for tf in weighted]
        avg = (sum(lengths) / n) or 1.0
        df: Counter[str] = Counter()
        for tf in weighted:
            df.update(tf.keys())
        self.n = n
        self.df = df
        self.max_idf = math.log(1 + (n + 0.5) / 0.5)
        self.postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for d, tf in enumerate(weighted):
            norm = K1 * (1 - B + B * lengths[d] / avg)
            for term, f in tf.items():
                self.postings[term].append((d, self.idf(term) * f * (K1 + 1) / (f + norm)))
        self.doc_terms = [frozenset(tf) for tf in weighted]
        self.by_id = {e.id: e for e in self.entries}
        analyzer.set_vocab(df)

    def idf(self, term: str) -> float:
        n_t = self.df.get(term, 0)
        return math.log(1 + (self.n - n_t + 0.5) / (n_t + 0.5))

    def search(self, query: str, limit: int) -> list[Hit]:
        a = self.analyzer.analyze(query, query=True)
        terms = _terms(a)
        if not terms:
            return []
        typo_terms = {t for i in a.corrected for t in a.units[i]}
        scores = [0.0] * len(self.entries)
        for term in terms:
            postings = self.postings.get(term)
            if not postings:
                continue
            w = TYPO_WEIGHT if term in typo_terms else 1.0
            for d, contrib in postings:
                scores[d] += w * contrib
        matched = [d for d in range(len(scores)) if scores[d] > 0]
        ranked = sorted(matched, key=lambda d: -scores[d])[:limit]
        if not ranked:
            return []
        # coverage: the idf-weighted share of the query's units the entry contains;
        # words never seen count against it, corrected words count half
        weights: list[float] = []
        for unit in a.units:
            present = [self.idf(t) for t in unit if t in self.df]
            weights.append(max(present) if present else self.max_idf * UNKNOWN_WEIGHT)
        total = sum(weights) or 1.0
        hits = []
        for d in ranked:
            have = self.doc_terms[d]
            covered = 0.0
            for i, (unit, w) in enumerate(zip(a.units, weights, strict=True)):
                if have.intersection(unit):
                    covered += w * (TYPO_CREDIT if i in a.corrected else 1.0)
            strength = scores[d] / (scores[d] + SCORE_HALF)
            hits.append(Hit(self.entries[d], scores[d], round(covered / total * strength, 4)))
        return hits


# ------------------------------------------------------------------------------ loading


def _as_list(value: Any, split: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        items = re.split(split, str(value))
    return [s for s in (i.strip() for i in items) if s]


def build_entry(
    raw: Mapping[str, Any], where: str, origin: str, problems: list[str]
) -> Entry | None:
    """Validate one raw entry (TOML table or spreadsheet row); problems get ``where``."""
    before = len(problems)
    eid = str(raw.get("id") or "").strip()
    if not _ID_RE.match(eid):
        problems.append(f"{where}: id {eid!r} must be 1-64 chars of a-z, 0-9, _ . -")
    q_vi = _as_list(raw.get("q_vi", raw.get("question_vi")), r"\n|\|")
    q_en = _as_list(raw.get("q_en", raw.get("question_en")), r"\n|\|")
    if not q_vi and not q_en:
        problems.append(f"{where}: no question (question_vi or question_en)")
    answers: dict[str, str] = {}
    for lang in ("vi", "en"):
        text = str(raw.get(f"a_{lang}", raw.get(f"answer_{lang}")) or "").strip()
        for p in check_html(text):
            problems.append(f"{where}: answer_{lang}: {p}")
        if len(text) > MAX_ANSWER:
            problems.append(f"{where}: answer_{lang} is {len(text)} chars (max {MAX_ANSWER})")
        answers[lang] = text
    if not answers["vi"] and not answers["en"]:
        problems.append(f"{where}: no answer (answer_vi or answer_en)")
    source = str(raw.get("source") or "").strip()
    if not source:
        problems.append(f"{where}: source is missing (a seed article or 'bot')")
    if len(problems) > before:
        return None
    return Entry(
        id=eid,
        questions_vi=tuple(q_vi),
        questions_en=tuple(q_en),
        answer_vi=answers["vi"],
        answer_en=answers["en"],
        source=source,
        tags=tuple(_as_list(raw.get("tags"), r"[,;\n]")),
        systems=tuple(_as_list(raw.get("systems"), r"[,;\s]+")),
        origin=origin,
    )


def _check_unique(entries: list[Entry], labels: list[str], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for e, where in zip(entries, labels, strict=True):
        if e.id in seen:
            problems.append(f"{where}: duplicate id {e.id!r} (also {seen[e.id]})")
        seen.setdefault(e.id, where)


def parse_toml(data: bytes | str, origin: str) -> list[Entry]:
    """Entries from ``[[faq]]`` tables; KnowledgeError lists every bad entry."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        raw = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KnowledgeError([f"not valid UTF-8 TOML: {exc}"], origin) from exc
    tables = raw.get("faq")
    if not isinstance(tables, list):
        raise KnowledgeError(["no [[faq]] tables"], origin)
    problems: list[str] = []
    entries, labels = [], []
    for i, t in enumerate(tables, 1):
        where = f"faq[{i}]" + (f" ({t.get('id')})" if isinstance(t, dict) and t.get("id") else "")
        e = build_entry(t if isinstance(t, dict) else {}, where, origin, problems)
        if e:
            entries.append(e)
            labels.append(where)
    _check_unique(entries, labels, problems)
    if problems:
        raise KnowledgeError(problems, origin)
    return entries


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(data).best()
        if best is None:
            raise
        return str(best)


COLUMNS = ("id", "question_vi", "question_en", "answer_vi", "answer_en", "source", "tags")


def _rows_to_entries(
    header: Sequence[Any], rows: Iterable[tuple[int, Sequence[Any]]], origin: str
) -> list[Entry]:
    names = [str(h or "").strip().lower() for h in header]
    missing = [c for c in ("id", "source") if c not in names]
    if not ({"question_vi", "question_en"} & set(names)):
        missing.append("question_vi or question_en")
    if not ({"answer_vi", "answer_en"} & set(names)):
        missing.append("answer_vi or answer_en")
    if missing:
        raise KnowledgeError([f"missing column(s): {', '.join(missing)}"], origin)
    problems: list[str] = []
    entries, labels = [], []
    for n, values in rows:
        if all(v is None or not str(v).strip() for v in values):
            continue
        row = {k: v for k, v in zip(names, values, strict=False) if k}
        where = f"row {n}" + (f" ({row.get('id')})" if row.get("id") else "")
        e = build_entry(row, where, origin, problems)
        if e:
            entries.append(e)
            labels.append(where)
    _check_unique(entries, labels, problems)
    if problems:
        raise KnowledgeError(problems, origin)
    if not entries:
        raise KnowledgeError(["no entries"], origin)
    return entries


def parse_csv(data: bytes, origin: str) -> list[Entry]:
    """Entries from a CSV with columns id, question_vi, question_en, answer_vi, ... tags."""
    try:
        text = _decode(data)
    except UnicodeDecodeError as exc:
        raise KnowledgeError([f"cannot decode text: {exc}"], origin) from exc
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    header = next(reader, None)
    if header is None:
        raise KnowledgeError(["empty file"], origin)
    return _rows_to_entries(header, ((n, r) for n, r in enumerate(reader, 2)), origin)


def parse_xlsx(data: bytes, origin: str) -> list[Entry]:
    """Entries from the sheet named "faq" (or the first sheet), same columns as CSV."""
    from openpyxl import load_workbook

    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises several unrelated types for bad files
        raise KnowledgeError([f"not a readable XLSX file: {exc}"], origin) from exc
    ws = wb["faq"] if "faq" in wb.sheetnames else wb.worksheets[0]
    rows = ws.iter_rows(values_only=True)
    header = next(rows, None)
    if header is None:
        wb.close()
        raise KnowledgeError(["empty sheet"], origin)
    try:
        return _rows_to_entries(header, ((n, r) for n, r in enumerate(rows, 2)), origin)
    finally:
        wb.close()


def parse_file(data: bytes, filename: str) -> list[Entry]:
    """Entries from a TOML, CSV or XLSX file, chosen by its extension."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".toml":
        return parse_toml(data, filename)
    if suffix in (".csv", ".txt"):
        return parse_csv(data, filename)
    if suffix in (".xlsx", ".xlsm"):
        return parse_xlsx(data, filename)
    raise KnowledgeError([f"unsupported file type {suffix!r} (use .toml, .csv or .xlsx)"], filename)


# ------------------------------------------------------------------------------ public API


class KnowledgeBase:
    """The FAQ and its search index; safe to share (searches read an immutable snapshot)."""

    def __init__(
        self,
        entries: Sequence[Entry] = (),
        path: Path | None = None,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self.path = path
        self._own_vocabulary = vocabulary is None
        self._vocabulary = vocabulary or load_vocabulary()
        self._base = list(entries)
        self._extras: list[tuple[str, list[Entry]]] = []
        self._index = self._build()

    @classmethod
    def load(cls, path: str | Path | None = None) -> KnowledgeBase:
        """Load ``faq.toml`` (default), another TOML file, or every ``*.toml`` in a folder."""
        path = Path(path) if path else FAQ_PATH
        return cls(_read_base(path), path=path)

    def _build(self) -> _Index:
        merged: dict[str, Entry] = {e.id: e for e in self._base}
        for _, entries in self._extras:
            merged.update({e.id: e for e in entries})
        return _Index(list(merged.values()), _Analyzer(self._vocabulary))

    def reload(self) -> None:
        """Re-read the base file(s) and the vocabulary, re-apply imported extras; on error the
        old index stays in service."""
        base = _read_base(self.path) if self.path is not None else self._base
        vocabulary = load_vocabulary() if self._own_vocabulary else self._vocabulary
        self._base, self._vocabulary = base, vocabulary
        self._index = self._build()

    def load_extra(self, data: bytes, filename: str) -> dict[str, list[str]]:
        """Add or replace entries from an uploaded TOML/CSV/XLSX file, live.

        Raises KnowledgeError (every bad row with its reason) and then changes nothing.
        Returns the ids ``added`` and ``updated``.
        """
        entries = parse_file(data, filename)
        current = {e.id: e for e in self._index.entries}
        added = [e.id for e in entries if e.id not in current]
        updated = [e.id for e in entries if e.id in current and current[e.id] != e]
        self._extras.append((filename, entries))
        self._index = self._build()
        return {"added": added, "updated": updated}

    @property
    def entries(self) -> list[Entry]:
        return list(self._index.entries)

    def __len__(self) -> int:
        return len(self._index.entries)

    def get(self, entry_id: str) -> Entry | None:
        return self._index.by_id.get(entry_id)

    def search(self, query: str, lang: str = "vi", limit: int = 3) -> list[Hit]:
        """Best entries for ``query``, best first; ``lang`` picks nothing here (entries are
        bilingual) but is kept so callers can pass the user's language for rendering."""
        bare = query.strip() if query else ""
        if limit <= 0 or not any(c.isalnum() for c in bare) or (
                bare.isdigit() and len(bare) <= 2):
            return []  # "???", or "2": a stray option number, not a question ("1022" is)
        del lang
        return self._index.search(query[:500], limit)

    def answer(self, query: str, lang: str = "vi") -> Hit | None:
        """The top hit if it is confident enough to answer outright."""
        hits = self.search(query, lang, limit=1)
        return hits[0] if hits and hits[0].confident else None

    def export_xlsx(self) -> bytes:
        """All entries as a sheet "faq" in the import format, for editing and re-import."""
        from openpyxl import Workbook

        wb = Workbook()
        ws = wb.active
        assert ws is not None
        ws.title = "faq"
        ws.append([*COLUMNS, "systems"])
        for e in self._index.entries:
            ws.append(
                [
                    e.id,
                    "\n".join(e.questions_vi),
                    "\n".join(e.questions_en),
                    e.answer_vi,
                    e.answer_en,
                    e.source,
                    ", ".join(e.tags),
                    ", ".join(e.systems),
                ]
            )
        buf = io.BytesIO()
        wb.save(buf)
        return buf.getvalue()


def _read_base(path: Path) -> list[Entry]:
    files = sorted(path.glob("*.toml")) if path.is_dir() else [path]
    entries: list[Entry] = []
    problems: list[str] = []
    for f in files:
        try:
            entries.extend(parse_toml(f.read_bytes(), f.name))
        except KnowledgeError as exc:
            problems.extend(f"{f.name}: {p}" for p in exc.problems)
    ids = Counter(e.id for e in entries)
    problems.extend(f"duplicate id {i!r} across files" for i, n in ids.items() if n > 1)
    if problems:
        raise KnowledgeError(problems, str(path))
    return entries
