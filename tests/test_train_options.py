"""Training options through peft/transformers/torch: each trains, its adapter loads as trained, resume stays exact.

On the tiny fp32 model (unquantized: pissa and olora need it, and the logits then compare
exactly). The model's logits at the moment the adapter is written are recorded, and the adapter
loaded back as generate loads it, and merged, must give the same ones.
"""

import json
import math

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file
from test_resume import Crash, assert_same_run, at_step, crash
from typer.testing import CliRunner

from lora_cli import faults
from lora_cli.adapter.folder import read_adapter
from lora_cli.adapter.merging import merge
from lora_cli.cli.app import app
from lora_cli.config import RunConfig
from lora_cli.infer.generation import load_for_inference
from lora_cli.train.checkpoint import list_checkpoints
from lora_cli.train.recipe import train

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
IDS = torch.tensor([[5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 33, 120]])
OPTIONS = {
    "dora": {"lora.use_dora": True},
    "rslora": {"lora.use_rslora": True},
    "gaussian": {"lora.init_lora_weights": "gaussian"},
    "pissa": {"lora.init_lora_weights": "pissa"},
    "olora": {"lora.init_lora_weights": "olora"},
    "loraplus": {"train.loraplus_lr_ratio": 16.0},
    "neftune": {"train.neftune_alpha": 5.0},
    "warmup-ratio-cosine-floor": {"train.warmup_ratio": 0.2, "train.scheduler": "cosine", "train.min_lr_ratio": 0.1},
}


def config(model_dir, data_files, out, options: dict, **train):
    train_f, val_f = data_files
    settings = dict(epochs=2, lr=5e-3, max_tokens=128, log_every=1) | train
    raw = tiny_config(model_dir, train_f, val_f, out, **settings).model_dump()
    raw["model"]["quantization"] = "none"
    for key, value in options.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return RunConfig.from_dict(raw)


@pytest.fixture
def spies():
    """Records each trainable tensor before and after the loop, and the model's logits when the adapter is written."""
    seen = {}

    def begin(loop):
        seen["before"] = {id(p): p.detach().clone() for p in loop.trainable.params}
        return loop

    def end(loop):
        seen["changed"] = [not torch.equal(seen["before"][id(p)], p.detach()) for p in loop.trainable.params]
        loop.model.eval()
        with torch.no_grad():
            seen["logits"] = loop.model(input_ids=IDS).logits.float()
        loop.model.train()
        return loop

    with faults.inject("train:begin", begin), faults.inject("train:end", end):
        yield seen


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_trains_and_its_adapter_loads_in_generate_and_merge(name, tiny_model_dir, data_files, tmp_path,
                                                                      spies):
    out = tmp_path / "adapters"
    result = train(config(tiny_model_dir, data_files, out, OPTIONS[name]))
    assert result.summary.eval_losses[-1] < result.summary.eval_losses[0]
    assert spies["changed"] and all(spies["changed"]), "a trainable tensor did not change"
    loaded = load_for_inference(read_adapter(out), precision="fp32", device="cpu")
    with torch.no_grad():
        served = loaded.model(input_ids=IDS).logits.float()
        with loaded.model.disable_adapter():
            untouched = loaded.model(input_ids=IDS).logits.float()
    assert (spies["logits"] - untouched).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(served, spies["logits"], atol=1e-4), "generate would not see the model that was trained"
    merge(read_adapter(out), tmp_path / "merged", dtype="fp32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits.float(), served, atol=1e-4)
    saved = json.loads((out / "adapter_config.json").read_text())
    if name in ("pissa", "olora"):  # peft's conversion: a plain LoRA of twice the rank on the original base
        assert saved["r"] == 32 and saved["init_lora_weights"] is True
    assert saved["use_dora"] == (name == "dora") and saved["use_rslora"] == (name == "rslora")


@pytest.mark.parametrize("name,options", [
    ("combined", {k: v for opt in ("dora", "rslora", "gaussian", "loraplus", "neftune", "warmup-ratio-cosine-floor")
                  for k, v in OPTIONS[opt].items()}),
    ("pissa", OPTIONS["pissa"]),
    ("olora", OPTIONS["olora"]),
])
def test_resume_is_exact_with_the_options(name, options, tiny_model_dir, data_files, tmp_path):
    reference = tmp_path / "reference"
    train(config(tiny_model_dir, data_files, reference, options, save_every_steps=2, keep_checkpoints=10))
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, options, save_every_steps=2, keep_checkpoints=10)
    with at_step(5, crash), pytest.raises(Crash):
        train(cfg)
    assert list_checkpoints(out)[-1].name == "step-4"
    train(cfg, resume=True)
    assert_same_run(out, reference)


def test_warmup_ratio_and_the_cosine_floor_shape_the_learning_rate(tiny_model_dir, data_files, tmp_path):
    options = OPTIONS["warmup-ratio-cosine-floor"]
    result = train(config(tiny_model_dir, data_files, tmp_path / "a", options, eval_at_start=False))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["type"] == "train"]
    warmup = math.ceil(0.2 * result.summary.steps)
    assert result.decisions.warmup_steps == warmup > 0
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(5e-3)  # linear warmup from 0 to the peak
    after = lrs[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # then cosine decay...
    assert min(after) > 0.1 * 5e-3  # ...towards the floor, never below it


def test_early_stopping_stops_and_keeps_the_best_adapter(tiny_model_dir, data_files, tmp_path):
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])  # before training, then after epochs 1, 2, 3, ...
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, {"train.early_stopping_patience": 2}, epochs=5, keep_checkpoints=1)
    with faults.inject("train:eval-loss", lambda _: next(losses)):
        result = train(cfg)
    assert result.summary.best.stopped_early and result.summary.best.checkpoint == "epoch-1"
    assert result.summary.eval_losses == [3.0, 2.0, 2.5, 2.6]  # stopped after two evaluations without a better loss
    steps_per_epoch = result.summary.best.step
    assert result.summary.steps == 3 * steps_per_epoch < cfg.train.epochs * steps_per_epoch
    kept = [p.name for p in list_checkpoints(out)]
    assert kept == ["epoch-1", "epoch-3"]  # the best survives keep_checkpoints=1
    best, written = load_file(str(out / "checkpoints" / "epoch-1" / "adapter_model.safetensors")), \
        load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoints" / "epoch-3" / "adapter_model.safetensors"))
    assert best.keys() == written.keys() and all(torch.equal(best[k], written[k]) for k in best)
    assert any(not torch.equal(last[k], written[k]) for k in last)
    saved = (out / "run_config.yaml").read_text()
    assert "stopped_early: true" in saved and "checkpoint: epoch-1" in saved


def test_neftune_noise_is_added_in_training_mode_only(tiny_model_dir):
    from types import SimpleNamespace

    from lora_cli.model.load import load_model
    from lora_cli.train.recipe import _attach

    cfg = RunConfig().replace({"train.neftune_alpha": 5.0, "model.quantization": "none"})
    plan = SimpleNamespace(upcast=False, checkpoint_layers=0, compile="off", dequantize=False)
    model, _ = _attach(cfg, load_model(tiny_model_dir, "none", "fp32", "cpu"), plan, tiny_model_dir)
    embeddings = model.get_input_embeddings()
    clean = torch.nn.functional.embedding(IDS, embeddings.weight)
    model.train()
    assert not torch.equal(embeddings(IDS), clean)
    model.eval()
    assert torch.equal(embeddings(IDS), clean)


@pytest.mark.parametrize("args,message", [
    (["--init-lora-weights", "pissa"], "rewrites the base weights"),
    (["--init-lora-weights", "olora", "--quantization", "nf4"], "rewrites the base weights"),
    (["--init-lora-weights", "loftq", "--quantization", "none"], "offsets the error of the 4-bit"),
    (["--init-lora-weights", "loftq"], "loftq needs a CUDA GPU"),
    (["--init-lora-weights", "loftq", "--dequantize", "on"], "replaces them before LoRA is attached"),
    (["--init-lora-weights", "pissa", "--quantization", "none", "--use-dora"], "do not go together"),
    (["--min-lr-ratio", "0.1"], "a floor applies to --scheduler cosine only"),
    (["--warmup-ratio", "0.1", "--warmup-steps", "3"], "not both"),
    (["--early-stopping-patience", "2"], "there is no --val data"),
    (["--report-to", "tensorboard,comet"], "choose none or a comma list of tensorboard, wandb, mlflow, not 'comet'"),
])
def test_options_that_cannot_run_are_one_message_before_the_model_loads(args, message, tiny_model_dir, data_files,
                                                                         tmp_path):
    train_f, _ = data_files
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--device", "cpu",
                              "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 1, res.output
    assert message in res.output.replace("\n", " ") and "Traceback" not in res.output
    assert "Loading" not in res.output and not (tmp_path / "o").exists()


def test_a_warmup_as_long_as_the_run_is_capped_at_a_tenth_of_it_and_said():
    import torch

    from lora_cli.config import TrainConfig
    from lora_cli.train.optim import make_scheduler, warmup_note, warmup_steps

    long = TrainConfig(warmup_steps=100, lr=2e-4, scheduler="linear")
    assert warmup_steps(long, 3) == 1 and warmup_steps(long, 40) == 4 and warmup_steps(long, 101) == 100
    assert warmup_note(long, 3) == ("--warmup-steps 100 is not shorter than the run (3 optimizer steps): warming up "
                                    "for 1 instead, so the learning rate reaches --lr.")
    assert warmup_note(long, 101) is None and warmup_note(TrainConfig(warmup_ratio=0.5), 3) is None
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler, lrs = make_scheduler(optimizer, long, 3), []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(2e-4)  # uncapped: 0, 2e-6, 4e-6
