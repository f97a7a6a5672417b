"""generate, chat and eval through the CLI: success paths and every bad input as a message with exit 1."""

import json
import re

import pytest
from helpers import make_records, write_jsonl
from helpers.adapter_factory import data_dir, make_adapter, peaked_model_dir
from typer.testing import CliRunner

from lora_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return str(make_adapter(tmp_path_factory, peaked_model_dir(tmp_path_factory, tiny_model_dir), "stopper"))


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return str(data_dir(tmp_path_factory)[1])


def ok(*args, input=None):
    res = runner.invoke(app, [str(a) for a in args], input=input)
    assert res.exit_code == 0, res.output
    return res


def fails(*args, input=None):
    res = runner.invoke(app, [str(a) for a in args], input=input)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "internal error" not in res.output
    return res.output


def test_generate_streams_one_prompt(adapter):
    res = ok("generate", "--adapter", adapter, "red house 3", "-n", "8")
    assert res.stdout == "yes\n" and re.search(r"\(eos after \d+ tokens\)", res.output)


def test_generate_json_and_compare_for_a_file(adapter, val, tmp_path):
    rows = [json.loads(x) for x in ok("generate", "-a", adapter, "--input", val, "-n", "8", "--json",
                                      "--compare").stdout.splitlines()]
    assert len(rows) == 6 and [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["stopped"] and r["reference"] == "yes" for r in rows), rows
    assert sum(r["answer"] == "yes" for r in rows) >= 4, rows
    assert all(r["base_answer"] != "yes" and not r["base_stopped"] for r in rows)
    table = ok("generate", "-a", adapter, "--input", val, "-n", "8", "--compare").stdout
    assert "base model" in table and "adapter" in table and "yes" in table
    ok("generate", "-a", adapter, "--input", val, "-n", "4", "--base-only", "-o", tmp_path / "ans.jsonl")
    written = [json.loads(x) for x in (tmp_path / "ans.jsonl").read_text().splitlines()]
    assert len(written) == 6 and not any(r["stopped"] for r in written) and "base_answer" not in written[0]


def test_generate_accepts_chat_records_and_a_packaged_zip(adapter, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "red city"}, {"role": "assistant", "content": "yes"}]}])
    ok("package", adapter, "-o", tmp_path / "a.zip")
    row = json.loads(ok("generate", "-a", tmp_path / "a.zip", "--input", chat, "-n", "8", "--json").stdout)
    assert row["messages"][-1] == {"role": "user", "content": "red city"} and row["reference"] == "yes"
    assert row["stopped"], row


def test_chat_is_multi_turn_and_leaves_on_exit_or_eof(adapter):
    res = ok("chat", "-a", adapter, "-n", "8", input="red house\n\nblue city\n/exit\nnever read\n")
    assert res.stdout.count("you> ") == 4 and "never" not in res.stdout and "no eos" not in res.output
    res = ok("chat", "-a", adapter, "-n", "8", "--system", "be brief", input="red\n/reset\ncity\n")  # ends with EOF
    assert res.stdout.count("you> ") == 4 and "history cleared" in res.output and "no eos" not in res.output


def test_chat_history_is_rendered_and_trimmed_to_the_context(adapter):
    from lora_cli.adapter.folder import read_adapter
    from lora_cli.infer.generation import fit_history, load_for_inference

    loaded = load_for_inference(read_adapter(adapter), precision="fp32", device="cpu")
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red house"},
               {"role": "assistant", "content": "yes"}, {"role": "user", "content": "blue city"}]
    ids, dropped = fit_history(loaded, history, max_new_tokens=8)
    text = loaded.tokenizer.decode(ids)
    assert dropped == 0 and text.startswith("be brief") and "red house" in text and text.endswith("### Response:\n")
    limit = loaded.model.config.max_position_embeddings
    ids, dropped = fit_history(loaded, history, max_new_tokens=limit - len(ids) + 1)
    text = loaded.tokenizer.decode(ids)
    assert dropped == 1 and "red house" not in text and text.startswith("be brief") and "blue city" in text


def test_eval_table_json_and_base_only(adapter, val):
    table = ok("eval", "-a", adapter, "--data", val, "-n", "8").stdout
    assert "stop rate" in table and "100.0% (6/6" in table and "perplexity" in table
    after = json.loads(ok("eval", "-a", adapter, "--data", val, "-n", "8", "--json").stdout)
    before = json.loads(ok("eval", "-a", adapter, "--data", val, "-n", "8", "--json", "--base-only").stdout)
    assert after["stop_rate"] == 1.0 and before["stop_rate"] == 0.0 and after["loss"] < before["loss"]
    assert before["model"].endswith("(base)") and len(after["answers"]) == 6
    loss_only = json.loads(ok("eval", "-a", adapter, "--data", val, "--loss-only", "--json").stdout)
    assert loss_only["stop_rate"] is None and loss_only["loss"] == pytest.approx(after["loss"], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["generate", "-a", "{adapter}"], "Nothing to answer: no PROMPT and no --input was given"),
    (["generate", "-a", "{adapter}", "x", "--input", "{val}"], "exactly one"),
    (["generate", "-a", "{adapter}", "  "], "prompt is empty"),
    (["generate", "-a", "{adapter}", "x", "--compare", "--base-only"], "cannot be used together"),
    (["generate", "-a", "{adapter}", "x", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "-a", "{adapter}", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "-a", "{adapter}", "x", "-n", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "-a", "{adapter}", "x", "--quantization", "int3"], "--quantization must be nf4 or none"),
    (["generate", "-a", "{adapter}", "x", "--precision", "fp8"], "--precision must be one of"),
    (["generate", "-a", "{adapter}", "x", "--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["generate", "-a", "{adapter}", "x", "--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["generate", "-a", "{adapter}", "x", "--template", "nonesuch"], "Unknown template"),
    (["generate", "-a", "{adapter}", "--input", "{tmp}/missing.jsonl"], "does not exist"),
    (["generate", "-a", "{tmp}/nope", "x"], "Adapter folder {tmp}/nope does not exist"),
    (["generate", "-a", "{tmp}", "x"], "is not an adapter folder"),
    (["chat", "-a", "{tmp}/nope"], "does not exist"),
    (["chat", "-a", "{adapter}", "--top-k", "-2"], "--top-k must be >= 0"),
    (["eval", "-a", "{adapter}"], "No data to evaluate on"),
    (["eval", "-a", "{adapter}", "--data", "{val}", "-n", "0"], "--max-new-tokens must be at least 1"),
    (["eval", "-a", "{adapter}", "--data", "{tmp}/empty.jsonl"], "holds no records"),
    (["eval", "-a", "{tmp}/nope", "--data", "{val}"], "does not exist"),
    (["eval", "-a", "{adapter}", "--data", "{val}", "--model", "{tmp}/nomodel"], "Model folder"),
])
def test_bad_inputs_are_messages_with_exit_1(args, message, adapter, val, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    fill = {"adapter": adapter, "val": val, "tmp": str(tmp_path)}
    output = fails(*[a.format(**fill) for a in args])
    assert message.format(**fill) in output.replace("\n", " ") or message.format(**fill) in output


def test_bad_jsonl_lines_are_named_before_any_model_loads(adapter, tmp_path, monkeypatch):
    import lora_cli.infer.generation as generation

    def boom(*a, **k):
        raise AssertionError("the model was loaded for a bad data file")

    monkeypatch.setattr(generation, "load_for_inference", boom)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*make_records(2), "{oops", {"instruction": "x", "input": ""}])
    for cmd in (["eval", "-a", adapter, "--data", bad], ["generate", "-a", adapter, "--input", bad]):
        output = fails(*cmd)
        assert f"{bad}:3" in output and "invalid JSON" in output
        assert (f"{bad}:4 [output]" in output) == (cmd[0] == "eval")  # generate answers prompts without one


def test_generate_answers_prompts_without_an_output_while_eval_still_needs_one(adapter, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "red house 3"},
                                                       {"instruction": "red city", "input": "", "output": "yes"},
                                                       {"messages": [{"role": "user", "content": "red city"}]}])
    rows = [json.loads(x) for x in ok("generate", "-a", adapter, "--input", prompts, "-n", "8", "--json"
                                      ).stdout.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3] and all(r["answer"] for r in rows), rows
    assert "reference" not in rows[0] and rows[1]["reference"] == "yes" and "reference" not in rows[2]
    assert rows[2]["messages"] == [{"role": "user", "content": "red city"}]
    output = fails("eval", "-a", adapter, "--data", prompts)
    assert f"{prompts}:1 [output]: missing field 'output'" in output


def test_generate_refuses_an_existing_output_file_and_its_own_input_even_with_force(adapter, val, tmp_path,
                                                                                   monkeypatch):
    import lora_cli.infer.generation as generation

    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious\n")
    before = (tmp_path / "val.jsonl").write_bytes(open(val, "rb").read())
    own_input = tmp_path / "val.jsonl"
    loaded = generation.load_for_inference
    monkeypatch.setattr(generation, "load_for_inference", lambda *a, **k: pytest.fail("loaded before refusing"))
    output = fails("generate", "-a", adapter, "--input", own_input, "-o", mine)
    assert f"{mine} already exists." in output and "--force" in output and mine.read_text() == "precious\n"
    output = fails("generate", "-a", adapter, "--input", own_input, "-o", own_input, "--force")
    assert "is also an input of this command" in output and own_input.stat().st_size == before
    monkeypatch.setattr(generation, "load_for_inference", loaded)
    ok("generate", "-a", adapter, "--input", own_input, "-o", mine, "--force", "-n", "2")
    assert len(mine.read_text().splitlines()) == 6 and not list(tmp_path.glob(".tmp-*"))


def test_the_new_commands_have_help():
    for cmd in ("generate", "chat", "eval", "merge"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output and "--adapter" in res.output


def test_ctrl_c_during_an_answer_drops_that_turn_only(adapter, monkeypatch):
    import lora_cli.infer.generation as generation

    real, calls, prompts = generation.generate, [], []

    def interrupted_once(loaded, batch, *a, **k):
        calls.append(1)
        prompts.append(loaded.tokenizer.decode(batch[0]))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(loaded, batch, *a, **k)

    monkeypatch.setattr(generation, "generate", interrupted_once)
    res = ok("chat", "-a", adapter, "-n", "8", input="red house\nblue city\n/exit\n")
    assert "answer interrupted" in res.output and len(calls) == 2
    assert "red house" not in prompts[1] and "blue city" in prompts[1]  # the interrupted turn left no trace


def test_base_only_needs_no_adapter_folder_only_the_base_model(tiny_model_dir, val, tmp_path):
    res = ok("generate", "--base-only", "--model", tiny_model_dir, "red house", "-n", "3", "--precision", "fp32",
             "-q", "none")  # no ./adapters here
    assert re.search(r"\((eos after|no eos within) \d+ tokens\)", res.output)
    res = ok("eval", "--base-only", "-a", tmp_path / "nothing", "--model", tiny_model_dir, "--data", val,
             "--loss-only", "--json", "--precision", "fp32")
    assert json.loads(res.stdout)["model"] == f"{tiny_model_dir} (base)"
    output = " ".join(fails("generate", "--base-only", "red house").split())
    assert "there is no adapter folder adapters" in output and "--model" in output


def test_a_missing_chat_template_is_named_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from lora_cli.model import load

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the template was checked")

    monkeypatch.setattr(load, "load_model", boom)
    for cmd in (["generate", "--base-only", "--model", plain, "-t", "chat", "hi"],
                ["chat", "--base-only", "--model", plain, "-t", "chat"]):
        assert "needs a tokenizer with a chat template" in fails(*cmd, input="hi\n")


NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_template_that_refuses_a_system_message_is_named_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """Gemma's template raises on a system message: --system, and records with one, are refused in one line."""
    import shutil

    from lora_cli.model import load

    gemma = tmp_path / "gemma"
    shutil.copytree(tiny_model_dir, gemma)
    (gemma / "chat_template.jinja").write_text(NO_SYSTEM)

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the template was checked")

    monkeypatch.setattr(load, "load_model", boom)
    output = fails("chat", "--base-only", "--model", gemma, "-t", "chat", "--system", "be brief", input="hi\n")
    assert output.splitlines()[0] == ("error: --system: this model's chat template cannot render a system message "
                                      "(System role not supported).")
    records = write_jsonl(tmp_path / "system.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]}])
    for cmd in (["generate", "--base-only", "--model", gemma, "-t", "chat", "--input", records],
                ["eval", "--base-only", "--model", gemma, "-t", "chat", "--data", records, "--loss-only"]):
        assert f"{records}:1: the template cannot render this record: System role not supported" in fails(*cmd)


def test_eval_cuts_a_long_answer_by_lines_as_well_as_by_characters():
    from lora_cli.cli.commands.evaluate import _shorten

    looping = "\n".join(["```"] * 50)  # 199 characters, 50 rows of a table
    cut = _shorten(looping)
    assert cut.endswith(" [...]") and cut.count("\n") == 7
    assert _shorten("a" * 400) == "a" * 300 + " [...]"
    assert _shorten("short\nanswer") == "short\nanswer"


def test_a_decoding_step_kept_as_transformers_forward_is_said_once(adapter, val, monkeypatch):
    monkeypatch.setenv("LORA_CLI_TRANSFORMERS_STEP", "1")
    res = ok("generate", "-a", adapter, "--input", val, "-n", "8", "--json", "--compare")
    text = " ".join(res.output.split())
    note = "Generating: decoding step: transformers' forward (LORA_CLI_TRANSFORMERS_STEP=1 is set)."
    assert text.count(note) == 1, res.output
