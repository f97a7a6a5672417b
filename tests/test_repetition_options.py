"""--repetition-penalty and --no-repeat-ngram-size: passed to transformers' generate, recorded by eval, loss untouched."""

import json

import pytest
from helpers.adapter_factory import data_dir, make_adapter, peaked_model_dir
from typer.testing import CliRunner

from lora_cli.adapter.folder import read_adapter
from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError
from lora_cli.infer.generation import Sampling, generate, load_for_inference

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return make_adapter(tmp_path_factory, peaked_model_dir(tmp_path_factory, tiny_model_dir), "stopper")


def test_sampling_passes_both_options_to_generate_and_checks_them():
    kwargs = Sampling(repetition_penalty=1.3, no_repeat_ngram_size=3).generate_kwargs([2], 2)
    assert kwargs["repetition_penalty"] == 1.3 and kwargs["no_repeat_ngram_size"] == 3
    assert Sampling().generate_kwargs([2], 2)["repetition_penalty"] == 1.0  # off, whatever the model's config says
    with pytest.raises(LoraCliError, match="--repetition-penalty"):
        Sampling(repetition_penalty=0)
    with pytest.raises(LoraCliError, match="--no-repeat-ngram-size"):
        Sampling(no_repeat_ngram_size=-1)


def test_no_repeat_ngram_size_stops_a_greedy_loop(adapter):
    loaded = load_for_inference(read_adapter(adapter), precision="fp32", device="cpu", with_adapter=False)
    from lora_cli.data.records import Example

    prompts = [loaded.example_prompt(Example(0, text)) for text in ("red house 3", "add two numbers", "the cat")]
    looping = generate(loaded, prompts, Sampling(max_new_tokens=24))
    assert any(len(set(a.token_ids)) < len(a.token_ids) for a in looping)  # the random base repeats itself
    free = generate(loaded, prompts, Sampling(max_new_tokens=24, no_repeat_ngram_size=1))
    assert all(len(set(a.token_ids)) == len(a.token_ids) for a in free)


def test_eval_records_the_options_and_its_loss_does_not_depend_on_them(adapter, tmp_path_factory):
    val = data_dir(tmp_path_factory)[1]
    plain = json.loads(runner.invoke(app, ["eval", "-a", str(adapter), "--data", str(val), "-n", "8",
                                           "--json"]).stdout)
    res = runner.invoke(app, ["eval", "-a", str(adapter), "--data", str(val), "-n", "8", "--json",
                              "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"])
    assert res.exit_code == 0, res.output
    penalised = json.loads(res.stdout)
    assert penalised["sampling"]["repetition_penalty"] == 1.3 and penalised["sampling"]["no_repeat_ngram_size"] == 2
    assert plain["sampling"]["repetition_penalty"] == 1.0
    assert penalised["loss"] == plain["loss"]  # teacher-forced: the answers' decoding plays no part
    table = runner.invoke(app, ["eval", "-a", str(adapter), "--data", str(val), "-n", "8",
                                "--repetition-penalty", "1.3"]).stdout
    assert "greedy, repetition penalty 1.3" in table
    res = runner.invoke(app, ["chat", "-a", str(adapter), "--no-repeat-ngram-size", "-2"], input="hi\n/exit\n")
    assert res.exit_code == 1 and "--no-repeat-ngram-size must be >= 0" in res.output
