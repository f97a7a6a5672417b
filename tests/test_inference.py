"""Loading base + adapter as trained, generating (greedy, sampled, streamed, batched), and eval's numbers."""

import json
import shutil

import pytest
import yaml
from helpers import make_records, write_jsonl
from helpers.adapter_factory import data_dir, make_adapter, peaked_model_dir

from lora_cli.adapter.folder import load_template, read_adapter
from lora_cli.adapter.packaging import open_adapter
from lora_cli.data.tokenization import LabelPolicy, encode_batch
from lora_cli.errors import LoraCliError
from lora_cli.infer.evaluation import evaluate, read_examples
from lora_cli.infer.generation import Sampling, generate, load_for_inference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    return peaked_model_dir(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def stopper(tmp_path_factory, model_dir):
    """lora-cli's defaults (response only, eos appended), trained to answer 'yes'."""
    return make_adapter(tmp_path_factory, model_dir, "stopper")


@pytest.fixture(scope="module")
def rambler(tmp_path_factory, model_dir):
    """The reference recipe's behaviour (labels on the prompt, no eos, empty Input block kept)."""
    return make_adapter(tmp_path_factory, model_dir, "rambler", **{
        "data.add_eos": False, "data.train_on_prompt": True, "data.template": "alpaca-seed"})


@pytest.fixture(scope="module")
def loaded(stopper):
    return load_for_inference(read_adapter(stopper), precision="fp32", device="cpu")


def val_examples(tmp_path_factory):
    return read_examples(data_dir(tmp_path_factory)[1])


def test_eos_trained_adapter_stops_and_beats_base_and_reference_recipe(tmp_path_factory, loaded, rambler):
    examples = val_examples(tmp_path_factory)
    after = evaluate(loaded, examples, "val", max_new_tokens=8)
    before = evaluate(loaded, examples, "val", max_new_tokens=8, use_adapter=False)
    seed = evaluate(load_for_inference(read_adapter(rambler), precision="fp32", device="cpu"), examples, "val",
                    max_new_tokens=8)
    assert after.stop_rate == 1.0 and before.stop_rate == 0.0 and seed.stop_rate < after.stop_rate
    assert after.loss < before.loss and after.loss < seed.loss
    assert after.loss_text < before.loss_text
    assert {a["answer"] for a in after.answers} >= {"yes"} and all(a["stopped"] for a in after.answers)
    assert not any(a["stopped"] for a in seed.answers if a["new_tokens"] == 8)
    # scored targets: "yes" + eos per record (response only, whatever the adapter was trained with)
    per_record = len(loaded.tokenizer("yes", add_special_tokens=False)["input_ids"]) + 1
    assert after.response_tokens == seed.response_tokens == per_record * len(examples)


def test_loss_equals_a_direct_computation(tmp_path_factory, loaded):
    import torch

    examples = val_examples(tmp_path_factory)[:2]
    got = evaluate(loaded, examples, "val", stop_rate=False)
    total, n = 0.0, 0
    for enc in encode_batch(examples, loaded.tokenizer, loaded.template, LabelPolicy()):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1]
        labels = torch.tensor(enc.labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        n += int((labels != -100).sum())
    assert got.loss == pytest.approx(total / n, rel=1e-4) and got.stop_rate is None and got.response_tokens == n


def test_batched_left_padded_generation_equals_one_by_one(loaded):
    prompts = [loaded.chat_prompt([{"role": "user", "content": text}])
               for text in ("red", "list three colors and one number", "red blue", "translate the word house into french now")]
    assert len({len(p) for p in prompts}) == 4  # left padding differs per row
    params = Sampling(max_new_tokens=6)
    one = [generate(loaded, [p], params)[0].token_ids for p in prompts]
    assert [a.token_ids for a in generate(loaded, prompts, params, batch_size=4)] == one
    for use_adapter in (False, True):  # base answers too, through the switched-off adapter
        alone = [generate(loaded, [p], params, use_adapter=use_adapter)[0].text for p in prompts]
        assert [a.text for a in generate(loaded, prompts, params, batch_size=3, use_adapter=use_adapter)] == alone


def test_streaming_gives_the_same_text_and_sampling_is_seeded(loaded):
    prompt = loaded.chat_prompt([{"role": "user", "content": "hello world"}])
    pieces = []
    plain = generate(loaded, [prompt], Sampling(max_new_tokens=8), use_adapter=False)[0]
    streamed = generate(loaded, [prompt], Sampling(max_new_tokens=8), use_adapter=False, on_text=pieces.append)[0]
    assert "".join(pieces) == streamed.text == plain.text and plain.text
    hot = Sampling(max_new_tokens=8, temperature=5.0, top_k=50, top_p=0.95, seed=3)
    runs = [generate(loaded, [prompt] * 3, hot, use_adapter=False) for _ in range(2)]
    assert [a.token_ids for a in runs[0]] == [a.token_ids for a in runs[1]]  # same seed, same draws
    assert len({tuple(a.token_ids) for a in runs[0]}) > 1  # but it does sample


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max-new-tokens"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"), ({"top_k": -1}, "top-k")])
def test_bad_sampling_values_are_errors(kwargs, match):
    with pytest.raises(LoraCliError, match=match):
        Sampling(**kwargs)


def test_base_is_loaded_as_it_was_trained_unless_overridden(stopper, tmp_path, model_dir):
    import bitsandbytes as bnb

    nf4 = tmp_path / "nf4-adapter"
    shutil.copytree(stopper, nf4, ignore=shutil.ignore_patterns("checkpoints"))
    run = yaml.safe_load((nf4 / "run_config.yaml").read_text())
    run["model"]["quantization"] = "nf4"
    (nf4 / "run_config.yaml").write_text(yaml.safe_dump(run))

    def n4(model):
        return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    assert n4(load_for_inference(read_adapter(nf4), precision="fp32", device="cpu").model) > 0
    assert n4(load_for_inference(read_adapter(nf4), quantization="none", precision="fp32", device="cpu").model) == 0
    assert n4(load_for_inference(read_adapter(stopper), precision="fp32", device="cpu").model) == 0


def test_adapter_folder_problems_are_clear_errors(tmp_path, stopper):
    with pytest.raises(LoraCliError, match="does not exist"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LoraCliError, match="neither an adapter folder nor an adapter zip"):
        read_adapter(tmp_path / "file.txt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(LoraCliError, match="not an adapter folder") as exc:
        read_adapter(tmp_path / "run")
    assert "--resume" in exc.value.hint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(LoraCliError, match="safetensors only"):
        read_adapter(pickled)
    broken = tmp_path / "broken"
    shutil.copytree(stopper, broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraCliError, match="not valid JSON"):
        read_adapter(broken)


def test_run_config_decides_the_template_and_its_absence_is_noted(tmp_path, stopper):
    info = read_adapter(stopper)
    assert (info.template, info.add_eos, info.quantization, info.max_length) == ("alpaca", True, "none", 64)
    assert read_adapter(stopper, template="chat").template == "chat"
    bare = tmp_path / "bare"
    shutil.copytree(stopper, bare, ignore=shutil.ignore_patterns("run_config.yaml", "checkpoints"))
    info = read_adapter(bare)
    assert info.notes and info.template == "alpaca" and info.quantization == "nf4"
    assert info.base_model == json.loads((stopper / "adapter_config.json").read_text())["base_model_name_or_path"]
    info.template = str(tmp_path / "gone.txt")
    with pytest.raises(LoraCliError, match="does not exist here"):
        load_template(info)


def test_a_packaged_zip_works_as_the_adapter(tmp_path, stopper):
    from lora_cli.adapter.packaging import package

    package(stopper, tmp_path / "a.zip")
    with open_adapter(tmp_path / "a.zip") as info:
        assert info.path.is_dir() and (info.path / "adapter_model.safetensors").is_file()
        folder = info.path
    assert not folder.exists()  # unpacked for the block only


def test_eval_data_defects_are_listed_with_line_numbers(tmp_path):
    from lora_cli.errors import DataError

    path = write_jsonl(tmp_path / "v.jsonl", [*make_records(2), "{oops", {"instruction": "x"}])
    with pytest.raises(DataError) as exc:
        read_examples(path)
    assert [(i.line, i.field) for i in exc.value.issues] == [(3, ""), (4, "output")]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoraCliError, match="no records"):
        read_examples(tmp_path / "empty.jsonl")


def test_eager_generation_is_said_once_with_its_reason_and_answers_as_the_fast_path(tmp_path_factory, stopper, loaded,
                                                                                  monkeypatch):
    from helpers import RecordingReporter

    prompts = [loaded.example_prompt(ex) for ex in val_examples(tmp_path_factory)[:3]]
    fast = generate(loaded, prompts, Sampling(max_new_tokens=6))
    monkeypatch.setenv("LORA_CLI_EAGER_GENERATE", "1")
    reporter = RecordingReporter()
    eager_loaded = load_for_inference(read_adapter(stopper), precision="fp32", device="cpu", reporter=reporter)
    eager = [generate(eager_loaded, prompts, Sampling(max_new_tokens=6)) for _ in range(2)][-1]
    assert reporter.messages.count("Generating eagerly (slower): LORA_CLI_EAGER_GENERATE=1 is set.") == 1
    assert [a.token_ids for a in eager] == [a.token_ids for a in fast]
