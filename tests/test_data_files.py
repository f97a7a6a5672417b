"""Data files that are not JSON Lines: a JSON array is read as records (with the line where each
element starts); anything else (compressed, binary, another encoding, pretty-printed JSON, CSV)
is one message that says what the file is and how to convert it, never one error per line."""

import bz2
import csv
import gzip
import io
import json
import lzma
import re
import tracemalloc
import zipfile

import pytest
from helpers import make_records, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data import json_array
from lora_cli.data.file_kinds import NotJsonLines
from lora_cli.data.report import validate_file
from lora_cli.data.records import open_lines
from lora_cli.infer.evaluation import read_examples

runner = CliRunner()
RECORDS = [{"instruction": "Name a primary colour.", "input": "", "output": "Red."},
           {"instruction": "Give the opposite of the word.", "input": "cold", "output": "Hot."},
           {"instruction": "Café, crème brûlée: name one more French dish.", "input": "", "output": "Ratatouille."}]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS)
CHINESE = ('{"instruction": "把这个词翻译成英文。", "input": "咖啡", "output": "coffee"}\n'
           '{"instruction": "说出一种水果。", "input": "", "output": "苹果"}\n')


def element_lines(text: str) -> list[int]:
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.strip().startswith("{")]


@pytest.mark.parametrize("name,indent", [("train.json", 2), ("train.jsonl", None), ("train.json", 4)])
def test_a_json_array_of_records_is_read_with_the_line_where_each_element_starts(tmp_path, name, indent):
    rows = RECORDS + [{"instruction": "x", "input": 3, "output": "y"}]
    text = json.dumps(rows, indent=indent, ensure_ascii=False)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    report = validate_file(path)
    assert report.records == 4 and report.valid == 3 and report.errors == 1
    [issue] = report.issues
    starts = element_lines(text) if indent else [1, 1, 1, 1]
    assert (issue.line, issue.field) == (starts[3], "input") and "must be a string" in issue.reason


def test_every_command_that_reads_data_reads_a_json_array(tmp_path, tiny_model_dir):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(make_records(6), indent=2))
    res = runner.invoke(app, ["validate-data", str(path)])
    assert res.exit_code == 0 and "clean" in res.output, res.output
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["counts"]["examples"] == 6
    examples = read_examples(path)  # what eval --data and generate --input read through
    assert [e.line for e in examples] == element_lines(path.read_text())
    assert examples[0].instruction == make_records(6)[0]["instruction"]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_a_json_array_is_read_the_same_whatever_the_read_size(monkeypatch, chunk):
    rows = [{"instruction": "é€😀" * i, "n": n, "nested": [1, {"a": [None, True]}], "big": 12345678901234567890}
            for i, n in enumerate([1, -2.5e10, 0, 7, 1e-7, 123456])]
    pieces = [json.dumps(r, indent=1, ensure_ascii=False) for r in rows]  # elements over several lines
    starts = [2 + sum(p.count("\n") + 1 for p in pieces[:i]) for i in range(len(pieces))]
    data = ("[\n" + ",\n".join(pieces) + "\n]\n").encode()
    monkeypatch.setattr(json_array, "CHUNK", chunk)
    got = list(json_array.iter_json_array(io.BytesIO(data)))
    assert [value for _, value in got] == rows
    assert [line for line, _ in got] == starts


def test_reading_a_json_array_holds_one_chunk_not_the_file(monkeypatch):
    data = json.dumps(make_records(20_000)).encode()  # about 2 MB on one line
    monkeypatch.setattr(json_array, "CHUNK", 1 << 16)
    fh = io.BytesIO(data)
    tracemalloc.start()
    try:
        count = sum(1 for _ in json_array.iter_json_array(fh))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < len(data) / 4, f"peak {peak} bytes for a file of {len(data)}"  # json.load: several times the file


@pytest.mark.parametrize("text,line,words,valid", [
    ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": }\n]', 3, "invalid JSON", 1),
    ('[\n{"instruction": "a", "output": "b"},\n]\n', 3, "trailing comma", 1),
    ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": "d"}\n', 4, "no closing", 2),
    ('[\n{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}]', 3, "expected ','", 1),
    ('[\n{"instruction": "a", "output": "b"}\n]\n\n{"instruction": "c", "output": "d"}\n', 5, "more data after", 1),
], ids=["bad-element", "trailing-comma", "unclosed", "missing-comma", "two-documents"])
def test_a_json_array_that_stops_being_json_is_one_error_on_its_line(tmp_path, text, line, words, valid):
    path = tmp_path / "d.json"
    path.write_text(text)
    report = validate_file(path)
    assert report.valid == valid and report.errors == 1
    [issue] = report.issues
    assert issue.line == line and words in issue.reason


def _write_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(RECORDS), path)


def _write_arrow_stream(path):
    import pyarrow as pa

    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(path), "wb") as fh, pa.ipc.new_stream(fh, table.schema) as writer:
        writer.write_table(table)


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train.jsonl", JSONL)


def _dict_writer(path, delimiter, rows=40, quoting=csv.QUOTE_MINIMAL):
    """A CSV/TSV as Python's csv.DictWriter writes one: fields quoted where they hold the delimiter, quotes
    or newlines, and continuation lines that start with [ or {."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["instruction", "input", "output"], delimiter=delimiter, quoting=quoting)
        writer.writeheader()
        for n in range(rows):
            writer.writerow({"instruction": f'Write to {n}, "politely"\n[Name]\n{{"x": 1}}', "input": "",
                             "output": f"Dear {n},\n[my name]\tthanks"})


KINDS = {  # name: (writer, words the message holds)
    "gzip": (lambda p: p.write_bytes(gzip.compress(JSONL.encode())), ["gzip-compressed", "gzip -dc"]),
    "bzip2": (lambda p: p.write_bytes(bz2.compress(JSONL.encode())), ["bzip2-compressed", "bzip2 -dc"]),
    "xz": (lambda p: p.write_bytes(lzma.compress(JSONL.encode())), ["xz-compressed", "xz -dc"]),
    "zstd": (lambda p: p.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(40)), ["zstd-compressed", "zstd -dc"]),
    "zip": (_zip, ["zip archive", "unzip"]),
    "parquet": (_write_parquet, ["Parquet", "pyarrow.parquet.read_table"]),
    "arrow": (_write_arrow_stream, ["Arrow stream", "pyarrow.ipc.open_stream"]),
    "utf16-bom": (lambda p: p.write_bytes(JSONL.encode("utf-16")), ["UTF-16", "with a byte-order mark", "iconv -f UTF-16 "]),
    "utf16le": (lambda p: p.write_bytes(JSONL.encode("utf-16-le")), ["UTF-16", "without", "iconv -f UTF-16LE"]),
    "utf16be": (lambda p: p.write_bytes(JSONL.encode("utf-16-be")), ["UTF-16", "big-endian", "iconv -f UTF-16BE"]),
    "utf32": (lambda p: p.write_bytes(JSONL.encode("utf-32")), ["UTF-32", "iconv -f UTF-32"]),
    # a short Western text: cp1252, cp1250 and cp1257 read it differently, so no encoding is named
    "cp1252": (lambda p: p.write_bytes(JSONL.encode("cp1252") * 3),
               ["not UTF-8", "cannot be told with confidence (line 3, byte 21: e9 2c 20 63 72 e8 6d 65)",
                "iconv -f ENCODING -t UTF-8"]),
    "gbk": (lambda p: p.write_bytes(CHINESE.encode("gbk") * 2), ["in the GBK encoding", "iconv -f GBK -t UTF-8"]),
    "pretty-object": (lambda p: p.write_text(json.dumps(RECORDS[0], indent=2)), ["pretty-printed", "jq -c ."]),
    "pretty-records": (lambda p: p.write_text("\n".join(json.dumps(r, indent=2) for r in RECORDS)), ["pretty-printed"]),
    "wrapped": (lambda p: p.write_text(json.dumps({"data": RECORDS}, indent=2)), ["'data' list", "jq -c '.data[]'"]),
    "wrapped-after-a-version": (lambda p: p.write_text(json.dumps({"version": 1, "data": RECORDS}, indent=2)),
                                ["'data' list", "jq -c '.data[]'"]),
    "wrapped-on-one-line": (lambda p: p.write_text(json.dumps({"version": "2.1", "rows": RECORDS})),
                            ["'rows' list", "jq -c '.rows[]'"]),
    "python-repr": (lambda p: p.write_text("".join(f"{r!r}\n" for r in RECORDS)),
                    ["Python dict literals", "ast.literal_eval"]),
    "csv": (lambda p: p.write_text("instruction,input,output\nSay hi,,hi\n"), ["CSV", "csv.DictReader"]),
    "tsv": (lambda p: p.write_text("instruction\tinput\toutput\nSay hi\t\thi\n"), ["TSV", "delimiter"]),
    "csv-quoted": (lambda p: _dict_writer(p, ","), ["CSV", "csv.DictReader"]),
    "tsv-quoted": (lambda p: _dict_writer(p, "\t"), ["TSV", "delimiter"]),
    "text": (lambda p: p.write_text("Say hi\nhi\n"), ["not JSON"]),
    "binary": (lambda p: p.write_bytes(bytes(range(256)) * 40), ["binary file"]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_file_that_is_not_json_lines_is_one_message_saying_what_it_is_and_how_to_convert_it(tmp_path, kind):
    write, words = KINDS[kind]
    path = tmp_path / "train.jsonl"
    write(path)
    report = validate_file(path)
    assert report.errors == 1 and report.records == 0
    [issue] = report.issues
    assert issue.line == 0 and str(path) in str(issue) and "not JSON Lines" in issue.reason
    for word in words:
        assert word in issue.reason
    res = runner.invoke(app, ["validate-data", str(path)])
    assert res.exit_code == 1 and "invalid JSON" not in res.output
    assert [line.split()[0] for line in res.output.splitlines() if line.startswith(("error", "warning"))] == ["error"]
    with pytest.raises(NotJsonLines, match="not JSON Lines"):
        read_examples(path)


def test_the_conversion_hint_writes_beside_the_input_not_into_the_current_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, write, out in [("pretty.jsonl", KINDS["pretty-object"][0], "pretty.converted.jsonl"),
                             ("t.csv", KINDS["csv"][0], "t.jsonl")]:
        write(folder / name)
        [issue] = validate_file(folder / name).issues
        assert f"> {folder / out}" in issue.reason, issue.reason


def test_no_conversion_hint_names_an_existing_file_as_its_output(tmp_path):
    written = {"clean.jsonl.gz": KINDS["gzip"][0], "pretty.jsonl": KINDS["pretty-object"][0],
               "t.csv": KINDS["csv"][0], "w.json": KINDS["wrapped"][0], "u.jsonl": KINDS["utf16-bom"][0]}
    for name, write in written.items():
        write(tmp_path / name)
    for taken in ("clean.jsonl", "clean.converted.jsonl", "pretty.converted.jsonl", "t.jsonl", "w.jsonl",
                  "u.converted.jsonl"):
        (tmp_path / taken).write_text("mine\n")
    expected = {"clean.jsonl.gz": "clean.converted-2.jsonl", "pretty.jsonl": "pretty.converted-2.jsonl",
                "t.csv": "t.converted.jsonl", "w.json": "w.converted.jsonl", "u.jsonl": "u.converted-2.jsonl"}
    for name, out in expected.items():
        [issue] = validate_file(tmp_path / name).issues
        outputs = set(re.findall(r" > (/\S+?)\)?(?=\s|$)", issue.reason))  # every redirection's target
        assert outputs == {str(tmp_path / out)}, issue.reason
    assert {p.name for p in tmp_path.iterdir()} == set(written) | {
        "clean.jsonl", "clean.converted.jsonl", "pretty.converted.jsonl", "t.jsonl", "w.jsonl", "u.converted.jsonl"}


def test_a_csv_with_quoted_fields_holding_commas_and_newlines_is_one_message_in_validate_tokenize_and_train(
        tmp_path, tiny_model_dir):
    path = tmp_path / "data.csv"
    _dict_writer(path, ",", quoting=csv.QUOTE_ALL)
    res = runner.invoke(app, ["validate-data", str(path)])
    assert res.exit_code == 1 and "invalid JSON" not in res.output
    assert f"{path}: this is comma-separated text (CSV)" in res.output and f"> {tmp_path / 'data.jsonl'}" in res.output
    for command in (["tokenize"], ["train", "-o", str(tmp_path / "out"), "--max-steps", "1"]):
        res = runner.invoke(app, [*command, "--model", str(tiny_model_dir), "--train", str(path)])
        assert res.exit_code == 1 and "Traceback" not in res.output and "invalid JSON" not in res.output
        assert f"{path} is comma-separated text (CSV), not JSON Lines" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_json_lines_under_a_comma_separated_first_line_stay_json_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("id,text\n" + "".join(json.dumps({"instruction": f"a{n}", "output": "b"}) + "\n" for n in range(5)))
    report = validate_file(path)
    assert report.valid == 5 and [(i.line, i.reason.split(":")[0]) for i in report.issues] == [(1, "invalid JSON")]


def test_tokenize_stops_on_such_a_file_with_that_one_message(tmp_path, tiny_model_dir):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL.encode()))
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{path} is a gzip-compressed file, not JSON Lines" in res.output and "gzip -dc" in res.output
    assert "invalid" not in res.output


def test_one_line_that_is_not_utf8_stays_an_error_of_that_line(tmp_path):
    """The rule: a legacy encoding needs two lines or more that are not UTF-8 and none that is
    UTF-8 beyond ASCII; otherwise each bad line is a defect of its record."""
    latin1_line = '{"instruction": "Caf\xe9", "output": "x"}\n'.encode("latin-1")
    mixed = tmp_path / "mixed.jsonl"  # real UTF-8 text around two Latin-1 lines
    mixed.write_bytes(JSONL.encode() + latin1_line + JSONL.encode() + latin1_line)
    ascii_one = tmp_path / "ascii.jsonl"  # ASCII lines and one Latin-1 line
    ascii_one.write_bytes(b'{"instruction": "a", "output": "b"}\n' + latin1_line)
    for path, bad_lines in ((mixed, {4, 8}), (ascii_one, {2})):
        report = validate_file(path)
        assert {i.line for i in report.issues if i.severity == "error"} == bad_lines
        assert all("invalid UTF-8" in i.reason for i in report.issues if i.severity == "error")
    ascii_two = tmp_path / "ascii2.jsonl"
    ascii_two.write_bytes(b'{"instruction": "a", "output": "b"}\n' + latin1_line * 2)
    [issue] = validate_file(ascii_two).issues
    assert "not UTF-8" in issue.reason and "line 2, byte 21: e9" in issue.reason


def test_a_stray_nul_byte_is_a_defect_of_its_line_not_a_binary_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(JSONL.encode() * 20 + b'{"instruction": "a\x00", "output": "b"}\n')
    errors = [i for i in validate_file(path).issues if i.severity == "error"]
    assert [i.line for i in errors] == [61] and "invalid JSON" in errors[0].reason


def test_json_lines_whose_first_line_is_a_list_stays_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [[1, 2], RECORDS[0], "{broken"])
    report = validate_file(path)
    assert report.valid == 1 and [(i.line, i.reason.split(":")[0]) for i in report.issues] == [
        (1, "expected a JSON object, got list"), (3, "invalid JSON")]


@settings(max_examples=150, deadline=None, database=None)
@given(st.sampled_from([b"[", b"[\n", b"{\n", b"\xef\xbb\xbf[", b""]), st.binary(max_size=60),
       st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b",", b'"a"', b":", b"1", b"\n", b" ", b"\\", b"\xe9"]),
                max_size=30))
def test_whatever_a_file_holds_reading_it_ends_in_a_report_not_an_exception(prefix, noise, tokens):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.json"
        path.write_bytes(prefix + noise + b"".join(tokens))
        report = validate_file(path)
        assert report.records >= report.valid >= 0


def test_a_first_line_longer_than_the_sample_is_judged_by_how_it_starts(tmp_path):
    from lora_cli.data.file_kinds import JSON_ARRAY, JSONL, SAMPLE, sniff

    big = {"instruction": "x" * SAMPLE, "input": "", "output": "y"}
    one_line_array = json.dumps([big, RECORDS[0]]).encode()
    long_record = (json.dumps({"conversations": [{"a": 1}], **big}) + "\n" + json.dumps(RECORDS[0]) + "\n").encode()
    assert sniff(tmp_path / "a.json", one_line_array[:SAMPLE]) == JSON_ARRAY
    assert sniff(tmp_path / "b.jsonl", long_record[:SAMPLE]) == JSONL


def test_cr_only_line_ends_are_read_like_crlf(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(JSONL.replace("\n", "\r").encode())
    report = validate_file(path)
    assert report.records == report.valid == 3 and report.errors == 0
    assert [e.instruction for e in read_examples(path)] == [r["instruction"] for r in RECORDS]
    assert [line for line, _ in open_lines(path, cr_only=True)] == [1, 2, 3]


def test_files_concatenated_each_with_its_bom_read_as_one(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + JSONL.encode() + b"\xef\xbb\xbf" + JSONL.encode())
    report = validate_file(path)
    assert report.records == report.valid == 6 and report.errors == 0
