"""Prompt libraries: built-in descriptors and user files, parsed strictly into ``Prompt`` records.

A library is data. Each built-in one is a small TOML descriptor in the package's ``libraries``
folder (``prompts/`` in the source tree) naming its file(s): shipped beside the descriptor, or
downloaded on first use from a pinned URL and verified by sha256 (see ``fetch``). User files
(.tsv, .csv, .jsonl, .json, .txt) go through the same parsers.

Parsing never guesses silently: a row with the wrong number of fields, an empty prompt, a file
that is not UTF-8 or a missing prompt column is an error naming the file and line, because a
shifted column would pair images with the wrong prompts without anyone noticing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from clipeval.errors import ClipevalError

FORMATS = ("tsv", "csv", "jsonl", "json", "txt")
# Descriptor-only: a dict literal in Python source (SimpleTuner's prompt library), read with ast.
PYTHON_DICT = "python-dict"
MAX_PYTHON_BYTES = 4 << 20
# Column names accepted for each field, compared case-insensitively, best first.
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")
CATEGORY_COLUMNS = ("category", "categories")
CHALLENGE_COLUMNS = ("challenge",)
NAME_COLUMNS = ("name",)


@dataclass(frozen=True)
class Prompt:
    """One row of a library; ``prompt_id`` is its 0-based position, the key every output uses."""

    prompt_id: int
    prompt: str
    category: str = ""
    challenge: str = ""
    name: str = ""  # a {name: prompt} library's key (SimpleTuner's); a label, not part of the library hash


@dataclass(frozen=True)
class SourceFile:
    """Where a library's rows came from, recorded in the manifest for provenance."""

    name: str
    sha256: str
    url: str = ""


@dataclass(frozen=True)
class PromptLibrary:
    name: str
    description: str
    prompts: tuple[Prompt, ...]
    files: tuple[SourceFile, ...] = field(default=())

    @property
    def sha256(self) -> str:
        """Hash of the parsed rows, so the same prompts read from a TSV or a CSV compare equal."""
        canonical = json.dumps(
            [[p.prompt_id, p.prompt, p.category, p.challenge] for p in self.prompts],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def named(self) -> bool:
        return any(p.name for p in self.prompts)

    def head(self, limit: int | None) -> "PromptLibrary":
        if limit is None or limit >= len(self.prompts):
            return self
        return replace(self, prompts=self.prompts[:limit])


@dataclass(frozen=True)
class Descriptor:
    """A built-in library as declared in ``prompts/<name>.toml`` (whose homepage and license are
    for people reading the file; nothing here uses them)."""

    name: str
    description: str
    count: int
    files: tuple[dict[str, Any], ...]  # each file's name, format, columns; url and sha256 when downloaded

    @property
    def downloaded(self) -> bool:
        return any("url" in f for f in self.files)


def _library_dir():
    return resources.files("clipeval.libraries")


def builtin_descriptors() -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}
    for entry in sorted(_library_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        name = entry.name[: -len(".toml")]
        try:
            raw = tomllib.loads(entry.read_text(encoding="utf-8"))
            found[name] = Descriptor(
                name=name,
                description=raw["description"],
                count=int(raw["count"]),
                files=tuple(raw["files"]),
            )
        except (KeyError, ValueError, tomllib.TOMLDecodeError) as err:
            raise ClipevalError(f"broken library descriptor {entry.name}: {err}") from err
    return found


@dataclass(frozen=True)
class Combined:
    """Several libraries and single prompts evaluated as one library, in this order: how SimpleTuner
    builds its validation set (its built-in library, the user's library, then --validation_prompt)."""

    parts: tuple[str, ...]  # library specs
    extra: tuple[tuple[str, str], ...] = ()  # (name, prompt) after them

    def load(self) -> PromptLibrary:
        libraries = [load_library(part) for part in self.parts]
        rows = [(p.prompt, p.category, p.challenge, p.name) for library in libraries for p in library.prompts]
        rows += [(prompt, "", "", name) for name, prompt in self.extra]
        name = " + ".join([library.name for library in libraries] + [f"{n!r}" for n, _ in self.extra])
        return PromptLibrary(name, f"{name}, evaluated as one library",
                             tuple(Prompt(i, *row) for i, row in enumerate(rows)),
                             tuple(f for library in libraries for f in library.files))


def load_library(spec: "str | Combined") -> PromptLibrary:
    """Resolve ``spec`` (a built-in name, a file path, or a ``Combined``) into a parsed library."""
    if isinstance(spec, Combined):
        return spec.load()
    path = Path(spec).expanduser()
    if path.is_file():
        return load_file(path)
    if path.is_dir():
        raise ClipevalError(f"prompt library {spec} is a folder; give a .tsv/.csv/.jsonl/.json/.txt file")
    descriptors = builtin_descriptors()
    if spec in descriptors:
        return _load_builtin(descriptors[spec])
    if path.suffix.lower().lstrip(".") in FORMATS or "/" in spec or "\\" in spec:
        raise ClipevalError(f"prompt library file not found: {spec}")
    import difflib

    close = difflib.get_close_matches(spec, list(descriptors), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ClipevalError(
        f"unknown prompt library {spec!r}.{hint} Built-in: {', '.join(descriptors)}; or give a file path."
    )


def _load_builtin(desc: Descriptor) -> PromptLibrary:
    from clipeval import fetch

    prompts: list[Prompt] = []
    sources: list[SourceFile] = []
    for spec in desc.files:
        if "url" in spec:
            path = fetch.fetch(spec["name"], spec["url"], spec["sha256"])
            data = path.read_bytes()
        else:
            data = (_library_dir() / spec["name"]).read_bytes()
        for prompt, category, challenge, name in parse_as_described(spec, data):
            prompts.append(Prompt(len(prompts), prompt, category, challenge, name))
        sources.append(SourceFile(spec["name"], hashlib.sha256(data).hexdigest(), spec.get("url", "")))
    if len(prompts) != desc.count:
        raise ClipevalError(f"library {desc.name}: expected {desc.count} prompts, parsed {len(prompts)}")
    return PromptLibrary(desc.name, desc.description, tuple(prompts), tuple(sources))


def parse_as_described(spec: dict[str, Any], data: bytes) -> list["NamedRow"]:
    """The rows of one file of a descriptor, read with the format and columns it names."""
    rows = parse_named(
        data,
        spec.get("format") or format_of(spec["name"]),
        origin=spec["name"],
        prompt_column=spec.get("prompt"),
        category_column=spec.get("category"),
        challenge_column=spec.get("challenge"),
        variable=spec.get("variable", "prompts"),
    )
    constant = spec.get("category_value")
    return [(prompt, constant or category, challenge, name) for prompt, category, challenge, name in rows]


def load_file(path: Path) -> PromptLibrary:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ClipevalError(f"cannot read prompt library {path}: {err.strerror}") from err
    rows = parse_named(data, format_of(path.name), origin=str(path))
    prompts = tuple(Prompt(i, p, c, ch, n) for i, (p, c, ch, n) in enumerate(rows))
    digest = hashlib.sha256(data).hexdigest()
    return PromptLibrary(str(path), f"prompts from {path.name}", prompts, (SourceFile(path.name, digest),))


def format_of(name: str) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ClipevalError(
            f"{name}: unknown prompt file type {('.' + suffix) if suffix else '(no extension)'}; "
            f"use one of {', '.join('.' + f for f in FORMATS)}"
        )
    return suffix


Record = tuple[str, dict[str, Any]]  # (where, fields): "line 12", {"prompt": ..., ...}


NamedRow = tuple[str, str, str, str]  # prompt, category, challenge, name


def parse_named(
    data: bytes,
    fmt: str,
    *,
    origin: str,
    prompt_column: str | None = None,
    category_column: str | None = None,
    challenge_column: str | None = None,
    variable: str = "prompts",
) -> list[NamedRow]:
    """Parse a prompt file's bytes into (prompt, category, challenge, name) rows, the name being a
    {name: prompt} map's key or a ``name`` column; every problem is a ``ClipevalError`` that names
    ``origin``."""
    records = python_dict_records(data, variable, origin) if fmt == PYTHON_DICT else read_records(data, fmt, origin=origin)
    rows = []
    for where, fields in records:
        keys = list(fields)
        picked = (
            pick_column(keys, prompt_column, PROMPT_COLUMNS, f"{origin}: {where}", "prompt"),
            pick_column(keys, category_column, CATEGORY_COLUMNS, origin, "category"),
            pick_column(keys, challenge_column, CHALLENGE_COLUMNS, origin, "challenge"),
            pick_column(keys, None, NAME_COLUMNS, origin, "name"),
        )
        values = [text_field(fields, keys[i], origin, where) if i is not None else "" for i in picked]
        if not values[0].strip():
            raise ClipevalError(f"{origin}: {where}: empty prompt")
        rows.append((values[0], values[1], values[2], values[3]))
    return rows


def python_dict_records(data: bytes, variable: str, origin: str) -> list[Record]:
    """The ``{name: prompt}`` dict literal assigned to ``variable`` at the top level of Python
    source, read with ``ast`` and never executed or imported: only string keys and values are
    accepted, anything else (a call, a name, an f-string, ``__import__``) is refused."""
    import ast

    if len(data) > MAX_PYTHON_BYTES:
        raise ClipevalError(f"{origin}: {len(data)} bytes is too large for a prompt library (at most {MAX_PYTHON_BYTES})")
    text = decode(data, origin)
    try:
        tree = ast.parse(text, filename=origin)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        detail = str(err)  # one line ("msg (file, line n)"); a MemoryError (nesting too deep) has none
        raise ClipevalError(f"{origin}: not valid Python source ({type(err).__name__}{': ' * bool(detail)}{detail})") from err
    found = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == variable for t in targets):
            found = node.value
    if found is None:
        raise ClipevalError(f"{origin}: no top-level assignment to {variable!r}")
    if not isinstance(found, ast.Dict):
        raise ClipevalError(f"{origin}: line {found.lineno}: {variable} is not a dict literal")
    records = []
    for key, value in zip(found.keys, found.values):
        line = (key or value).lineno
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise ClipevalError(f"{origin}: line {line}: {variable} has a key that is not a plain string")
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            raise ClipevalError(f"{origin}: line {value.lineno}: {variable}[{key.value!r}] is not a plain string "
                                f"(a {type(value).__name__}); only literal text is read, nothing is run")
        records.append((f"line {line} ({key.value!r})", {"prompt": value.value, "name": key.value}))
    if not records:
        raise ClipevalError(f"{origin}: {variable} is empty")
    return records


def text_field(fields: dict[str, Any], key: str, origin: str, where: str) -> str:
    value = fields[key]
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ClipevalError(f"{origin}: {where}: field {key!r} is not text")
    return str(value)


def read_records(data: bytes, fmt: str, *, origin: str) -> list[Record]:
    """The rows of a .tsv/.csv/.jsonl/.json/.txt file as dicts, strictly: a row with the wrong
    number of fields, invalid JSON or a non-UTF-8 byte is an error naming file and line."""
    text = decode(data, origin)
    if fmt == "txt":
        records = [(f"line {n}", {"prompt": line}) for n, line in enumerate(_lines(text), 1) if line.strip()]
    elif fmt in ("tsv", "csv"):
        records = _table_records(text, fmt, origin)
    elif fmt == "jsonl":
        records = _jsonl_records(text, origin)
    elif fmt == "json":
        records = _json_records(text, origin)
    else:
        raise ClipevalError(f"{origin}: unknown format {fmt!r}")
    if not records:
        raise ClipevalError(f"{origin}: no prompts in the file")
    return records


def decode(data: bytes, origin: str) -> str:
    """UTF-8 (with or without BOM) or BOM-marked UTF-16; anything else is refused, not guessed."""
    if data.startswith(b"\xef\xbb\xbf"):
        data, encoding = data[3:], "utf-8"
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ClipevalError(
            f"{origin}: not valid {encoding.upper()} (byte {data[err.start]:#04x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from err
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ClipevalError(f"{origin}: line {line}: NUL character (a binary file, or UTF-16 without a BOM?)")
    return text


def _lines(text: str) -> list[str]:
    """Split on LF only (CRLF tolerated): str.splitlines would also split on U+2028 and friends."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def pick_column(header: list[str], wanted: str | None, aliases: Iterable[str], origin: str, what: str) -> int | None:
    if wanted is not None:
        if wanted not in header:
            raise ClipevalError(f"{origin}: no column {wanted!r}; columns are {', '.join(header)}")
        return header.index(wanted)
    lowered = [h.strip().lower() for h in header]
    for alias in aliases:
        if alias in lowered:
            return lowered.index(alias)
    if what == "prompt":
        raise ClipevalError(
            f"{origin}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}); "
            f"columns are {', '.join(repr(h) for h in header) or 'none'}"
        )
    return None


def _table_records(text: str, fmt: str, origin: str) -> list[Record]:
    if fmt == "tsv":
        # TSV has no quoting (Parti's file starts a prompt with a quote that must survive).
        rows = [(n, line.split("\t")) for n, line in enumerate(_lines(text), 1)]
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            rows = []
            for fields in reader:
                rows.append((reader.line_num, fields))
        except csv.Error as err:
            if "field limit" in str(err):  # csv's cap, 128 KiB: no prompt is that long
                raise ClipevalError(f"{origin}: line {reader.line_num}: a field over {csv.field_size_limit()} characters") from err
            raise ClipevalError(f"{origin}: line {reader.line_num}: malformed CSV ({err})") from err
    rows = [(n, fields) for n, fields in rows if fields and any(f.strip() for f in fields)]
    if not rows:
        raise ClipevalError(f"{origin}: empty file (a header row is required)")
    _, header = rows[0]
    records = []
    for n, fields in rows[1:]:
        if len(fields) != len(header):
            raise ClipevalError(
                f"{origin}: line {n}: {len(fields)} fields, the header has {len(header)}"
                + (" (a tab inside a prompt?)" if fmt == "tsv" else "")
            )
        records.append((f"line {n}", dict(zip(header, fields))))
    return records


def _as_record(obj: Any, origin: str, where: str) -> dict[str, Any]:
    if isinstance(obj, str):
        return {"prompt": obj}
    if not isinstance(obj, dict):
        raise ClipevalError(f"{origin}: {where}: expected a string or an object, got {type(obj).__name__}")
    return obj


def _jsonl_records(text: str, origin: str) -> list[Record]:
    records = []
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ClipevalError(f"{origin}: line {n}: invalid JSON ({err.msg})") from err
        records.append((f"line {n}", _as_record(obj, origin, f"line {n}")))
    return records


def _json_records(text: str, origin: str) -> list[Record]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ClipevalError(f"{origin}: invalid JSON at line {err.lineno} ({err.msg})") from err
    if isinstance(obj, dict):
        # {shortname: prompt}, as SimpleTuner's user prompt libraries are written; a value may be an
        # object with its prompt under "prompt", "caption" or "tags" (SimpleTuner's PromptLibraryEntry).
        records = []
        for key, value in obj.items():
            if isinstance(value, dict):
                value = next((value[k] for k in ("prompt", "caption", "tags") if k in value), None)
            if not isinstance(value, str):
                raise ClipevalError(
                    f"{origin}: entry {key!r}: a {{name: prompt}} map needs text values, or objects with a "
                    "\"prompt\" (or \"caption\", \"tags\") text"
                )
            records.append((f"entry {key!r}", {"prompt": value, "name": key}))
        return records
    if isinstance(obj, list):
        return [(f"item {i}", _as_record(o, origin, f"item {i}")) for i, o in enumerate(obj)]
    raise ClipevalError(f"{origin}: expected a JSON list or object, got {type(obj).__name__}")
