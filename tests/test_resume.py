"""Resume: a stopped run, resumed, ends exactly where an uninterrupted run ends.

In-process on the tiny fp32 model. Runs are stopped with a real SIGINT (the Ctrl-C path), a
SIGTERM, or a crash at a chosen optimizer step (the `train:step` point of the kill hook), and
resumed with `--resume` (latest checkpoint) or `--resume-from PATH`.
"""

import json
import signal

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from lora_cli import faults
from lora_cli.errors import LoraCliError, TrainingInterrupted
from lora_cli.train.checkpoint import list_checkpoints, load_checkpoint
from lora_cli.train.recipe import train

pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Exception):
    """Stands in for a process dying between two checkpoints."""


def config(model_dir, data_files, out, **overrides):
    train_f, val_f = data_files
    settings = dict(epochs=3, lr=5e-3, max_tokens=128, log_every=1, keep_checkpoints=2) | overrides
    return tiny_config(model_dir, train_f, val_f, out, **settings).replace({"model.quantization": "none"})


def at_step(n, action):
    """Within the block, run `action` right after the n-th optimizer step (the `train:step` fault point)."""
    seen = {"steps": 0}

    def step(_):
        seen["steps"] += 1
        if seen["steps"] == n:
            action()

    return faults.inject("train:step", step)


def crash():
    raise Crash()


def metrics(folder):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s", None)  # wall-clock
    return rows


def max_weight_diff(a, b) -> float:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_run(a, b):
    assert max_weight_diff(a, b) <= 1e-6
    assert metrics(a) == metrics(b)  # every row from the resume point on, all fields but the wall-clock one


@pytest.fixture
def reference(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "reference"
    train(config(tiny_model_dir, data_files, out))
    return out


def epoch_steps(reference, epoch):
    return next(r["step"] for r in metrics(reference) if r["type"] == "eval" and r["epoch"] == epoch)


def test_ctrl_c_at_the_end_of_epoch_1_then_resume_matches_the_uninterrupted_run(
        tiny_model_dir, data_files, tmp_path, reference):
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out)
    with at_step(epoch_steps(reference, 1), lambda: signal.raise_signal(signal.SIGINT)), \
            pytest.raises(TrainingInterrupted) as stop:
        train(cfg)
    assert stop.value.exit_code == 130 and stop.value.checkpoint.endswith("epoch-1")
    assert [r["type"] for r in metrics(out)][-1] == "eval"  # the epoch ended (eval, checkpoint) before stopping
    result = train(cfg, resume=True)
    assert result.resumed_from.endswith("epoch-1")
    assert_same_run(out, reference)
    assert result.summary.eval_losses == [r["eval_loss"] for r in metrics(reference) if r["type"] == "eval"]


def test_crash_mid_epoch_resumes_from_a_save_every_steps_checkpoint(tiny_model_dir, data_files, tmp_path):
    ref = tmp_path / "reference"
    train(config(tiny_model_dir, data_files, ref, save_every_steps=2, keep_checkpoints=10))
    names = [p.name for p in list_checkpoints(ref)]
    assert any(n.startswith("step-") for n in names) and names[-1] == "epoch-3"
    first = epoch_steps(ref, 1)
    stop_at = next(s for s in range(first + 2, first + 10) if s % 2 == 1)  # one step after a step-N checkpoint
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, save_every_steps=2, keep_checkpoints=10)
    with at_step(stop_at, crash), pytest.raises(Crash):
        train(cfg)
    latest = list_checkpoints(out)[-1]
    state = load_checkpoint(latest).state
    assert latest.name == f"step-{stop_at - 1}" and state.epoch == 1 and state.step_in_epoch > 0  # mid-epoch 2
    assert train(cfg, resume=True).resumed_from == str(latest)
    assert_same_run(out, ref)


def test_resume_from_an_older_checkpoint_replaces_the_abandoned_later_ones(tiny_model_dir, data_files, tmp_path,
                                                                          reference):
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, keep_checkpoints=3)
    train(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["epoch-1", "epoch-2", "epoch-3"]
    stop_at = epoch_steps(reference, 1) + 1  # --resume-from epoch-1, then Ctrl-C one step into epoch 2
    with at_step(1, lambda: signal.raise_signal(signal.SIGINT)), pytest.raises(TrainingInterrupted):
        train(cfg, resume=str(out / "checkpoints" / "epoch-1"))
    # epoch-2 and epoch-3 belonged to the abandoned timeline: a later --resume must not pick them
    assert [p.name for p in list_checkpoints(out)] == ["epoch-1", f"step-{stop_at}"]
    train(cfg, resume=True)
    assert_same_run(out, reference)


def test_keep_checkpoints_prunes_to_the_newest(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapters"
    result = train(config(tiny_model_dir, data_files, out, save_every_steps=1, keep_checkpoints=3))
    kept = list_checkpoints(out)
    assert [load_checkpoint(p).state.step for p in kept] == [result.summary.steps - 2, result.summary.steps - 1, result.summary.steps]
    assert kept[-1].name == "epoch-3"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(p.name for p in kept)


def test_sigterm_checkpoints_and_exits_143(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out)

    def unhandled(signum, frame):  # in place of the default action, which would end pytest itself
        raise AssertionError("SIGTERM reached the default handler: training did not catch it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with at_step(2, lambda: signal.raise_signal(signal.SIGTERM)), pytest.raises(TrainingInterrupted) as stop:
            train(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.exit_code == 143 and stop.value.checkpoint.endswith("step-2")
    assert load_checkpoint(out / "checkpoints" / "step-2").state.step == 2


def test_resume_needs_the_same_settings_except_logging(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out)
    with at_step(2, crash), pytest.raises(Crash):
        train(cfg.replace({"train.save_every_steps": 1}))  # checkpoint step-1, then the crash
    with pytest.raises(LoraCliError, match="other settings.*train.lr"):
        train(cfg.replace({"train.lr": 1e-3}), resume=True)
    with pytest.raises(LoraCliError, match="no checkpoint"):
        train(cfg.replace({"output.dir": str(tmp_path / "empty")}), resume=True)
    with pytest.raises(LoraCliError, match="^--resume-from .*: not a checkpoint folder"):  # the flag given
        train(cfg, resume=str(tmp_path))
    assert train(cfg.replace({"train.log_every": 3, "train.keep_checkpoints": 1}), resume=True).summary.steps > 2


def test_the_printed_resume_command_continues_from_the_latest_checkpoint():
    from lora_cli.train.launch import resume_command

    argv = ["train", "--model", "my model", "--resume-from", "a/checkpoints/epoch-1", "--overwrite", "-e", "3"]
    assert resume_command(argv, env={}) == "lora-cli train --model 'my model' -e 3 --resume"
    assert resume_command(["train", "--resume-from=x", "--resume"], env={}) == "lora-cli train --resume"
    two_gpus = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}  # started by --gpus 2, which the workers' argv lacks
    assert resume_command(["train", "-e", "3"], env=two_gpus) == "lora-cli train -e 3 --gpus 2 --resume"
    sharded = dict(two_gpus, ACCELERATE_USE_FSDP="true")
    assert resume_command(["train", "-e", "3"], env=sharded) == "lora-cli train -e 3 --gpus 2 --fsdp --resume"
    assert resume_command(["train"], env={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == "lora-cli train --resume"


def test_resuming_after_the_data_file_changed_in_place_is_refused_naming_the_file(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, save_every_steps=1)
    with at_step(2, crash), pytest.raises(Crash):
        train(cfg)
    train_f = data_files[0]
    rows = train_f.read_text().splitlines()
    train_f.write_text("\n".join(rows[:-1] + [rows[-1].replace('"output": "', '"output": "changed ')]) + "\n")
    with pytest.raises(LoraCliError) as refused:
        train(cfg, resume=True)
    assert f"belongs to a run with other settings or data (data.train {train_f}: its content changed (sha256 " \
        in refused.value.message  # the one difference, named: the file, not a setting
    with pytest.raises(LoraCliError, match=f"holds a different run .*data.train {train_f}: its content changed"):
        train(cfg)  # nor is the folder taken over by a fresh run on the new data without --overwrite


def test_a_finished_run_continues_to_a_larger_max_steps_with_its_schedule_stretched(tiny_model_dir, data_files,
                                                                                   tmp_path):
    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, max_steps=3, warmup_steps=0, scheduler="linear")
    train(cfg)
    three = load_file(str(out / "adapter_model.safetensors"))
    from lora_cli.model import load

    with pytest.MonkeyPatch.context() as mp, pytest.raises(LoraCliError, match="nothing to continue") as done:
        mp.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model loaded for nothing to do"))
        train(cfg, resume=True)
    assert "raise --epochs or --max-steps" in done.value.hint
    longer = cfg.replace({"train.max_steps": 6})
    with pytest.raises(LoraCliError, match=r"already holds this run, finished after 3 steps \(train.max_steps: 3 "
                                           r"there, 6 now\)") as plain:
        train(longer)  # without --resume: the way forward is named, the adapter is kept
    assert "Add --resume to continue it" in plain.value.hint
    result = train(longer, resume=True)
    assert result.summary.steps == 6 and result.resumed_from.endswith("step-3")
    rows = [r for r in metrics(out) if r["type"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    lr = cfg.train.lr
    # steps 1-3 kept the 3-step schedule; from step 4 on, the 6-step one (linear: lr x (6 - done) / 6)
    assert [r["lr"] for r in rows] == pytest.approx([lr, lr * 2 / 3, lr / 3, lr / 2, lr / 3, lr / 6])
    six = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(three[k], six[k]) for k in three)
    with pytest.raises(LoraCliError, match="past the end of this run"):
        train(cfg.replace({"train.max_steps": 2}), resume=True)


def test_a_checkpoint_from_before_the_fingerprint_held_the_data_still_resumes(tiny_model_dir, data_files, tmp_path):
    from lora_cli.adapter.folder import legacy_fingerprint
    from lora_cli.train.checkpoint import STATE

    out = tmp_path / "adapters"
    cfg = config(tiny_model_dir, data_files, out, save_every_steps=1)
    with at_step(2, crash), pytest.raises(Crash):
        train(cfg)
    state_file = list_checkpoints(out)[-1] / STATE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(dict(state, fingerprint=legacy_fingerprint(cfg.replace({"train.lr": 1e-3})))))
    with pytest.raises(LoraCliError, match="other settings or data"):
        train(cfg, resume=True)
    state_file.write_text(json.dumps(dict(state, fingerprint=legacy_fingerprint(cfg))))  # settings only, as then
    assert train(cfg, resume=True).resumed_from == str(state_file.parent)
