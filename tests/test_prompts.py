"""Generation prompts are training prompts; chat records and template files, end to end in tokenization."""

import json

import pytest
from helpers import make_records, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data.records import Example
from lora_cli.data.report import validate_file
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import LabelPolicy, encode_batch, encode_example_prompt, encode_prompt
from lora_cli.model.loss import IGNORE

runner = CliRunner()
CHAT = Example(7, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "say bye"},
                            {"role": "assistant", "content": "bye now"}])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def last_response_start(labels: list[int]) -> int:
    """Index where the last run of labelled tokens begins: the last response."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE:
        i -= 1
    return i


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "qa.txt"
    path.write_text("Q: {instruction}\nContext: {input}\nA: {output}\n")
    return str(path)


@pytest.mark.parametrize("name", ["alpaca", "alpaca-seed", "chat", "file"])
@pytest.mark.parametrize("example", [Example(1, "say hello", "", "hello world"), Example(2, "add", "1 and 2", "3"), CHAT],
                         ids=["no-input", "input", "chat-record"])
@pytest.mark.parametrize("add_eos", [True, False])
def test_generation_prompt_is_training_input_up_to_the_last_response(tok, name, example, add_eos, template_file):
    template = get_template(template_file if name == "file" else name)
    enc = encode_batch([example], tok, template, LabelPolicy(add_eos=add_eos, max_length=10_000))[0]
    start = last_response_start(enc.labels)
    assert 0 < start < len(enc.input_ids)
    assert encode_example_prompt(example, tok, template, add_eos) == enc.input_ids[:start]


def test_multi_turn_prompt_closes_earlier_answers_with_eos_only_when_trained_so(tok):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "bye"}]
    alpaca = get_template("alpaca")
    with_eos = tok.decode(encode_prompt(history, tok, alpaca, add_eos=True))
    without = tok.decode(encode_prompt(history, tok, alpaca, add_eos=False))
    assert with_eos == ("### Instruction:\nhi\n\n### Response:\nhello<|im_end|>\n\n"
                        "### Instruction:\nbye\n\n### Response:\n")
    assert without == with_eos.replace("<|im_end|>", "")
    chat = tok.decode(encode_prompt(history, tok, get_template("chat")))
    assert chat.endswith("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n") and "hello<|im_end|>" in chat


def test_chat_records_under_alpaca_train_on_assistant_turns_only(tok):
    enc = encode_batch([CHAT], tok, get_template("alpaca"), LabelPolicy())[0]
    trained = tok.decode([t for t in enc.labels if t != IGNORE])
    assert trained == "hello<|im_end|>bye now<|im_end|>"
    assert tok.decode(enc.input_ids).startswith("be brief\n\n### Instruction:\nhi there\n\n### Response:\nhello")


def test_chat_record_defects_have_lines_and_fields(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [
        good,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"messages": ["hi", {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
        {"messages": []},
    ])
    found = {(i.line, i.field): i.reason for i in validate_file(path).issues}
    assert set(found) == {(2, "messages[1].content"), (3, "messages[0].content"), (4, "messages[0]"),
                          (5, "messages"), (6, "messages[0].content"), (7, "messages")}
    assert "blank" in found[(2, "messages[1].content")] and "missing" in found[(3, "messages[0].content")]
    assert "last message" in found[(5, "messages")] and "surrogate" in found[(6, "messages[0].content")]
    res = runner.invoke(app, ["validate-data", str(path)])
    assert res.exit_code == 1 and f"{path}:5" in res.output and "Traceback" not in res.output


def test_editing_a_template_file_changes_the_cache_key(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_records(6))
    tpl = tmp_path / "tpl.txt"

    def key() -> str:
        res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(train), "--template",
                                  str(tpl), "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)[0]["key"]

    tpl.write_text("Q: {instruction} {input}\nA: {output}")
    first = key()
    tpl.write_text("Question: {instruction} {input}\nAnswer: {output}")
    assert key() != first
