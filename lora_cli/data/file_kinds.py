"""What a data file holds, told from its first megabyte, before any line is parsed.

lora-cli reads JSON Lines (UTF-8, one JSON object a line) and a JSON array of records
(`json_array.py`). Files that people hand it by mistake -- compressed or binary files, text in
UTF-16/32 or a legacy 8-bit encoding, pretty-printed JSON, CSV or plain text -- are named in one
`NotJsonLines` message with the command that converts them, instead of one error per line.

Another encoding or one bad line? A file is judged to be in another encoding (cp1252, GBK, ...)
when at least two lines of the sample are not UTF-8 and no line of it holds UTF-8 text beyond
ASCII: a converter fixes such a file as a whole. The encoding is named only when charset-normalizer
tells it with confidence; otherwise the message shows the bytes where UTF-8 fails. A line that is not UTF-8 among lines
that are (or a single such line) is a defect of that record, reported on its line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import chain, count
from pathlib import Path

from lora_cli.errors import LoraCliError

SAMPLE = 1 << 20  # bytes read to decide
JSONL, JSON_ARRAY = "jsonl", "json-array"
JSONL_CR = "jsonl-cr"  # JSON Lines whose lines end in a carriage return alone (read as CRLF is)
TEXT_LINES = 20  # non-blank lines looked at for "is any of this JSON at all?"
NOT_JSONL = "not JSON Lines (UTF-8 text, one JSON object per line)"
# Bytes that text does not hold (C0 controls but tab, line feed, vertical tab, form feed, carriage
# return and escape): more than 1% of them in the sample is a binary file.
_TEXT_BYTES = bytes(b for b in range(256) if b >= 0x20 or b in (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B))

_PYARROW_ROWS = ("python -c \"import json, sys, {mod}; [print(json.dumps(r, ensure_ascii=False)) "
                 "for r in {reader}(sys.argv[1]){tail}.to_pylist()]\" {path} > {out}")
_CSV_ROWS = ("python -c \"import csv, json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in "
             "csv.DictReader(open(sys.argv[1], newline='', encoding='utf-8'){delim})]\" {path} > {out}")


class NotJsonLines(LoraCliError):
    """The file is neither JSON Lines nor a JSON array: `what` it is, and in `hint` how to convert it."""

    def __init__(self, path: Path, what: str, hint: str):
        super().__init__(f"{path} is {what}, {NOT_JSONL}.", hint)
        self.path, self.what = path, what


def _out_name(path: Path) -> str:
    """Where a conversion should write: beside the input, the name without its compression/format
    suffix, as .jsonl (a hint that wrote into the current folder would scatter a user's data). Never
    a file that exists: following the hint must not overwrite the user's data (clean.jsonl.gz beside
    clean.jsonl gives clean.converted.jsonl, then clean.converted-2.jsonl, ...)."""
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".parquet", ".arrow", ".feather", ".csv", ".tsv",
                   ".json", ".jsonl", ".txt"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    candidates = chain([name + ".jsonl", name + ".converted.jsonl"], (f"{name}.converted-{n}.jsonl" for n in count(2)))
    return str(path.with_name(next(c for c in candidates if c != path.name and not path.with_name(c).exists())))


def _pyarrow(mod: str, reader: str, tail: str = "") -> Callable[[str, str], str]:  # hint(path, out)
    return lambda p, o: "Convert it to JSON Lines: " + _PYARROW_ROWS.format(mod=mod, reader=reader, tail=tail,
                                                                           path=p, out=o)


# (magic bytes, offset, what it is, hint(path, out))
_MAGIC = [
    (b"\x1f\x8b", 0, "a gzip-compressed file", lambda p, o: f"Decompress it first: gzip -dc {p} > {o}"),
    (b"BZh", 0, "a bzip2-compressed file", lambda p, o: f"Decompress it first: bzip2 -dc {p} > {o}"),
    (b"\xfd7zXZ\x00", 0, "an xz-compressed file", lambda p, o: f"Decompress it first: xz -dc {p} > {o}"),
    (b"\x28\xb5\x2f\xfd", 0, "a zstd-compressed file", lambda p, o: f"Decompress it first: zstd -dc {p} > {o}"),
    (b"PK\x03\x04", 0, "a zip archive", lambda p, o: f"Unpack it (unzip {p}) and pass the JSONL file inside."),
    (b"PK\x05\x06", 0, "an empty zip archive", lambda p, o: "It holds no files."),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive", lambda p, o: f"Unpack it (7z x {p}) and pass the JSONL file inside."),
    (b"ustar", 257, "a tar archive", lambda p, o: f"Unpack it (tar -xf {p}) and pass the JSONL file inside."),
    (b"PAR1", 0, "a Parquet file", _pyarrow("pyarrow.parquet", "pyarrow.parquet.read_table")),
    (b"ARROW1", 0, "an Arrow IPC (Feather v2) file", _pyarrow("pyarrow.feather", "pyarrow.feather.read_table")),
    (b"\xff\xff\xff\xff", 0, "an Arrow stream file (what datasets' save_to_disk writes)",
     _pyarrow("pyarrow", "pyarrow.ipc.open_stream", ".read_all()")),
    (b"FEA1", 0, "a Feather (v1) file", _pyarrow("pyarrow.feather", "pyarrow.feather.read_table")),
    (b"SQLite format 3\x00", 0, "an SQLite database", lambda p, o: "Export the table as JSON Lines first."),
    (b"\x93NUMPY", 0, "a NumPy array file", lambda p, o: "Write the records as JSON Lines first."),
    (b"\x89HDF\r\n\x1a\n", 0, "an HDF5 file", lambda p, o: "Export the records as JSON Lines first."),
    (b"%PDF-", 0, "a PDF document", lambda p, o: "Extract the records as JSON Lines first."),
]
_PICKLE = re.compile(rb"\A\x80[\x02-\x05]")
_BOMS = [(b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe", "UTF-16LE"),
         (b"\xfe\xff", "UTF-16BE")]
# {"version": 1, "data": [{...: the records in a list under one key, after any scalar members
_SCALAR = r'(?:"[^"\\]*"|-?\d[\d.eE+-]*|true|false|null)'
_WRAPPED = re.compile(r'\A\s*\{(?:\s*"[^"\\]{1,64}"\s*:\s*' + _SCALAR + r'\s*,)*\s*"([^"\\]{1,64})"\s*:\s*\[\s*[{\]]')
_RECORD_KEYS = ("instruction", "output", "messages", "conversations")


def sniff(path: str | Path, head: bytes) -> str:
    """JSONL or JSON_ARRAY for a file lora-cli reads; a NotJsonLines for anything else.

    `head` is the file's first SAMPLE bytes (the whole file when it is smaller)."""
    path = Path(path)
    out = _out_name(path)
    for magic, offset, what, hint in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            raise NotJsonLines(path, what, hint(path, out))
    if _PICKLE.match(head):
        raise NotJsonLines(path, "a Python pickle", "Write the records as JSON Lines first (lora-cli never unpickles).")
    _check_wide_text(path, head, out)
    _check_legacy_encoding(path, head, out)
    text = head.decode("utf-8-sig", errors="replace")  # a byte-order mark dropped
    kind = _structure(path, text, out, whole=len(head) < SAMPLE)
    return JSONL_CR if kind == JSONL and b"\r" in head.rstrip(b"\r") and b"\n" not in head else kind


def _check_wide_text(path: Path, head: bytes, out: str) -> None:
    """UTF-16/32 (with or without a byte-order mark), or binary data: NUL bytes in the sample."""
    for bom, codec in _BOMS:
        if head.startswith(bom):
            raise NotJsonLines(path, f"{codec[:6]} text ({_endian(codec)}, with a byte-order mark)",
                               _iconv(codec[:6], path, out))
    nuls = head.count(0)
    for codec in _wide_candidates(head, nuls) if nuls else ():
        if _decodes_as_text(head, codec):
            raise NotJsonLines(path, f"{codec[:6]} text ({_endian(codec)}, without a byte-order mark)",
                               _iconv(codec, path, out))
    if len(head.translate(None, _TEXT_BYTES)) * 100 > len(head):  # a stray byte or two: a defect of their line
        raise NotJsonLines(path, "a binary file (it holds bytes that text does not)",
                           "lora-cli reads UTF-8 text, one JSON object per line; write the records in that form.")


def _endian(codec: str) -> str:
    return "little-endian" if codec.endswith("LE") else "big-endian"


def _wide_candidates(head: bytes, nuls: int) -> list[str]:
    """Encodings whose pattern of NUL bytes the sample shows: JSON's ASCII punctuation and keys put
    a NUL beside (UTF-16) or three NULs around (UTF-32) each of their characters, all on one side."""
    if nuls * 50 < len(head):  # under 2%: a stray NUL in text, not a wide encoding
        return []
    odd = head[1::2].count(0)
    found = ["UTF-32LE", "UTF-32BE"] if nuls * 5 >= 2 * len(head) else []
    if odd >= 0.9 * nuls:
        found.append("UTF-16LE")
    if nuls - odd >= 0.9 * nuls:
        found.append("UTF-16BE")
    return found


def _decodes_as_text(head: bytes, codec: str) -> bool:
    import codecs

    try:
        text = codecs.getincrementaldecoder(codec)().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    if not text or "\x00" in text:
        return False
    printable = sum(1 for ch in text if ch.isprintable() or ch in "\r\n\t")
    return printable >= 0.95 * len(text)


def _iconv(codec: str, path: Path, out: str) -> str:
    note = " (what Windows PowerShell's > and Out-File write)" if codec in ("UTF-16", "UTF-16LE") else ""
    return f"Convert it to UTF-8{note}: iconv -f {codec} -t UTF-8 {path} > {out}"


def _check_legacy_encoding(path: Path, head: bytes, out: str) -> None:
    """Two or more lines that are not UTF-8, and none that holds UTF-8 beyond ASCII: a legacy encoding."""
    lines = head.split(b"\n")
    if len(head) >= SAMPLE:
        lines = lines[:-1]  # the last one may be cut in the middle of a character
    beyond_ascii = [(number, raw) for number, raw in enumerate(lines, start=1) if not raw.isascii()]
    bad = [(number, raw, exc) for number, raw in beyond_ascii if (exc := _utf8_error(raw))]
    if len(bad) >= 2 and len(bad) == len(beyond_ascii):
        codec = _confident_encoding(b"\n".join(lines))
        sampled = sum(1 for ln in lines if ln)
        what = f"({len(bad)} of its first {sampled} lines are not UTF-8, and none holds UTF-8 text beyond ASCII)"
        if codec:
            raise NotJsonLines(path, f"text in the {codec} encoding {what}", _iconv(codec, path, out))
        line, raw, exc = bad[0]  # where UTF-8 decoding first fails, and the bytes there
        raise NotJsonLines(
            path, f"text that is not UTF-8 {what}; its encoding cannot be told with confidence (line {line}, "
                  f"byte {exc.start + 1}: {' '.join(f'{b:02x}' for b in raw[exc.start: exc.start + 8])})",
            f"Convert it to UTF-8 from the encoding it was written in: iconv -f ENCODING -t UTF-8 {path} > {out}   "
            "(ENCODING e.g. CP1252 for Western European text, GBK for Chinese, SHIFT_JIS for Japanese, CP1251 "
            "for Cyrillic); check the converted text before training on it")


def _utf8_error(raw: bytes) -> UnicodeDecodeError | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc
    return None


# Python codec names as iconv spells them, where the two differ by more than case and "_" for "-"
_ICONV_NAMES = {"gb18030": "GB18030", "gbk": "GBK", "gb2312": "GB2312", "shift_jis": "SHIFT_JIS",
                "cp932": "CP932", "euc_jp": "EUC-JP", "euc_kr": "EUC-KR", "big5": "BIG5", "latin_1": "LATIN1"}


def _confident_encoding(sample: bytes) -> str | None:
    """The encoding of a text that is not UTF-8, as iconv names it, when the detection is confident:
    charset-normalizer's candidates that read the sample without noise all give the same text
    (cp1250, cp1252 and cp1254 agree on most Western text: CP1252 is named). None otherwise: a
    wrong guess would be converted into text that reads as clean and trains as garbage."""
    from charset_normalizer import from_bytes

    results = list(from_bytes(sample))
    if not results:
        return None
    best = results[0]
    close = [r for r in results if r.chaos <= best.chaos + 0.02]
    texts = {sample.decode(r.encoding, errors="replace") for r in close}
    if best.chaos > 0.1 or len(texts) != 1:
        return None
    names = [n for r in close for n in r.could_be_from_charset]
    preferred = next((n for n in ("cp1252", "gbk", "shift_jis", "cp1251") if n in names), best.encoding)
    return _ICONV_NAMES.get(preferred, preferred.upper().replace("_", "-").replace("ISO8859", "ISO-8859"))


def _structure(path: Path, text: str, out: str, whole: bool) -> str:
    """UTF-8 text: JSON Lines, a JSON array, or JSON of another shape (pretty-printed, wrapped, CSV)."""
    lines = [ln.strip() for ln in text.splitlines()]
    if not whole:
        if len(lines) < 2:  # a first line longer than the sample: read it as what it starts as
            return JSON_ARRAY if text.lstrip().startswith("[") else JSONL
        lines = lines[:-1]  # cut at the sample's end
    content = [ln for ln in lines if ln]
    if not content:
        return JSONL
    first = content[0]
    if first.startswith("["):
        more_lines = len(content) > 1 and content[1][:1] in "{["
        return JSONL if (more_lines and _is_json(first)) else JSON_ARRAY
    if first.startswith("{"):
        if _is_json(first):
            if len(content) == 1 and whole:  # one line holding everything: a wrapper, or one record
                _check_wrapped_line(path, first, out)
            return JSONL
        _check_python_literals(path, first, out)
        _check_multiline_object(path, text, first, out)
        return JSONL  # a JSONL file whose first line is broken: that line's error says so
    _check_delimited(path, text, out, whole)
    if not any(ln[:1] in "{[" for ln in content[:TEXT_LINES]):
        raise _not_json(path, first, out)
    return JSONL


def _check_python_literals(path: Path, first: str, out: str) -> None:
    """Lines of Python dict literals (print(dict) / repr, single quotes): one message, not one error a line."""
    import ast

    try:
        value = ast.literal_eval(first)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return
    if isinstance(value, dict):
        raise NotJsonLines(
            path, "Python dict literals (single-quoted, as print() writes a dict)",
            "Convert them: python -c \"import ast, json, sys; [print(json.dumps(ast.literal_eval(l), "
            f"ensure_ascii=False)) for l in open(sys.argv[1], encoding='utf-8') if l.strip()]\" {path} > {out}")


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


def _wrapped(path: Path, key: str, out: str) -> NotJsonLines:
    return NotJsonLines(
        path, f"one JSON object holding the records in its '{key}' list",
        f"Write the list as JSON Lines: jq -c '.{key}[]' {path} > {out}   or: python -c \"import json, sys; "
        f"[print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1], encoding='utf-8'))"
        f"['{key}']]\" {path} > {out}")


def _check_wrapped_line(path: Path, first: str, out: str) -> None:
    """A first line that is an object holding a list of records (and no record fields of its own):
    the whole dataset on one line, {"data": [...]}, not a record."""
    wrapped = _WRAPPED.match(first)
    if wrapped and wrapped.group(1) not in ("messages", "history"):
        if not any(k in json.loads(first) for k in _RECORD_KEYS):  # a JSON object (_structure checked)
            raise _wrapped(path, wrapped.group(1), out)


def _check_multiline_object(path: Path, text: str, first: str, out: str) -> None:
    """A JSON object spread over several lines (json.dump(indent=2)): one message, not one error a line."""
    wrapped = _WRAPPED.match(text)
    if wrapped and wrapped.group(1) not in ("messages", "history"):
        raise _wrapped(path, wrapped.group(1), out)
    start = text.index("{")
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
        spans_lines = "\n" in text[start:end]
    except (ValueError, RecursionError):
        spans_lines = first == "{"  # "{" alone is never a whole record; otherwise a broken first line
    if spans_lines:
        raise NotJsonLines(
            path, "pretty-printed JSON (a record spread over several lines)",
            f"Put each record on one line: jq -c . {path} > {out}   (or, for one object: python -c \"import json, "
            f"sys; print(json.dumps(json.load(open(sys.argv[1], encoding='utf-8')), ensure_ascii=False))\" "
            f"{path} > {out})")


_DELIMITED = (("\t", "tab-separated text (TSV)", ", delimiter='\\t'"), (",", "comma-separated text (CSV)", ""))


def _check_delimited(path: Path, text: str, out: str, whole: bool) -> None:
    """CSV or TSV whose first line names the fields, quoted or not: its rows parsed as csv reads them
    (a quoted field may hold commas, newlines and lines that start with { or [). Most rows with as many
    fields as the header is the sign; a JSONL file under a stray first line has rows of other widths."""
    import csv
    import io

    for sep, what, delim in _DELIMITED:
        try:
            rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if row]
        except csv.Error:
            continue
        rows = rows if whole else rows[:-1]  # the last row may be cut at the sample's end
        header, body = (rows[0], rows[1:]) if rows else ([], [])
        names = [name.strip() for name in header]
        if len(names) < 2 or not all(0 < len(n) <= 64 and n[0] not in "{[" for n in names) or not body:
            continue
        if sum(len(row) == len(header) and row[0].lstrip()[:1] not in "{[" for row in body) * 2 > len(body):
            raise NotJsonLines(path, what, "Convert it (the first line names the fields): "
                               + _CSV_ROWS.format(delim=delim, path=path, out=out))


def _not_json(path: Path, first: str, out: str) -> NotJsonLines:
    for sep, what, delim in _DELIMITED:
        if sep in first:
            return NotJsonLines(path, what, "Convert it (the first line names the fields): "
                                + _CSV_ROWS.format(delim=delim, path=path, out=out))
    return NotJsonLines(path, f"text that is not JSON (none of its first {TEXT_LINES} lines starts with {{ or [)",
                        'Each line must be one JSON object: {"instruction": "...", "input": "...", "output": "..."}')
