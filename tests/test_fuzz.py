"""Inputs that are not what they claim: whatever the file holds, every command ends with exit 0
or 1 and a message, never a traceback or an "internal error" (exit 2).

Property-based (hypothesis): random bytes, random JSON values and near-miss records (right keys,
wrong types, lone surrogates, invalid UTF-8, blank lines) fed to validate-data, tokenize and
train on the tiny model, and random YAML as a run config. Example counts are kept small so the
whole file runs in well under a minute.
"""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lora_cli.cli.app import app

runner = CliRunner()


def fuzz(n):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- what a line can hold -----------------------------------------------------------------------
any_char = st.characters(codec=None)  # every code point, lone surrogates included
text = st.text(any_char, max_size=20) | st.sampled_from(["", " ", "\n", "hello", "### Response:", "<|im_end|>"])
scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=8)
role = st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]) | json_value
message = st.fixed_dictionaries({}, optional={"role": role, "content": text | json_value})
record = st.fixed_dictionaries({}, optional={
    "instruction": text | json_value, "input": text | json_value, "output": text | json_value,
    "response": text, "messages": st.lists(message, max_size=4) | json_value,
})
good = st.builds(lambda i, o: {"instruction": "say " + i, "input": "", "output": "ok " + o},
                 st.text("abcdefgh ", max_size=12), st.text("abcdefgh ", max_size=12))


def encode(item, ascii_only: bool) -> bytes:
    """One line's bytes: JSON (escaped or raw UTF-8, lone surrogates as invalid bytes) or raw text."""
    if isinstance(item, bytes):
        return item
    line = json.dumps(item, ensure_ascii=ascii_only) if not isinstance(item, str) else item
    return line.replace("\n", " ").encode("utf-8", "surrogatepass")


tricky = st.sampled_from([  # literals hypothesis's JSON values rarely reach
    '{"instruction": ' + "9" * 5000 + ', "output": "x"}',  # past CPython's int-parsing limit
    "[" * 5000 + "]" * 5000, '{"instruction": NaN, "output": Infinity}', '{"instruction": "a", "instruction": 1}',
    '{"instruction": "a\u0000b", "output": "\ud800"}', '{"messages": [{"role": "assistant", "content": "x"}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
    '{"role": "assistant", "content": "c"}]}', "\ufeff{}", "\x00", "null", "{}",
])
line = record | good | json_value | text | tricky | st.binary(max_size=30)
jsonl_files = st.tuples(st.lists(line, max_size=12), st.booleans(), st.sampled_from([b"\n", b"\r\n"]),
                        st.booleans()).map(
    lambda t: (b"\xef\xbb\xbf" if t[3] else b"") + t[2].join(encode(x, t[1]) for x in t[0]))
files = jsonl_files | st.binary(max_size=400)


def check(res):
    assert res.exit_code in (0, 1), (res.exit_code, res.output[-3000:])
    assert "Traceback" not in res.output and "internal error" not in res.output, res.output[-3000:]
    assert res.output.strip(), "a run must say something"
    return res


def invoke(*args):
    return check(runner.invoke(app, [str(a) for a in args]))


# ---- the properties ---------------------------------------------------------------------------------
@fuzz(80)
@given(files, st.booleans())
def test_validate_data_never_crashes(data, as_json):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        res = invoke("validate-data", path, *(["--json"] if as_json else []))
        if as_json and res.exit_code in (0, 1):
            assert json.loads(res.stdout)["ok"] == (res.exit_code == 0)


@fuzz(25)
@given(jsonl_files)
def test_validate_data_with_token_lengths_never_crashes(tiny_model_dir, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        invoke("validate-data", path, "--model", tiny_model_dir, "--template", "chat", "--max-length", "16")


@fuzz(25)
@given(jsonl_files, st.sampled_from(["alpaca", "alpaca-seed", "chat"]), st.booleans())
def test_tokenize_never_crashes(tiny_model_dir, data, template, skip_invalid):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_bytes(data)
        res = invoke("tokenize", "--model", tiny_model_dir, "--train", path, "--cache-dir", Path(tmp) / "cache",
                     "--template", template, "--max-length", "32", "--json",
                     *(["--skip-invalid"] if skip_invalid else []))
        if res.exit_code == 0:
            [entry] = json.loads(res.stdout)
            assert entry["counts"]["examples"] > 0


@fuzz(8)
@given(st.lists(record | good | text | tricky, min_size=1, max_size=6).map(lambda rows: b"\n".join(encode(r, True) for r in rows)),
       st.lists(good, min_size=1, max_size=4), st.booleans())
def test_train_never_crashes(tiny_model_dir, bad_rows, good_rows, skip_invalid):
    data = b"\n".join([bad_rows, *(encode(r, False) for r in good_rows)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "train.jsonl"
            path.write_bytes(data)
            invoke("train", "--model", tiny_model_dir, "--train", path, "--val", path, "-o", Path(tmp) / "out",
                   "--cache-dir", Path(tmp) / "cache", "--epochs", "1", "--max-steps", "2", "--max-length", "64",
                   "--precision", "fp32", "--device", "cpu", "--quantization", "none", "--template", "chat",
                   *(["--skip-invalid"] if skip_invalid else []))
    finally:
        torch.set_num_threads(threads)


@fuzz(40)
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")) |
       st.dictionaries(st.sampled_from(["data", "model", "lora", "train", "output", "x"]),
                       st.dictionaries(text, json_value, max_size=3) | json_value, max_size=4).map(
           lambda d: json.dumps(d).encode()))
def test_a_random_run_config_is_a_message(tiny_model_dir, config):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(config)
        invoke("train", "--config", path, "--model", tiny_model_dir, "-o", Path(tmp) / "out", "--max-steps", "0",
               "--epochs", "1", "--precision", "fp16")  # fp16 on the CPU: stops before any model is loaded


# ---- cases the fuzzing found, pinned -------------------------------------------------------------
def test_an_integer_too_long_to_parse_is_an_invalid_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": ' + "1" * 5000 + ', "output": "x"}\n{"instruction": "a", "output": "b"}\n')
    res = invoke("validate-data", path)
    assert res.exit_code == 1 and f"{path}:1: invalid JSON" in " ".join(res.output.split())


STRICT_CHAT = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def model_with_chat_template(src, dest, template):
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(src, dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(dest)
    for name in ("chat_template.jinja", "chat_template.json"):
        if template is None:
            (dest / name).unlink(missing_ok=True)
    return dest


def test_a_record_the_chat_template_refuses_is_reported_on_its_line(tiny_model_dir, tmp_path):
    model = model_with_chat_template(tiny_model_dir, tmp_path / "strict", STRICT_CHAT)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]},
            {"instruction": "say ok", "output": "ok"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke("validate-data", path, "--model", model, "--template", "chat")
    assert res.exit_code == 1 and f"{path}:2: the template cannot render this record: Conversation roles" in \
        " ".join(res.output.split())
    args = ["tokenize", "--model", model, "--train", path, "--template", "chat", "--cache-dir", tmp_path / "c"]
    res = invoke(*args)
    assert res.exit_code == 1 and f"{path}:2" in res.output and "--skip-invalid" in res.output
    res = invoke(*args, "--skip-invalid", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["counts"]["examples"] == 2


def test_a_template_error_inside_the_tokenize_generator_is_a_message(tiny_model_dir, tmp_path):
    """datasets wraps what its generator raises; a LoraCliError from the template must come out as itself."""
    model = model_with_chat_template(tiny_model_dir, tmp_path / "plain", None)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    res = invoke("tokenize", "--model", model, "--train", path, "--template", "chat", "--cache-dir", tmp_path / "c")
    assert res.exit_code == 1 and "needs a tokenizer with a chat template" in res.output


ASSISTANT_FIRST = '{"messages": [{"role": "assistant", "content": "x"}]}'  # chat templates refuse an empty prompt


def test_a_record_the_template_refuses_is_left_out_of_the_stop_rate_probe_too(tiny_model_dir, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(ASSISTANT_FIRST + '\n{"instruction": "say ", "input": "", "output": "ok "}\n')
    res = invoke("train", "--model", tiny_model_dir, "--train", path, "--val", path, "-o", tmp_path / "out",
                 "--cache-dir", tmp_path / "cache", "--epochs", "1", "--max-steps", "2", "--max-length", "64",
                 "--precision", "fp32", "--device", "cpu", "--quantization", "none", "--template", "chat",
                 "--skip-invalid")
    assert res.exit_code == 0
    evals = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    generated = [r["generated"] for r in evals if r.get("type") == "eval"]
    assert generated and set(generated) == {1}  # the one record it can render


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_name_the_records_the_template_refuses(tiny_model_dir, tmp_path, command):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "say ", "input": "", "output": "ok "}\n' + ASSISTANT_FIRST + "\n")
    data = ["--data", path] if command == "eval" else ["--input", path]
    res = invoke(command, "--base-only", "--model", tiny_model_dir, "--template", "chat", "--device", "cpu", *data)
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "1 record(s) that the template cannot render" in text and f"{path}:2" in text
