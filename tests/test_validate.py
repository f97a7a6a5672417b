"""validate-data: every defect with file, line, field and reason; exit codes; JSON; statistics."""

import json

from helpers import make_records, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data.report import validate_file

runner = CliRunner()

GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def issues_of(path):
    return [(i.line, i.field, i.severity, i.reason) for i in validate_file(path).issues]


def test_every_defect_is_reported_with_its_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(GOOD),                                               # 1 ok
        '{"instruction": "x", "output": ',                              # 2 invalid JSON
        json.dumps([1, 2]),                                             # 3 not an object
        json.dumps({"input": "", "output": "y"}),                       # 4 missing instruction
        json.dumps({"instruction": "x", "input": 3, "output": "y"}),    # 5 non-string input
        json.dumps({"instruction": "x", "input": None, "output": "y"}),  # 6 null input: fine
        json.dumps({"instruction": "  ", "input": "", "output": "y"}),  # 7 blank instruction
        json.dumps({"instruction": "x", "input": "", "output": ""}),    # 8 blank output
        json.dumps({"instruction": "x", "response": "y"}),              # 9 missing output, alias hint
        json.dumps(GOOD),                                               # 10 duplicate of 1
        json.dumps({"instruction": "x", "output": None}),               # 11 null output
        '{"instruction": "\\ud800", "output": "y"}',                     # 12 lone surrogate
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff", "output": "y"}\n')  # 13 bad UTF-8
    found = issues_of(path)
    by_line = {line: (field, sev, reason) for line, field, sev, reason in found}
    assert set(by_line) == {2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13}
    assert "invalid JSON" in by_line[2][2]
    assert "expected a JSON object" in by_line[3][2]
    assert by_line[4][:1] == ("instruction",) and "missing" in by_line[4][2]
    assert by_line[5][0] == "input" and "must be a string" in by_line[5][2]
    assert by_line[7][0] == "instruction" and "blank" in by_line[7][2]
    assert by_line[8][0] == "output" and "blank" in by_line[8][2]
    assert "rename it to 'output'" in by_line[9][2]
    assert by_line[10][1] == "warning" and "duplicate of line 1" in by_line[10][2]
    assert "null" in by_line[11][2]
    assert "surrogate" in by_line[12][2]
    assert "invalid UTF-8" in by_line[13][2]


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "win.jsonl"
    body = "\r\n".join(json.dumps(r) for r in make_records(3)) + "\r\n\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    report = validate_file(path)
    assert report.errors == 0 and report.records == 3 and report.issues == []


def test_chat_records_are_validated_too(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": "nope"},
    ])
    found = {line: field for line, field, _, _ in issues_of(path)}
    assert found == {2: "messages", 3: "messages[0].role", 4: "messages"}


def test_cli_exit_codes_and_output(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", make_records(5))
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "not json"])
    ok = runner.invoke(app, ["validate-data", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "clean" in ok.output and "records" in ok.output
    res = runner.invoke(app, ["validate-data", str(good), str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:2" in res.output and "invalid JSON" in res.output
    assert "Traceback" not in res.output


def test_duplicates_warn_but_pass_unless_strict(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [GOOD, GOOD])
    assert runner.invoke(app, ["validate-data", str(path)]).exit_code == 0
    assert runner.invoke(app, ["validate-data", str(path), "--strict"]).exit_code == 1


def test_json_report(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "x"}])
    res = runner.invoke(app, ["validate-data", str(path), "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    f = report["files"][0]
    assert report["ok"] is False and f["records"] == 2 and f["valid"] == 1 and f["errors"] == 1
    assert f["issues"][0] == {"file": str(path), "line": 2, "field": "output", "reason": "missing field 'output'",
                              "severity": "error"}
    assert f["length_chars"]["count"] == 1


def test_missing_empty_and_folder_inputs(tmp_path):
    res = runner.invoke(app, ["validate-data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 1 and "does not exist" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["validate-data", str(empty)])
    assert res.exit_code == 1 and "no records" in res.output
    res = runner.invoke(app, ["validate-data", str(tmp_path)])
    assert res.exit_code == 1 and "folder" in res.output and "Traceback" not in res.output


def test_token_statistics_and_truncation_with_a_model(tmp_path, tiny_model_dir):
    rows = make_records(8) + [{"instruction": "long " * 400, "input": "", "output": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    res = runner.invoke(app, ["validate-data", str(path), "--model", str(tiny_model_dir), "--max-length", "256", "--json"])
    assert res.exit_code == 0, res.output
    f = json.loads(res.stdout)["files"][0]
    assert f["length_tokens"]["count"] == 9 and f["length_tokens"]["max"] > 256
    assert f["would_truncate"] == 1


def test_records_longer_than_max_length_are_a_warning_naming_their_lines_so_strict_fails(tmp_path, tiny_model_dir):
    rows = make_records(6)
    for line in (2, 5):
        rows[line - 1] = {"instruction": f"Say it at length, {line}.", "input": "", "output": "long answer " * 200}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ["validate-data", str(path), "--model", str(tiny_model_dir), "--max-length", "128"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "clean (with warnings)" in res.output, res.output
    said = " ".join(res.output.split())
    assert f"warning {path}: 2 example(s) cut by --max-length (128 tokens) before the end of the answer (lines 2, 5)" \
           in said and "without their eos" in said
    assert runner.invoke(app, args + ["--strict"]).exit_code == 1
    report = json.loads(runner.invoke(app, args + ["--json"]).stdout)["files"][0]
    assert report["warnings"] == 1 and report["would_lose_eos"] == 2 and report["lost_eos_lines"] == [2, 5]
    report = json.loads(runner.invoke(app, args[:-1] + ["4096", "--json"]).stdout)["files"][0]
    assert report["warnings"] == 0 and report["would_lose_eos"] == 0


def test_without_a_model_validate_data_says_once_that_token_lengths_were_not_checked(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", make_records(3))
    second = write_jsonl(tmp_path / "b.jsonl", make_records(3, seed=5))
    res = runner.invoke(app, ["validate-data", str(first), str(second), "--max-length", "64"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert said.count("Token lengths not checked") == 1 and "--model" in said and "--max-length (64 tokens)" in said
