"""Alpaca records with `system` and `history` (LLaMA-Factory's format) are trained on, rendered as
the chat record with those messages would be under every template; a field that looks like one
of ours (another case, a misspelling, a common alias) gets a warning instead of being dropped."""

import json

import pytest
from helpers import write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data.records import Example, parse_value
from lora_cli.data.report import validate_file
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import IGNORE, LabelPolicy, encode_batch, encode_example_prompt

runner = CliRunner()
RECORD = {"instruction": "And the weather?", "input": "", "output": "Sunny.", "system": "Answer in one word.",
          "history": [["How are you?", "Fine."], ["Where are you?", "Home."]]}
AS_CHAT = {"messages": [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."},
                        {"role": "user", "content": "Where are you?"}, {"role": "assistant", "content": "Home."},
                        {"role": "user", "content": "And the weather?"}, {"role": "assistant", "content": "Sunny."}]}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def parsed(obj: dict) -> Example:
    example, issues = parse_value(obj, 1, "f.jsonl")
    assert example is not None, issues
    return example


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "qa.txt"
    path.write_text("Q: {instruction}\nContext: {input}\nA: {output}\n")
    return str(path)


@pytest.mark.parametrize("name", ["alpaca", "alpaca-seed", "chat", "file"])
@pytest.mark.parametrize("policy", [LabelPolicy(), LabelPolicy(train_on_prompt=True, add_eos=False)], ids=["default", "seed"])
def test_system_and_history_are_tokenized_as_the_chat_record_with_those_messages(tok, name, policy, template_file):
    template = get_template(template_file if name == "file" else name)
    alpaca, chat = encode_batch([parsed(RECORD), parsed(AS_CHAT)], tok, template, policy)
    assert alpaca.input_ids == chat.input_ids and alpaca.labels == chat.labels
    assert "Answer in one word." in tok.decode(alpaca.input_ids) and "How are you?" in tok.decode(alpaca.input_ids)


def test_every_answer_of_the_history_is_trained_on_and_no_prompt(tok):
    enc = encode_batch([parsed(RECORD)], tok, get_template("alpaca"), LabelPolicy())[0]
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == "Fine.<|im_end|>Home.<|im_end|>Sunny.<|im_end|>"
    assert tok.decode(enc.input_ids).startswith("Answer in one word.\n\n### Instruction:\nHow are you?")


def test_the_last_turn_keeps_its_input_block_and_generation_prompts_keep_system_and_history(tok):
    example = parsed({**RECORD, "input": "in Paris"})
    template = get_template("alpaca")
    enc = encode_batch([example], tok, template, LabelPolicy())[0]
    assert "### Instruction:\nAnd the weather?\n\n### Input:\nin Paris\n\n### Response:\nSunny." in tok.decode(enc.input_ids)
    start = len(enc.labels) - 1 - next(i for i, t in enumerate(reversed(enc.labels[:-1])) if t == IGNORE)
    assert encode_example_prompt(example, tok, template) == enc.input_ids[:start]


def test_records_that_differ_only_in_system_or_history_are_not_duplicates(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [RECORD, {**RECORD, "system": "Be verbose."},
                                              {**RECORD, "history": []}, RECORD])
    report = validate_file(path)
    assert [(i.line, i.reason) for i in report.issues] == [(4, "duplicate of line 1")]


def test_a_blank_or_null_system_and_a_null_or_empty_history_mean_none():
    for extra in ({"system": ""}, {"system": "   "}, {"system": None}, {"history": None}, {"history": []}):
        example = parsed({"instruction": "a", "output": "b", **extra})
        assert example.system == "" and example.history == []


@pytest.mark.parametrize("extra,field,words", [
    ({"system": 3}, "system", "must be a string"),
    ({"system": "\ud800"}, "system", "surrogate"),
    ({"history": "How are you?"}, "history", "list of [user, assistant] pairs"),
    ({"history": [["a", "b", "c"]]}, "history[0]", "pair of strings, not a list of 3"),
    ({"history": [{"user": "a"}]}, "history[0]", "not dict"),
    ({"history": [["a", 5]]}, "history[0][1]", "assistant text must be a string"),
    ({"history": [[None, "b"]]}, "history[0][0]", "user text must be a string"),
    ({"history": [["a", "  "]]}, "history[0][1]", "blank"),
    ({"history": [["\ud800", "b"]]}, "history[0][0]", "surrogate"),
])
def test_system_and_history_defects_name_their_field(extra, field, words):
    example, issues = parse_value({"instruction": "a", "output": "b", **extra}, 7, "f.jsonl")
    assert example is None and [(i.line, i.field) for i in issues] == [(7, field)] and words in issues[0].reason


def test_chat_records_take_a_system_field_but_not_a_history():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    example = parsed({**chat, "system": "be brief"})
    assert example.messages[0] == {"role": "system", "content": "be brief"} and len(example.messages) == 3
    with_system = {"messages": [{"role": "system", "content": "x"}, *chat["messages"]], "system": "y"}
    for obj, field in ((with_system, "system"), ({**chat, "history": [["a", "b"]]}, "history")):
        example, issues = parse_value(obj, 1, "f.jsonl")
        assert example is None and [i.field for i in issues] == [field]


def test_a_field_that_looks_like_system_or_history_gets_one_warning_naming_the_expected_field(tmp_path):
    rows = [{"instruction": "a", "output": "b", "System": "s"},
            {"instruction": "c", "output": "d", "sytem": "s", "id": 17, "source": "handwritten"},
            {"instruction": "e", "output": "f", "histroy": [["x", "y"]], "System": "s"},
            {"instruction": "g", "output": "h", "system_prompt": "s", "Messages": []},
            {"instruction": "i", "output": "j", "response": "metadata next to an output", "prompt": "too"},
            {"instruction": "k", "output": "l", "Input": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = validate_file(path)
    found = [(i.line, i.field, i.severity) for i in report.issues]
    assert found == [(1, "System", "warning"), (2, "sytem", "warning"), (3, "histroy", "warning"),
                     (4, "system_prompt", "warning"), (4, "Messages", "warning"), (6, "Input", "warning")]
    reasons = {i.field: i.reason for i in report.issues}
    assert "did you mean 'system'?" in reasons["sytem"] and "did you mean 'history'?" in reasons["histroy"]
    assert "did you mean 'input'?" in reasons["Input"] and "ignored" in reasons["System"]
    assert report.errors == 0 and report.warnings == 6 and report.valid == 6
    assert runner.invoke(app, ["validate-data", str(path)]).exit_code == 0
    assert runner.invoke(app, ["validate-data", str(path), "--strict"]).exit_code == 1


def test_a_missing_field_names_its_look_alike():
    for obj, field, found in (({"Instruction": "a", "output": "b"}, "instruction", "Instruction"),
                              ({"instruction": "a", "ouput": "b"}, "output", "ouput"),
                              ({"conversations": [{"from": "human", "value": "hi"}]}, "messages", "conversations")):
        example, issues = parse_value(obj, 1, "f.jsonl")
        assert example is None and f"found '{found}': rename it to '{field}'" in issues[0].reason
        assert issues[0].field == field


def test_tokenize_trains_on_system_and_history_and_says_so_on_a_cache_hit(tiny_model_dir, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "t.jsonl", [RECORD, {"instruction": "x", "output": "y", "Sytem": "s"}])
    for status in ("built", "cache hit"):
        res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(path)])
        assert res.exit_code == 0 and status in res.output, res.output
        assert f"warning {path}:2 [Sytem]: field 'Sytem' is ignored: did you mean 'system'?" in res.output
    [entry] = (tmp_path / ".lora-cache" / "tokenized").glob("*/data")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    row = load_from_disk(str(entry))[0]
    assert tok.decode([t for t in row["labels"] if t != IGNORE]) == "Fine.<|im_end|>Home.<|im_end|>Sunny.<|im_end|>"
    assert json.loads((entry.parent / "meta.json").read_text())["parts"]["format"] >= 2
