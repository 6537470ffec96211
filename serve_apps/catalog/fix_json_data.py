"""The fix-json adapter's data: small tool-call-like JSON objects, broken on purpose, with their repair.

Every example is `{"broken": <text>, "fixed": <json.dumps of the object>}`.
The objects look like the arguments of an agent's tool calls (paths,
commands, URLs, flags, nested options, lists), and the breakage is what
models and people actually produce: a missing closing brace or bracket, a
trailing comma, single quotes, unquoted keys, a missing comma or colon,
Python's True/False/None, a string cut off before its closing quote, prose
or a code fence around the object. About a third of the examples carry two
breakages.

Generation is deterministic (one `random.Random` per split, fixed seeds),
and the files under `serve_apps/data/` are exactly what
`python -m serve_apps.catalog.fix_json_data` writes; a test checks that. The
held-out split uses other seeds and shares no broken text and no fixed
object with the training split.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TRAIN_FILE = DATA_DIR / "fix_json_train.jsonl"
HELDOUT_FILE = DATA_DIR / "fix_json_heldout.jsonl"
TRAIN_SIZE = 480
HELDOUT_SIZE = 100
TRAIN_SEED = 20_260_501
HELDOUT_SEED = 91_730_017

Json = Any  # a value json.dumps accepts: dict, list, str, int, float, bool or None

# -- objects ---------------------------------------------------------------------

_WORDS = (
    "alpha", "build", "cache", "deploy", "error", "fetch", "graph", "index", "job", "kernel", "lint", "merge",
    "notes", "order", "parser", "queue", "report", "schema", "token", "update", "vector", "worker", "config",
    "draft", "event", "metrics", "release", "search", "user", "invoice",
)
_DIRS = ("src", "lib", "tests", "docs", "app", "scripts", "pkg", "internal", "web", "api")
_EXTS = (".py", ".ts", ".go", ".rs", ".md", ".json", ".yaml", ".toml", ".js", ".sql")
_COMMANDS = ("pytest -q", "make build", "npm test", "cargo check", "go vet ./...", "ls -la", "git status",
             "ruff check .", "docker ps", "du -sh .")
_HOSTS = ("api.example.com", "internal.acme.dev", "localhost:8080", "files.example.org", "hooks.test.io")
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
_LABELS = ("bug", "feature", "docs", "urgent", "backend", "frontend", "infra", "good first issue")
_CHANNELS = ("#general", "#deploys", "#alerts", "#random", "#team-core")
_SENTENCES = ("build is green", "please review", "deploy at noon", "tests are flaky", "see the logs",
              "rolling back now", "ready to merge", "needs a rebase", "ship it", "waiting on CI")


def _path(rng: random.Random) -> str:
    parts = [rng.choice(_DIRS) for _ in range(rng.randint(1, 3))]
    return "/".join(parts) + "/" + rng.choice(_WORDS) + rng.choice(_EXTS)


def _small_number(rng: random.Random) -> int | float:
    if rng.random() < 0.25:
        return round(rng.uniform(0.1, 99.9), rng.randint(1, 2))
    return rng.randint(0, 500)


def _scalar(rng: random.Random) -> Json:
    pick = rng.random()
    if pick < 0.35:
        return rng.choice(_WORDS)
    if pick < 0.65:
        return _small_number(rng)
    if pick < 0.9:
        return rng.random() < 0.5
    return None


def _read_file(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {"path": _path(rng)}
    if rng.random() < 0.6:
        start = rng.randint(1, 200)
        obj["start_line"] = start
        obj["end_line"] = start + rng.randint(5, 80)
    if rng.random() < 0.3:
        obj["encoding"] = "utf-8"
    return obj


def _search(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {"query": " ".join(rng.sample(_WORDS, rng.randint(1, 2)))}
    if rng.random() < 0.7:
        obj["paths"] = rng.sample(_DIRS, rng.randint(1, 3))
    obj["case_sensitive"] = rng.random() < 0.5
    if rng.random() < 0.6:
        obj["max_results"] = rng.choice((5, 10, 20, 50, 100))
    return obj


def _run_command(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {"command": rng.choice(_COMMANDS)}
    if rng.random() < 0.5:
        obj["cwd"] = "/" + "/".join(rng.sample(_DIRS, 2))
    obj["timeout"] = rng.choice((10, 30, 60, 120, 2.5, 7.5))
    if rng.random() < 0.4:
        obj["env"] = {rng.choice(("DEBUG", "CI", "LOG_LEVEL", "PORT")): rng.choice(("1", "true", "info", "8000"))}
    return obj


def _http_request(rng: random.Random) -> dict[str, Json]:
    method = rng.choice(_METHODS)
    obj: dict[str, Json] = {"method": method, "url": f"https://{rng.choice(_HOSTS)}/v1/{rng.choice(_WORDS)}"}
    if rng.random() < 0.5:
        obj["headers"] = {"accept": "application/json"}
    if method in ("POST", "PUT", "PATCH"):
        obj["body"] = {rng.choice(_WORDS): _scalar(rng) for _ in range(rng.randint(1, 2))}
    elif rng.random() < 0.3:
        obj["body"] = None
    return obj


def _create_issue(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {"title": f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} fails"}
    obj["labels"] = rng.sample(_LABELS, rng.randint(0, 2))
    obj["assignee"] = rng.choice(_PEOPLE) if rng.random() < 0.6 else None
    if rng.random() < 0.6:
        obj["priority"] = rng.randint(1, 4)
    return obj


def _edit_file(rng: random.Random) -> dict[str, Json]:
    old = rng.choice(_WORDS)
    new = rng.choice([w for w in _WORDS if w != old])
    obj: dict[str, Json] = {"path": _path(rng), "old_text": old, "new_text": new}
    if rng.random() < 0.5:
        obj["replace_all"] = rng.random() < 0.5
    return obj


def _send_message(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {"channel": rng.choice(_CHANNELS), "text": rng.choice(_SENTENCES)}
    if rng.random() < 0.5:
        obj["mentions"] = rng.sample(_PEOPLE, rng.randint(1, 2))
    if rng.random() < 0.5:
        obj["silent"] = rng.random() < 0.5
    return obj


def _query_db(rng: random.Random) -> dict[str, Json]:
    table = rng.choice(_WORDS)
    obj: dict[str, Json] = {"sql": f"select * from {table} where id = ?", "params": [rng.randint(1, 9999)]}
    if rng.random() < 0.6:
        obj["limit"] = rng.choice((1, 10, 25, 100))
    if rng.random() < 0.3:
        obj["readonly"] = True
    return obj


def _schedule(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {
        "name": f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}",
        "cron": f"{rng.randint(0, 59)} {rng.randint(0, 23)} * * {rng.randint(0, 6)}",
        "enabled": rng.random() < 0.7,
    }
    if rng.random() < 0.6:
        obj["retry"] = {"max_attempts": rng.randint(1, 5), "backoff_s": rng.choice((0.5, 1, 2.5, 10))}
    return obj


def _set_config(rng: random.Random) -> dict[str, Json]:
    obj: dict[str, Json] = {"key": f"{rng.choice(_WORDS)}.{rng.choice(_WORDS)}", "value": _scalar(rng)}
    if rng.random() < 0.5:
        obj["scope"] = rng.choice(("user", "project", "global"))
    return obj


def _generic(rng: random.Random) -> dict[str, Json]:
    keys = rng.sample(_WORDS, rng.randint(2, 4))
    obj: dict[str, Json] = {}
    for key in keys:
        pick = rng.random()
        if pick < 0.6:
            obj[key] = _scalar(rng)
        elif pick < 0.8:
            obj[key] = [_scalar(rng) for _ in range(rng.randint(1, 3))]
        else:
            obj[key] = {rng.choice(_WORDS): _scalar(rng)}
    return obj


_TOOLS: tuple[Callable[[random.Random], dict[str, Json]], ...] = (
    _read_file, _search, _run_command, _http_request, _create_issue, _edit_file, _send_message, _query_db,
    _schedule, _set_config, _generic,
)


def make_object(rng: random.Random) -> dict[str, Json]:
    return rng.choice(_TOOLS)(rng)


# -- rendering with faults ---------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How to write an object out, faults included; indices count commas/containers/colons in writing order."""

    compact: bool = False
    quote: str = '"'
    bare_keys: bool = False
    python_literals: bool = False
    trailing_comma_at: int | None = None  # container index (objects and arrays, pre-order)
    drop_comma_at: int | None = None  # separator index
    drop_colon_at: int | None = None  # key index


class _Writer:
    def __init__(self, style: Style) -> None:
        self.style = style
        self.commas = 0
        self.containers = 0
        self.colons = 0

    def write(self, value: Json) -> str:
        s = self.style
        if isinstance(value, dict):
            index = self.containers
            self.containers += 1
            members = []
            for key, item in value.items():
                colon_index = self.colons
                self.colons += 1
                name = key if s.bare_keys else self._string(key)
                colon = "" if colon_index == s.drop_colon_at else (":" if s.compact else ": ")
                sep = " " if colon == "" else ""
                members.append(name + colon + sep + self.write(item))
            return "{" + self._join(members) + self._trailing(index, members) + "}"
        if isinstance(value, list):
            index = self.containers
            self.containers += 1
            items = [self.write(item) for item in value]
            return "[" + self._join(items) + self._trailing(index, items) + "]"
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, bool):
            if s.python_literals:
                return "True" if value else "False"
            return "true" if value else "false"
        if value is None:
            return "None" if s.python_literals else "null"
        return json.dumps(value)

    def _string(self, text: str) -> str:
        if self.style.quote == "'":
            return "'" + text + "'"
        return json.dumps(text)

    def _join(self, parts: Sequence[str]) -> str:
        out = ""
        for i, part in enumerate(parts):
            if i:
                index = self.commas
                self.commas += 1
                if index == self.style.drop_comma_at:
                    out += " "
                else:
                    out += "," if self.style.compact else ", "
            out += part
        return out

    def _trailing(self, index: int, parts: Sequence[str]) -> str:
        return "," if parts and index == self.style.trailing_comma_at else ""


def render(value: Json, style: Style) -> str:
    return _Writer(style).write(value)


def _counts(value: Json) -> _Writer:
    writer = _Writer(Style())
    writer.write(value)
    return writer


def _has_literal(value: Json) -> bool:
    if isinstance(value, dict):
        return any(_has_literal(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_literal(v) for v in value)
    return value is None or isinstance(value, bool)


def _strings(value: Json) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(s for v in value.values() for s in _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


# Faults applied while writing (they combine freely) ...
def _f_single_quotes(rng: random.Random, obj: Json, style: Style) -> Style | None:
    if any("'" in s or '"' in s or "\\" in s for s in _strings(obj)):
        return None
    return replace(style, quote="'")


def _f_bare_keys(rng: random.Random, obj: Json, style: Style) -> Style | None:
    if not all(k.isidentifier() for k in _keys(obj)):
        return None
    return replace(style, bare_keys=True)


def _f_python_literals(rng: random.Random, obj: Json, style: Style) -> Style | None:
    return replace(style, python_literals=True) if _has_literal(obj) else None


def _f_trailing_comma(rng: random.Random, obj: Json, style: Style) -> Style | None:
    return replace(style, trailing_comma_at=rng.randrange(_counts(obj).containers))


def _f_drop_comma(rng: random.Random, obj: Json, style: Style) -> Style | None:
    commas = _counts(obj).commas
    return replace(style, drop_comma_at=rng.randrange(commas)) if commas else None


def _f_drop_colon(rng: random.Random, obj: Json, style: Style) -> Style | None:
    return replace(style, drop_colon_at=rng.randrange(_counts(obj).colons))


def _keys(value: Json) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in _keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


_STYLE_FAULTS: dict[str, Callable[[random.Random, Json, Style], Style | None]] = {
    "single_quotes": _f_single_quotes,
    "unquoted_keys": _f_bare_keys,
    "python_literals": _f_python_literals,
    "trailing_comma": _f_trailing_comma,
    "missing_comma": _f_drop_comma,
    "missing_colon": _f_drop_colon,
}


# ... and faults applied to the written text.
def _t_missing_close(rng: random.Random, obj: Json, text: str) -> str | None:
    # Drop the closing brackets at the end (one, or all of them).
    closers = len(text) - len(text.rstrip("}]"))
    drop = 1 if closers == 1 or rng.random() < 0.6 else closers
    return text[: len(text) - drop]


def _t_truncated_string(rng: random.Random, obj: Json, text: str) -> str | None:
    # The output stopped inside the last string value: its closing quote and brackets are gone.
    stripped = text.rstrip("}]")
    if not stripped.endswith(('"', "'")):
        return None
    return stripped[:-1]


_PREFIXES = ("Here is the JSON:\n", "Sure! ", "```json\n", "Output: ", "arguments = ", "Result:\n")
_SUFFIXES = (" Let me know if you need anything else.", "\n\nDone.", " // end", "\n")


def _t_stray_text(rng: random.Random, obj: Json, text: str) -> str | None:
    prefix = rng.choice(_PREFIXES)
    suffix = "\n```" if prefix == "```json\n" else (rng.choice(_SUFFIXES) if rng.random() < 0.6 else "")
    return prefix + text + suffix


_TEXT_FAULTS: dict[str, Callable[[random.Random, Json, str], str | None]] = {
    "missing_close": _t_missing_close,
    "truncated_string": _t_truncated_string,
}

FAULTS = (*_STYLE_FAULTS, *_TEXT_FAULTS, "stray_text")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def break_object(rng: random.Random, obj: Json) -> tuple[str, list[str]] | None:
    """A broken rendering of `obj` and the faults in it, or None when the faults drawn do not apply."""
    count = 2 if rng.random() < 0.35 else 1
    names = rng.sample(FAULTS, count)
    style = Style(compact=rng.random() < 0.2)
    for name in names:
        if name in _STYLE_FAULTS:
            changed = _STYLE_FAULTS[name](rng, obj, style)
            if changed is None:
                return None
            style = changed
    text = render(obj, style)
    for name in names:
        if name in _TEXT_FAULTS:
            cut = _TEXT_FAULTS[name](rng, obj, text)
            if cut is None:
                return None
            text = cut
    if "stray_text" in names:
        stray = _t_stray_text(rng, obj, text)
        assert stray is not None
        text = stray
    if _parses(text):
        # A fault that left valid JSON (e.g. stray whitespace only) teaches nothing.
        return None
    return text, sorted(names)


def generate(size: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """`size` examples: {"broken", "fixed", "faults"}; objects whose fixed form is in `exclude` are skipped."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[str] = set(exclude)
    while len(out) < size:
        obj = make_object(rng)
        fixed = json.dumps(obj)
        if fixed in seen:
            continue
        broken = break_object(rng, obj)
        if broken is None:
            continue
        seen.add(fixed)
        text, faults = broken
        out.append({"broken": text, "fixed": fixed, "faults": "+".join(faults)})
    return out


def splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out): disjoint in fixed objects, hence in broken texts too."""
    train = generate(TRAIN_SIZE, TRAIN_SEED)
    heldout = generate(HELDOUT_SIZE, HELDOUT_SEED, exclude=frozenset(e["fixed"] for e in train))
    return train, heldout


def to_jsonl(examples: Sequence[dict[str, str]]) -> str:
    return "".join(json.dumps(e, sort_keys=True) + "\n" for e in examples)


def load(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    train, heldout = splits()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    TRAIN_FILE.write_text(to_jsonl(train))
    HELDOUT_FILE.write_text(to_jsonl(heldout))
    print(f"{len(train)} training examples -> {TRAIN_FILE}", file=sys.stderr)
    print(f"{len(heldout)} held-out examples -> {HELDOUT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
