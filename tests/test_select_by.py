"""--select-by stop-rate: early stopping and the best adapter kept go by the probe's stop rate."""

from types import SimpleNamespace

import pytest

from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError
from lora_cli.train.checkpoint import LoopState
from lora_cli.train.loop import TrainingLoop

# (eval loss, stop rate) at steps 1..4: the loss is lowest at step 2, the stop rate highest at step 3
EVALS = [(1.0, 0.25), (0.8, 0.5), (0.9, 1.0), (0.85, 0.75)]


def _track(select_by: str, patience: int = 5):
    messages = []
    loop = SimpleNamespace(state=LoopState(total_steps=10), reporter=SimpleNamespace(message=messages.append),
                           train_cfg=SimpleNamespace(select_by=select_by, early_stopping_patience=patience))
    for step, (loss, rate) in enumerate(EVALS, start=1):
        loop.state.step = step
        TrainingLoop._early_stopping(loop, loss, f"checkpoint-{step}", rate)
    return loop.state, messages


def test_selecting_by_loss_keeps_the_lowest_eval_loss_whatever_the_stop_rate():
    state, _ = _track("loss")
    assert (state.best_step, state.best_eval_loss, state.best_checkpoint) == (2, 0.8, "checkpoint-2")


def test_selecting_by_stop_rate_keeps_the_highest_stop_rate_and_stops_after_patience():
    state, messages = _track("stop-rate", patience=1)
    assert (state.best_step, state.best_stop_rate, state.best_checkpoint) == (3, 1.0, "checkpoint-3")
    assert state.stopped_early and "no better stop rate in 1 evaluation(s) since step 3" in messages[-1]


def test_an_equal_stop_rate_is_better_only_with_a_lower_eval_loss():
    messages = []
    loop = SimpleNamespace(state=LoopState(total_steps=10), reporter=SimpleNamespace(message=messages.append),
                           train_cfg=SimpleNamespace(select_by="stop-rate", early_stopping_patience=5))
    for step, (loss, rate) in enumerate([(0.9, 1.0), (0.95, 1.0), (0.7, 1.0)], start=1):
        loop.state.step = step
        TrainingLoop._early_stopping(loop, loss, f"c{step}", rate)
    assert loop.state.best_step == 3 and loop.state.evals_since_best == 0


@pytest.mark.parametrize("train, match", [({"select_by": "accuracy"}, "select_by"),
                                          ({"select_by": "stop-rate", "eval_generate": 0}, "--eval-generate is 0")])
def test_bad_select_by_settings_are_one_clear_error(train, match):
    raw = RunConfig().model_dump()
    raw["data"]["val"] = "val.jsonl"
    raw["train"].update(train)
    with pytest.raises(LoraCliError, match=match):
        RunConfig.from_dict(raw)
