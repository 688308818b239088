"""Telegram Bot API spec loading and request-parameter validation.

The emulator is only useful if it is at least as strict as Telegram, so every
call is checked against the machine-readable spec in
``shared/telegram-bot-api/api.json`` (methods, their fields, and the object
types those fields reference).  Parameters may arrive as native JSON values or
as strings (form-urlencoded / multipart, which is what aiogram sends), so the
checks here both *validate* and *coerce*: ``"123"`` becomes ``123`` for an
Integer, ``'{"inline_keyboard": [...]}'`` becomes a dict, and so on.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_ENV = "HOPNHAT_API_SPEC"
SPEC_RELATIVE = Path("shared") / "telegram-bot-api" / "api.json"

# Parameters Telegram still accepts although the current spec no longer lists them.
# aiogram keeps them as deprecated fields, so a strict "unknown parameter" check
# would reject calls the real server happily serves.
LEGACY_PARAMS: dict[str, tuple[str, list[str]]] = {
    # legacy name: (field that must exist on the method, accepted types)
    "reply_to_message_id": ("reply_parameters", ["Integer"]),
    "allow_sending_without_reply": ("reply_parameters", ["Boolean"]),
    "disable_web_page_preview": ("link_preview_options", ["Boolean"]),
}

_PRIMITIVES = {"Integer", "Float", "Boolean", "True", "String", "InputFile"}
_INT_RE = re.compile(r"^[+-]?\d+$")
_DISCRIMINATOR_RE = re.compile(r'(?:must be|always)\s+[“"]?([A-Za-z0-9_]+)')
_MAX_DEPTH = 12


class SpecError(RuntimeError):
    """The spec file cannot be found or read."""


class ParamError(ValueError):
    """A request parameter failed validation; ``str(exc)`` is the Telegram description."""


@dataclass
class FilePart:
    """An uploaded multipart file part (kept in memory; the emulator is for tests)."""

    name: str
    filename: str
    data: bytes
    content_type: str = "application/octet-stream"

    def __repr__(self) -> str:
        return f"<FilePart {self.name}={self.filename!r} {len(self.data)} bytes>"

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary used in the call log."""
        return {"file": self.filename, "size": len(self.data), "content_type": self.content_type}


@dataclass
class FieldSpec:
    name: str
    types: list[str]
    required: bool
    description: str = ""


@dataclass
class MethodSpec:
    name: str
    fields: dict[str, FieldSpec]
    returns: list[str]

    @property
    def returns_boolean(self) -> bool:
        return self.returns in (["Boolean"], ["True"])


@dataclass
class TypeSpec:
    name: str
    fields: dict[str, FieldSpec]
    subtypes: list[str] = field(default_factory=list)


class _Mismatch(Exception):
    """Internal: value does not match a type; ``path`` locates the offending part."""

    def __init__(self, path: str, detail: str, score: int = 0, plain: bool = False) -> None:
        super().__init__(f"{path}: {detail}" if path else detail)
        self.path = path
        self.detail = detail
        self.score = score  # how well a dict matched a candidate type (for union errors)
        self.plain = plain  # a bare primitive mismatch: the "must be of type" text says it all


class ApiSpec:
    """Indexed view of ``api.json`` plus the validators built on it."""

    def __init__(self, raw: Mapping[str, Any], path: Path | None = None) -> None:
        self.path = path
        self.version: str = str(raw.get("version", ""))
        self.methods: dict[str, MethodSpec] = {}
        self.types: dict[str, TypeSpec] = {}
        for name, m in raw.get("methods", {}).items():
            fields = {f["name"]: _field(f) for f in m.get("fields", [])}
            self.methods[name.lower()] = MethodSpec(name, fields, list(m.get("returns", [])))
        for name, t in raw.get("types", {}).items():
            fields = {f["name"]: _field(f) for f in t.get("fields", [])}
            self.types[name] = TypeSpec(name, fields, list(t.get("subtypes", [])))
        self._discriminators: dict[str, tuple[str, dict[str, str]] | None] = {}

    # ------------------------------------------------------------------ lookup
    def method(self, name: str) -> MethodSpec | None:
        """Case-insensitive method lookup, as Telegram does."""
        return self.methods.get(name.lower())

    # -------------------------------------------------------------- validation
    def validate_params(
        self,
        method: MethodSpec,
        params: Mapping[str, Any],
        files: Mapping[str, FilePart] | None = None,
    ) -> dict[str, Any]:
        """Check ``params`` against ``method`` and return coerced values.

        ``files`` are multipart parts that carry a filename.  A part whose name is
        a parameter of the method *is* that parameter; other parts are only
        reachable through ``attach://<name>`` references and are not "unknown".
        Raises :class:`ParamError` with a Telegram-style description.
        """
        files = dict(files or {})
        merged: dict[str, Any] = dict(params)
        for name, part in files.items():
            if name in method.fields:
                merged[name] = part

        allowed: dict[str, FieldSpec] = dict(method.fields)
        for legacy, (needs, types) in LEGACY_PARAMS.items():
            if needs in method.fields:
                allowed[legacy] = FieldSpec(legacy, types, False)

        for name in merged:
            if name not in allowed:
                raise ParamError(f'Bad Request: unknown parameter "{name}"')
        for fs in method.fields.values():
            if fs.required and _is_missing(merged.get(fs.name)):
                raise ParamError(f'Bad Request: parameter "{fs.name}" is required')

        out: dict[str, Any] = {}
        for name, value in merged.items():
            fs = allowed[name]
            if value == "" and not fs.required and "String" not in fs.types:
                continue  # an empty form field means "not given" for non-string params
            try:
                out[name] = self._check_any(value, fs.types, "", 0, files)
            except _Mismatch as exc:
                expected = " or ".join(fs.types)
                msg = f'Bad Request: parameter "{name}" must be of type {expected}'
                if exc.path or not exc.plain:
                    msg += f": {exc}"
                raise ParamError(msg) from None
        return out

    def check_object(self, value: Any, type_name: str) -> Any:
        """Validate a standalone value against a spec type (handy for tests/tools)."""
        try:
            return self._check_any(value, [type_name], "", 0, {})
        except _Mismatch as exc:
            raise ParamError(f"Bad Request: {type_name}: {exc}") from None

    # ---------------------------------------------------------------- internals
    def _check_any(
        self, value: Any, types: list[str], path: str, depth: int, files: Mapping[str, FilePart]
    ) -> Any:
        """Accept ``value`` if it matches any of ``types``; report the most specific failure."""
        if len(types) > 1 and all(t.startswith("Array of ") for t in types):
            # "Array of InputMediaPhoto or Array of InputMediaVideo" means a mixed array
            # is fine; per-item rules (documents only with documents) are the caller's.
            inner = [t[len("Array of "):] for t in types]
            value = _maybe_json(value, list, path)
            if not isinstance(value, list):
                raise _Mismatch(path, "expected an array")
            return [self._check_any(item, inner, f"{path}[{i}]", depth + 1, files)
                    for i, item in enumerate(value)]
        best: _Mismatch | None = None
        for t in types:
            try:
                return self._check(value, t, path, depth, files)
            except _Mismatch as exc:
                if best is None or exc.score > best.score:
                    best = exc
        assert best is not None
        raise best

    def _check(
        self, value: Any, type_name: str, path: str, depth: int, files: Mapping[str, FilePart]
    ) -> Any:
        if depth > _MAX_DEPTH:
            raise _Mismatch(path, "object is nested too deeply")
        if type_name.startswith("Array of "):
            inner = type_name[len("Array of "):]
            value = _maybe_json(value, list, path)
            if not isinstance(value, list):
                raise _Mismatch(path, f"expected an array of {inner}")
            return [
                self._check(item, inner, f"{path}[{i}]", depth + 1, files)
                for i, item in enumerate(value)
            ]
        if type_name in _PRIMITIVES:
            return _check_primitive(value, type_name, path, files)
        spec = self.types.get(type_name)
        if spec is None:
            # Unknown type name in the spec: accept anything JSON-ish rather than guess.
            return _maybe_json(value, (dict, list), path)
        if spec.subtypes and not spec.fields:
            return self._check_union(value, spec, path, depth, files)
        if not spec.fields:
            # Types without fields (e.g. CallbackGame, InputFile handled above): any object.
            value = _maybe_json(value, dict, path)
            if not isinstance(value, dict):
                raise _Mismatch(path, f"expected a JSON object ({type_name})")
            return value
        return self._check_fields(value, spec, path, depth, files)

    def _check_fields(
        self, value: Any, spec: TypeSpec, path: str, depth: int, files: Mapping[str, FilePart]
    ) -> dict[str, Any]:
        value = _maybe_json(value, dict, path)
        if not isinstance(value, dict):
            raise _Mismatch(path, f"expected a JSON object ({spec.name})")
        score = sum(1 for k in value if k in spec.fields)
        for key in ("type", "status", "source"):
            const = _constant(spec.fields.get(key))
            if const is None:
                continue
            if str(value.get(key)) != const:
                raise _Mismatch(path, f'field "{key}" must be "{const}" in {spec.name}', score)
            score += 50  # the tag matched: this candidate's errors are the relevant ones
        for fs in spec.fields.values():
            if fs.required and fs.name not in value:
                raise _Mismatch(path, f'field "{fs.name}" is required in {spec.name}', score)
        out: dict[str, Any] = {}
        for key, item in value.items():
            fs = spec.fields.get(key)
            if fs is None:
                out[key] = item  # Telegram ignores unknown object fields
                continue
            sub_path = f"{path}.{key}" if path else key
            try:
                out[key] = self._check_any(item, fs.types, sub_path, depth + 1, files)
            except _Mismatch as exc:
                exc.score += score + 100  # got deeper than a sibling candidate would
                raise
        return out

    def _check_union(
        self, value: Any, spec: TypeSpec, path: str, depth: int, files: Mapping[str, FilePart]
    ) -> Any:
        value = _maybe_json(value, (dict, list), path)
        disc = self._discriminator(spec)
        if disc is not None and isinstance(value, dict):
            key, mapping = disc
            tag = value.get(key)
            if tag is None:
                raise _Mismatch(path, f'field "{key}" is required in {spec.name}', 1)
            sub = mapping.get(str(tag))
            if sub is None:
                allowed = ", ".join(sorted(mapping))
                raise _Mismatch(
                    path, f'unsupported {spec.name} {key} "{tag}" (expected one of {allowed})', 1
                )
            return self._check(value, sub, path, depth + 1, files)
        return self._check_any(value, spec.subtypes, path, depth + 1, files)

    def _discriminator(self, spec: TypeSpec) -> tuple[str, dict[str, str]] | None:
        """Find the tag field (type/status/source) whose description says 'must be X'."""
        if spec.name in self._discriminators:
            return self._discriminators[spec.name]
        result: tuple[str, dict[str, str]] | None = None
        for key in ("type", "status", "source"):
            mapping: dict[str, str] = {}
            for sub in spec.subtypes:
                st = self.types.get(sub)
                const = _constant(st.fields.get(key)) if st else None
                if const is None:
                    mapping = {}
                    break
                mapping[const] = sub
            if mapping:
                result = (key, mapping)
                break
        self._discriminators[spec.name] = result
        return result


def _field(f: Mapping[str, Any]) -> FieldSpec:
    return FieldSpec(
        name=f["name"],
        types=list(f.get("types", [])),
        required=bool(f.get("required", False)),
        description=str(f.get("description", "")),
    )


def _constant(fs: FieldSpec | None) -> str | None:
    """The fixed value of a tag field ('Type of the media, must be photo')."""
    if fs is None or not fs.required:
        return None
    m = _DISCRIMINATOR_RE.search(fs.description)
    return m.group(1) if m and m.group(1) != "one" else None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def _maybe_json(value: Any, want: type | tuple[type, ...], path: str) -> Any:
    """Form fields carry objects/arrays as JSON strings; decode them."""
    if isinstance(value, str) and not isinstance(value, want):
        try:
            return json.loads(value)
        except ValueError:
            raise _Mismatch(path, "can't parse JSON") from None
    return value


def _check_primitive(value: Any, type_name: str, path: str, files: Mapping[str, FilePart]) -> Any:
    if type_name == "Integer":
        if isinstance(value, bool):
            raise _Mismatch(path, f"expected {type_name}", plain=True)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value.strip())
        raise _Mismatch(path, f"expected {type_name}", plain=True)
    if type_name == "Float":
        if isinstance(value, bool):
            raise _Mismatch(path, f"expected {type_name}", plain=True)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch(path, f"expected {type_name}", plain=True)
    if type_name in ("Boolean", "True"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _Mismatch(path, f"expected {type_name}", plain=True)
    if type_name == "String":
        if isinstance(value, (bool, dict, list, FilePart)):
            raise _Mismatch(path, f"expected {type_name}", plain=True)
        if isinstance(value, (int, float)):
            return str(value)  # Telegram coerces JSON numbers to strings
        if isinstance(value, str):
            return value
        raise _Mismatch(path, f"expected {type_name}", plain=True)
    if type_name == "InputFile":
        if isinstance(value, FilePart):
            return value
        if isinstance(value, str) and value.startswith("attach://"):
            part = files.get(value[len("attach://"):])
            if part is not None:
                return part
            raise _Mismatch(path, f"attached file {value!r} not found in the request")
        raise _Mismatch(path, f"expected {type_name}", plain=True)
    raise _Mismatch(path, f"expected {type_name}", plain=True)  # pragma: no cover


# ----------------------------------------------------------------- spec lookup
def find_spec_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``api.json``: explicit arg, then ``$HOPNHAT_API_SPEC``, then walk up.

    The walk starts at this package and checks ``<dir>/shared/telegram-bot-api``
    and ``<dir>/../shared/telegram-bot-api`` at each level, which covers both a
    ``shared`` folder inside the project and one beside it (the usual layout).
    """
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise SpecError(f"API spec not found at {p}")
        return p
    env = os.environ.get(SPEC_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise SpecError(f"${SPEC_ENV} points to a missing file: {p}")
        return p
    here = Path(__file__).resolve().parent
    for d in (here, *here.parents):
        for candidate in (d / SPEC_RELATIVE, d.parent / SPEC_RELATIVE):
            if candidate.is_file():
                return candidate
    raise SpecError(
        f"cannot find {SPEC_RELATIVE} above {here}; pass spec_path= or set ${SPEC_ENV}"
    )


@functools.lru_cache(maxsize=8)
def _load_cached(resolved: str, mtime_ns: int) -> ApiSpec:
    with open(resolved, encoding="utf-8") as fh:
        raw = json.load(fh)
    if "methods" not in raw or "types" not in raw:
        raise SpecError(f"{resolved} does not look like a Bot API spec (no methods/types)")
    return ApiSpec(raw, Path(resolved))


def load_spec(path: str | os.PathLike[str] | None = None) -> ApiSpec:
    """Load and index the spec once per process (keyed by path and mtime)."""
    p = find_spec_path(path).resolve()
    return _load_cached(str(p), p.stat().st_mtime_ns)
