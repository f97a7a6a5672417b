"""Read instruction data as a stream and say exactly what is wrong with it.

Two record shapes are accepted, one JSON object per line (or elements of one JSON array):
  {"instruction": str, "input": str (optional, null = ""), "output": str,
   "system": str (optional), "history": [[user, assistant], ...] (optional)}
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "system": str (optional)}
An assistant message may carry `"weight": 0` (axolotl's "do not train this turn": kept in the prompt,
left out of the loss) or 1.
`system` and `history` are LLaMA-Factory's extension of the Alpaca format: a system prompt and the
earlier turns of the conversation. Every defect becomes an `Issue` naming file, line, field and
reason, so that a user fixes the whole file in one pass instead of one error per run. Lines are
read as bytes one at a time: memory does not grow with the file. What a file holds is decided
first (`file_kinds.sniff`): a compressed, binary or differently encoded file is one message.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from lora_cli.errors import LoraCliError

IssueSink = Callable[[str, str], None]  # (field, message): one defect of the record being parsed
ROLES = ("system", "user", "assistant")
FIELDS = ("instruction", "input", "output")
# Keys that people often use instead of ours; named in the error to save a round trip.
ALIASES = {"output": ("response", "answer", "completion", "target"), "instruction": ("prompt", "question", "query"),
           "system": ("system_prompt", "system_message"), "history": ("chat_history", "conversation_history"),
           "messages": ("conversations", "conversation", "dialog", "chat")}
KNOWN = ("instruction", "input", "output", "messages", "system", "history")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what a \ud83d escape alone decodes to: not encodable as UTF-8


@dataclass(frozen=True)
class Issue:
    file: str
    line: int
    field: str
    reason: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        what = f" [{self.field}]" if self.field else ""
        return f"{where}{what}: {self.reason}"


def error_lines(issues: list[Issue]) -> list[int]:
    """The lines that hold an error, each once and in order (a record with two defects is one invalid line)."""
    return sorted({i.line for i in issues if i.severity == "error"})


@dataclass
class Example:
    """One valid record. `messages` is set for chat records, the three fields otherwise."""

    line: int
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: list[dict] | None = None
    system: str = ""  # instruction records: the system prompt ("" for none)
    history: list[tuple[str, str]] = field(default_factory=list)  # instruction records: earlier (user, assistant) turns

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def identity(self) -> str:
        """Text that equal records share: what duplicate detection compares."""
        if self.messages is not None:
            return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)
        extra = [self.system, [list(turn) for turn in self.history]] if (self.system or self.history) else []
        return json.dumps([self.instruction, self.input, self.output, *extra], ensure_ascii=False)

    def char_length(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        earlier = len(self.system) + sum(len(u) + len(a) for u, a in self.history)
        return len(self.instruction) + len(self.input) + len(self.output) + earlier


def open_data_file(path: str | Path) -> BinaryIO:
    """The data file opened for binary reading, or a message saying why it cannot be."""
    path = Path(path)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise LoraCliError(f"Data file {path} does not exist.") from None
    except IsADirectoryError:
        raise LoraCliError(f"Data file {path} is a folder, not a JSONL file.") from None
    except OSError as exc:
        raise LoraCliError(f"Cannot read data file {path}: {exc.strerror or exc}.") from None


def open_lines(path: str | Path, cr_only: bool = False) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes without line ending) for each line; a UTF-8 BOM that opens a line is
    dropped (files each saved with a BOM and then concatenated hold one on each file's first line).

    `cr_only`: the lines end in a carriage return alone (classic Mac OS, some exporters), read as
    CRLF and LF line ends are."""
    with open_data_file(path) as fh:
        for number, raw in enumerate(_cr_lines(fh) if cr_only else fh, start=1):
            yield number, raw.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")


def _cr_lines(fh: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary file whose lines end in CR, in bounded memory."""
    rest = b""
    while block := fh.read(chunk):
        *lines, rest = (rest + block).split(b"\r")
        yield from lines
    if rest:
        yield rest


@dataclass(frozen=True)
class Element:
    """One element of a JSON array file, already parsed."""

    value: Any  # whatever json.loads gives: a record is checked to be an object by parse_value


def read_units(path: str | Path) -> Iterator[tuple[int, "bytes | Element | Issue"]]:
    """What every reader of data files goes through: (line, unit) where a unit is a JSON Lines line
    (bytes), an element of a JSON array file, or an Issue that ends the file (a JSON array that stops
    being valid JSON). A file that is neither raises NotJsonLines, saying what it is."""
    from lora_cli.data.file_kinds import JSON_ARRAY, JSONL_CR, SAMPLE, sniff
    from lora_cli.data.json_array import ArrayReadError, iter_json_array

    path = Path(path)
    with open_data_file(path) as fh:
        try:
            kind = sniff(path, fh.read(SAMPLE))
        except OSError as exc:
            raise LoraCliError(f"Cannot read data file {path}: {exc.strerror or exc}.") from None
        if kind == JSON_ARRAY:
            fh.seek(0)
            try:
                for line, value in iter_json_array(fh):
                    yield line, Element(value)
            except ArrayReadError as exc:
                yield exc.line, Issue(str(path), exc.line, "", exc.reason)
            return
    yield from open_lines(path, cr_only=kind == JSONL_CR)


def _string_field(obj: dict[str, Any], key: str, issue: IssueSink, *, optional: bool) -> str | None:
    value = obj.get(key)
    if value is None and optional:  # absent or null
        return ""
    if key not in obj:
        alias = _found_instead(obj, key)
        problem = f"missing field '{key}'" + (f" (found '{alias}': rename it to '{key}')" if alias else "")
    else:
        problem = (f"'{key}' is null; it must be a non-empty string" if value is None else
                   f"'{key}' must be a string, not {type(value).__name__}" if not isinstance(value, str) else
                   f"'{key}' holds an invalid unicode escape (a lone surrogate)" if LONE_SURROGATE.search(value) else
                   f"'{key}' is blank" if not optional and not value.strip() else None)
    if problem:
        issue(key, problem)
        return None
    return value


def _parse_messages(value: Any, issue: IssueSink, answers: bool = True) -> list[dict[str, Any]] | None:
    """The checked messages, or None. answers=False (prompts to answer): a conversation may end with the
    user's turn, held with a blank assistant message after it (the answer to generate)."""
    if not isinstance(value, list) or not value:
        issue("messages", "'messages' must be a non-empty list of {role, content} objects")
        return None
    found: list[str] = []  # the fields with a defect: once there is one, the record is invalid

    def bad(where: str, reason: str) -> None:
        found.append(where)
        issue(where, reason)

    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            bad(where, f"each message must be an object, not {type(msg).__name__}")
            continue
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            bad(f"{where}.role", f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            bad(f"{where}.content", "content must be a string" + (" (missing)" if "content" not in msg else ""))
        elif LONE_SURROGATE.search(content):
            bad(f"{where}.content", "content holds an invalid unicode escape (a lone surrogate)")
        elif role == "assistant" and not content.strip():
            bad(f"{where}.content", "assistant content is blank")
        weight = msg.get("weight", 1)
        if "weight" in msg and (role != "assistant" or isinstance(weight, bool) or weight not in (0, 1)):
            bad(f"{where}.weight", "weight must be 0 (do not train this turn) or 1, on an assistant message; "
                                   f"not {weight!r}" + ("" if role == "assistant" else f" on a {role} message"))
        if not found:
            out.append({"role": role, "content": content, **({"weight": 0} if weight == 0 else {})})
    if not found and not answers and out[-1]["role"] != "assistant":
        return [*out, {"role": "assistant", "content": ""}]
    if not found and not any(m["role"] == "assistant" for m in out):
        bad("messages", "no assistant message: there is nothing to learn from this record")
    if not found and all(m.get("weight") == 0 for m in out if m["role"] == "assistant"):
        bad("messages", "every assistant message has weight 0: there is nothing to learn from this record")
    if not found and out[-1]["role"] != "assistant":
        bad("messages", "the last message must be the assistant's")
    return None if found else out


def parse_line(raw: bytes, number: int, file: str, answers: bool = True) -> tuple[Example | None, list[Issue]]:
    """Parse one raw line into an Example, or None with the reasons it is invalid (`answers`: see parse_value)."""
    def invalid(reason: str) -> tuple[None, list[Issue]]:
        return None, [Issue(file, number, "", reason)]

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = " ".join(f"{b:02x}" for b in raw[exc.start: exc.start + 4])
        return invalid(f"invalid UTF-8 at byte {exc.start + 1} of the line (bytes {shown}): this line is not UTF-8 text")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return invalid(f"invalid JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return invalid("invalid JSON: nested too deeply")
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (CPython's int-parsing limit)
        return invalid(f"invalid JSON: {exc}")
    return parse_value(obj, number, file, answers)


def parse_value(obj: Any, number: int, file: str, answers: bool = True) -> tuple[Example | None, list[Issue]]:
    """Validate one parsed record (a JSON Lines line or a JSON array's element). answers=False: prompts
    to answer, whose 'output' (the reference answer) may be absent, read as ""."""
    issues: list[Issue] = []

    def issue(fld: str, reason: str) -> None:
        issues.append(Issue(file, number, fld, reason))

    if not isinstance(obj, dict):
        issue("", f"expected a JSON object, got {type(obj).__name__}")
        return None, issues
    if "messages" in obj or ("instruction" not in obj and _found_instead(obj, "messages")):
        example = _chat_record(obj, number, issue, answers)
    else:
        values = {k: _string_field(obj, k, issue, optional=(k == "input" or (k == "output" and not answers))) for k in FIELDS}
        system = _string_field(obj, "system", issue, optional=True)
        history = _parse_history(obj.get("history"), issue)
        example = None if issues else Example(number, **values, system=system.strip() and system, history=history)
    if example is not None:
        issues.extend(_lookalike_warnings(obj, file, number))
    return example, issues


def _chat_record(obj: dict[str, Any], number: int, issue: IssueSink, answers: bool = True) -> Example | None:
    if "messages" not in obj:
        found = _found_instead(obj, "messages")
        issue("messages", f"missing field 'messages' (found '{found}': rename it to 'messages', with "
                          "{role, content} objects) or fields 'instruction' and 'output'")
        return None
    messages = _parse_messages(obj["messages"], issue, answers)
    system = _string_field(obj, "system", issue, optional=True)
    if obj.get("history") is not None:
        issue("history", "'history' belongs to instruction records; a chat record holds its earlier turns in 'messages'")
        return None
    if messages is None or system is None:
        return None
    if system.strip():
        if any(m["role"] == "system" for m in messages):
            issue("system", "the record has both a 'system' field and a system message; keep one")
            return None
        messages = [{"role": "system", "content": system}, *messages]
    return Example(number, messages=messages)


def _parse_history(value: Any, issue: IssueSink) -> list[tuple[str, str]]:
    """LLaMA-Factory's `history`: earlier turns as [[user, assistant], ...]; null or absent: none."""
    if value is None:
        return []
    if not isinstance(value, list):
        issue("history", f"'history' must be a list of [user, assistant] pairs, not {type(value).__name__}")
        return []
    ok = True
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            shown = f"a list of {len(pair)}" if isinstance(pair, list) else type(pair).__name__
            issue(f"history[{i}]", f"each history turn must be a [user, assistant] pair of strings, not {shown}")
            ok = False
            continue
        for j, (text, who) in enumerate(zip(pair, ("user", "assistant"))):
            problem = (f"must be a string, not {type(text).__name__}" if not isinstance(text, str) else
                       "holds an invalid unicode escape (a lone surrogate)" if LONE_SURROGATE.search(text) else
                       "is blank" if who == "assistant" and not text.strip() else None)
            if problem:
                issue(f"history[{i}][{j}]", f"the {who} text {problem}")
                ok = False
    return [(user, answer) for user, answer in value] if ok else []


def _looks_like(key: str, name: str) -> float:
    """How much `key` (not a field lora-cli reads) looks like field `name`: 1 for another case or
    a common alias, difflib's similarity for a misspelling, 0 below 0.8."""
    lowered = key.lower()
    if lowered == name or key in ALIASES.get(name, ()):
        return 1.0
    ratio = difflib.SequenceMatcher(None, lowered, name).ratio()
    return ratio if ratio >= 0.8 else 0.0


def _found_instead(obj: dict, name: str) -> str | None:
    """A key of the record that is probably `name` under another spelling."""
    scored = [(_looks_like(k, name), k) for k in obj if isinstance(k, str) and k not in KNOWN]
    best = max(scored, default=(0.0, None))
    return best[1] if best[0] else None


def _lookalike_warnings(obj: dict, file: str, number: int) -> list[Issue]:
    """Unknown fields are ignored; one that looks like a field lora-cli reads gets a warning. (Beside
    an instruction and an output, 'response' or 'prompt' is taken for metadata, not a misspelling.)"""
    out = []
    for key in obj:
        if not isinstance(key, str) or key in KNOWN:
            continue
        scored = [(_looks_like(key, name), name) for name in KNOWN
                  if not (name in ("instruction", "output") and key in ALIASES[name])]
        score, name = max(scored)
        if score:
            out.append(Issue(file, number, key, f"field '{key}' is ignored: did you mean '{name}'? (later lines with "
                                                f"'{key}' are not listed)", "warning"))
    return out


@dataclass
class ScanStats:
    """Counts gathered while streaming a file (records: valid or invalid, blank lines left out)."""

    records: int = 0
    valid: int = 0
    chat: int = 0

    def count(self, example: Example | None) -> None:
        self.records += 1
        self.valid += example is not None
        self.chat += example is not None and example.is_chat


def iter_examples(path: str | Path, on_issue: Callable[[Issue], None], stats: ScanStats | None = None,
                  answers: bool = True) -> Iterator[Example]:
    """Yield valid examples; report each defect through `on_issue(Issue)`. Blank lines are skipped.
    answers=False: prompts to answer, the answer ('output') optional (parse_value).

    A warning about a look-alike field is reported for the first line that has it, not for every one."""
    path = Path(path)
    name, warned = str(path), set[str]()
    for number, unit in read_units(path):
        if isinstance(unit, Issue):
            example, issues = None, [unit]
        elif isinstance(unit, Element):
            example, issues = parse_value(unit.value, number, name, answers)
        elif not unit.strip():
            continue
        else:
            example, issues = parse_line(unit, number, name, answers)
        issues = [i for i in issues if i.severity == "error" or i.field not in warned]
        warned.update(i.field for i in issues if i.severity == "warning")
        if stats is not None:
            stats.count(example)
        for item in issues:
            on_issue(item)
        if example is not None:
            yield example
