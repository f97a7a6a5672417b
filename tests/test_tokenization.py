"""Templates and labels: response-only by default, eos appended (pad == eos), truncation."""

import pytest

from lora_cli.data.records import Example
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import LabelPolicy, encode_batch, encode_prompt
from lora_cli.errors import LoraCliError
from lora_cli.model.loss import IGNORE


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def text(segs):
    return "".join(t for t, _ in segs)


def test_alpaca_leaves_out_an_empty_input_block_and_seed_keeps_it():
    ex = Example(1, "Name a color.", "", "Red.")
    assert text(get_template("alpaca").segments(ex)) == "### Instruction:\nName a color.\n\n### Response:\nRed."
    assert text(get_template("alpaca-seed").segments(ex)) == (
        "### Instruction:\nName a color.\n\n### Input:\n\n\n### Response:\nRed.")
    with_input = Example(1, "Add.", "1 and 2", "3")
    assert text(get_template("alpaca").segments(with_input)) == (
        "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n3")


def test_braces_in_data_are_not_template_placeholders():
    ex = Example(1, "Echo {input} and {output}", "{instruction}", "ok")
    assert "Echo {input} and {output}" in text(get_template("alpaca").segments(ex))


def test_response_only_labels_with_eos_even_though_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # the trap this guards against
    ex = Example(1, "say hello", "", "hello world")
    enc = encode_batch([ex], tok, get_template("alpaca"), LabelPolicy())[0]
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
    trained = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(trained) == "hello world<|im_end|>"
    prompt_len = enc.labels.index(trained[0])
    assert all(t == IGNORE for t in enc.labels[:prompt_len])
    assert tok.decode(enc.input_ids[:prompt_len]).endswith("### Response:\n")


def test_seed_behaviour_flags(tok):
    ex = Example(1, "say hello", "", "hello world")
    enc = encode_batch([ex], tok, get_template("alpaca"), LabelPolicy(train_on_prompt=True, add_eos=False))[0]
    assert enc.labels == enc.input_ids and enc.input_ids[-1] != tok.eos_token_id


def test_truncation_at_max_length(tok):
    ex = Example(1, "say " * 50, "", "word " * 50)
    enc = encode_batch([ex], tok, get_template("alpaca"), LabelPolicy(max_length=40))[0]
    assert len(enc.input_ids) == 40 and enc.truncated


def test_generation_prompt_is_the_training_prompt(tok):
    ex = Example(1, "say hello", "x", "hello world")
    template = get_template("alpaca")
    enc = encode_batch([ex], tok, template, LabelPolicy())[0]
    first_label = next(i for i, t in enumerate(enc.labels) if t != IGNORE)
    user = "say hello\n\nx"
    assert encode_prompt([{"role": "user", "content": user}], tok, get_template("alpaca")) != []
    chat = get_template("chat")
    enc_chat = encode_batch([ex], tok, chat, LabelPolicy())[0]
    start = next(i for i, t in enumerate(enc_chat.labels) if t != IGNORE)
    assert encode_prompt([{"role": "user", "content": user}], tok, chat) == enc_chat.input_ids[:start]
    assert first_label > 0


def test_chat_template_trains_on_every_assistant_turn(tok):
    ex = Example(1, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                              {"role": "assistant", "content": "see you"}])
    enc = encode_batch([ex], tok, get_template("chat"), LabelPolicy())[0]
    trained = tok.decode([t for t in enc.labels if t != IGNORE])
    assert trained == "hello<|im_end|>see you<|im_end|>"
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi")


def test_template_file_and_bad_template(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Q: {instruction} {input}\nA: {output}</s>")
    segs = get_template(str(path)).segments(Example(1, "why", "", "because"))
    assert segs == [("Q: why \nA: ", False), ("because</s>", True)]
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholders")
    with pytest.raises(LoraCliError, match="exactly one"):
        get_template(str(bad))
    with pytest.raises(LoraCliError, match="Unknown template"):
        get_template("nonesuch")


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """A Llama 3 style tokenizer: a BOS added in front of every text, and a chat template that writes
    `{{ bos_token }}` itself (as Llama 3's, Gemma's and Mistral's do)."""
    from tiny_models import LLAMA3_CHAT, build_llama_tokenizer

    tok = build_llama_tokenizer(tmp_path_factory.mktemp("bos-tok"))
    tok.chat_template = "{{ bos_token }}" + LLAMA3_CHAT
    return tok


CONVERSATION = [{"role": "user", "content": "count to two"}, {"role": "assistant", "content": "one two"},
                {"role": "user", "content": "and to three"}, {"role": "assistant", "content": "one two three"}]


def test_a_chat_record_trains_on_the_tokens_apply_chat_template_gives_with_one_bos(bos_tok):
    enc = encode_batch([Example(1, messages=CONVERSATION)], bos_tok, get_template("chat"), LabelPolicy())[0]
    reference = bos_tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(reference)
    assert enc.input_ids[:2] == [bos_tok.bos_token_id, bos_tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert bos_tok.decode([t for t in enc.labels if t != IGNORE]) == "one two<|eot_id|>one two three<|eot_id|>"


def test_the_chat_prompt_is_apply_chat_template_with_the_generation_prompt(bos_tok):
    ids = encode_prompt(CONVERSATION[:1], bos_tok, get_template("chat"))
    reference = bos_tok.apply_chat_template(CONVERSATION[:1], tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
    assert ids == list(reference) and ids.count(bos_tok.bos_token_id) == 1


@pytest.mark.parametrize("template_text", ["<|begin_of_text|>{instruction}\n{output}", "{instruction}\n{output}"])
def test_a_template_that_writes_the_bos_and_one_that_leaves_it_to_the_tokenizer_both_give_one(bos_tok, tmp_path,
                                                                                              template_text):
    path = tmp_path / "t.txt"
    path.write_text(template_text)
    enc = encode_batch([Example(1, "hello", "", "world")], bos_tok, get_template(str(path)), LabelPolicy())[0]
    assert enc.input_ids.count(bos_tok.bos_token_id) == 1 and enc.input_ids[0] == bos_tok.bos_token_id
    assert enc.labels[0] == IGNORE


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_an_assistant_turn_of_weight_0_is_in_the_prompt_but_not_trained(tok, template):
    from lora_cli.data.records import parse_line

    raw = ('{"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "bad answer", '
           '"weight": 0}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello"}]}')
    example, issues = parse_line(raw.encode(), 1, "f.jsonl")
    assert issues == []
    enc = encode_batch([example], tok, get_template(template), LabelPolicy())[0]
    assert "bad answer" + tok.eos_token in tok.decode(enc.input_ids)  # closed as every answer is
    assert tok.decode([t for t in enc.labels if t != IGNORE]).replace(tok.eos_token, "").strip() == "hello"


@pytest.mark.parametrize("messages, field", [
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]', "messages[1].weight"),
    ('[{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]', "messages[0].weight"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]', "messages"),
])
def test_a_weight_that_is_not_0_or_1_on_an_assistant_turn_or_that_leaves_nothing_to_learn_is_refused(messages, field):
    from lora_cli.data.records import parse_line

    example, issues = parse_line(f'{{"messages": {messages}}}'.encode(), 7, "f.jsonl")
    assert example is None and [i.field for i in issues] == [field] and issues[0].line == 7
