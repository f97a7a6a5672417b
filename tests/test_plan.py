"""The automatic settings of a run, decided once: the step the recipe takes, shapes a compiled model
keeps, the dequantized base where it fits, compile only where it pays."""

import math

import pytest
import torch

from helpers import tiny_config
from lora_cli.config import RunConfig
from lora_cli.data.batching import Batcher, StepPlan
from lora_cli.train.plan import MIN_COMPILE_STEPS, MIN_GRAPH_STEPS, MIN_LAYER_COMPILE_STEPS, decide, step_budget
from lora_cli.train.runtime import Placement

LENGTHS = [100, 140, 180, 512, 60] * 40  # mean 198.4


def placement(device="cuda", precision="bf16", world=1) -> Placement:
    return Placement(None, torch.device(device), precision, world, 0)


def cfg(**overrides) -> RunConfig:
    base = {"train.memory_budget_gib": 24, "model.name": "x"}  # a budget: no GPU query on this machine
    return RunConfig().replace({**base, **overrides})


class TinyConfig:  # what the memory plan reads of a model config
    hidden_size, intermediate_size, num_hidden_layers, vocab_size = 64, 128, 2, 400


def test_the_automatic_step_holds_the_recipes_examples_in_one_micro_batch():
    mean = sum(LENGTHS) / len(LENGTHS)
    for device in ("cuda", "cpu"):
        tokens, micro = step_budget(cfg(), LENGTHS, device == "cuda")
        assert micro == 1 and tokens == math.ceil(2 * 2 * mean)  # batch 2 x accumulation 2 examples
    tokens, micro = step_budget(cfg(**{"train.batch_size": 64, "train.grad_accum": 8}), LENGTHS, True)
    assert micro == 7 and tokens * micro >= 512 * mean  # over the memory cap: split, same examples per step
    assert step_budget(cfg(**{"train.max_tokens": 4096}), LENGTHS, True) == (4096, 2)  # explicit: grad_accum of it


def test_a_compiled_gpu_run_pads_every_micro_batch_to_one_shape_that_holds_the_longest_example():
    plan = decide(cfg(**{"train.compile": "on"}), placement(), TinyConfig(), LENGTHS)
    assert plan.static_shapes and plan.compile == "on" and plan.micro_batches_per_step == 1
    assert plan.pack_length >= 512 and plan.pack_length % 64 == 0
    cpu = decide(cfg(), placement("cpu", "fp32"), TinyConfig(), LENGTHS)
    assert not cpu.static_shapes and cpu.compile == "off" and cpu.pack_length == 0
    assert cpu.eval_max_tokens == max(cpu.max_tokens, 512)  # CPU evaluation rows as long as training's


def test_auto_captures_cuda_graphs_only_for_runs_long_enough_to_repay_the_capture():
    short = decide(cfg(**{"train.max_steps": MIN_GRAPH_STEPS - 1}), placement(), TinyConfig(), LENGTHS)
    long = decide(cfg(**{"train.max_steps": MIN_GRAPH_STEPS}), placement(), TinyConfig(), LENGTHS)
    assert short.compile == "off" and long.compile == "graphs"  # capture needs no triton
    assert short.compile_note.startswith(f"Not captured as CUDA graphs: {MIN_GRAPH_STEPS - 1} optimizer steps")
    assert not long.compile_layers or __import__("importlib").util.find_spec("triton")


def test_without_graphs_auto_compiles_layers_only_with_triton_and_runs_long_enough(monkeypatch):
    import importlib.util

    padded = {"train.batching": "padded"}
    no_triton = decide(cfg(**padded, **{"train.max_steps": MIN_COMPILE_STEPS}), placement(), TinyConfig(), LENGTHS)
    if importlib.util.find_spec("triton") is None:
        assert no_triton.compile == "off" and "triton" in no_triton.compile_note
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else find_spec(name, *a))
    short = decide(cfg(**padded, **{"train.max_steps": MIN_COMPILE_STEPS - 1}), placement(), TinyConfig(), LENGTHS)
    long = decide(cfg(**padded, **{"train.max_steps": MIN_COMPILE_STEPS}), placement(), TinyConfig(), LENGTHS)
    assert short.compile == "off" and short.compile_note.startswith(f"Not compiled: {MIN_COMPILE_STEPS - 1} optimizer")
    assert long.compile == "on" and long.compile_note.startswith("Compiled without CUDA graphs: padded")


def test_auto_replays_the_gpu_step_as_cuda_graphs_only_where_its_shapes_are_static_and_says_why_not(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # CI has no triton: the decision is taken as on a GPU machine that has it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else find_spec(name, *a))
    long = {"train.max_steps": MIN_COMPILE_STEPS}
    default = decide(cfg(**long), placement(), TinyConfig(), LENGTHS)
    assert default.compile == "graphs" and default.static_shapes and default.compile_note == ""
    cases = {"--pack-length": (cfg(**long, **{"train.pack_length": 1024}), placement()),
             "padded": (cfg(**long, **{"train.batching": "padded"}), placement()),
             "DDP": (cfg(**long), placement(world=2)),
             "fp16": (cfg(**long, **{"train.precision": "fp16"}), placement(precision="fp16")),
             "every decoder layer is checkpointed": (cfg(**long, **{"train.gradient_checkpointing": "on"}), placement())}
    for reason, (config, where) in cases.items():
        plan = decide(config, where, TinyConfig(), LENGTHS)
        assert plan.compile == "on", reason
        assert plan.compile_note.startswith("Compiled without CUDA graphs: ") and reason in plan.compile_note
        assert "\n" not in plan.compile_note
    asked = decide(cfg(**long, **{"train.compile": "graphs", "train.gradient_checkpointing": "on"}), placement(),
                   TinyConfig(), LENGTHS)
    assert asked.compile == "graphs" and asked.compile_note == ""  # asked for: done as asked, no note
    cpu = decide(cfg(**long), placement("cpu", "fp32"), TinyConfig(), LENGTHS)
    assert cpu.compile == "off" and cpu.compile_note == ""  # the CPU stays eager, as before


def test_cuda_graphs_compile_the_whole_decoder_as_one_region_unless_a_layer_must_stand_alone(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # as on a GPU machine with triton
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else find_spec(name, *a))
    long = {"train.max_steps": MIN_COMPILE_STEPS}
    default = decide(cfg(**long), placement(), TinyConfig(), LENGTHS)
    assert (default.compile, default.compile_scope, default.compile_layers) == ("graphs", "backbone", False)
    assert default.record(placement())["compile_scope"] == "backbone"
    longer = decide(cfg(**{"train.max_steps": MIN_LAYER_COMPILE_STEPS}), placement(), TinyConfig(), LENGTHS)
    assert longer.compile_layers  # long enough to repay compiling the layers inside the captured graph
    asked = decide(cfg(**long, **{"train.compile": "graphs"}), placement(), TinyConfig(), LENGTHS)
    assert asked.compile_scope == "backbone" and asked.compile_layers  # --compile graphs: compiled, as asked
    layers = {  # each keeps one region per decoder layer
        "checkpointing": cfg(**long, **{"train.compile": "graphs", "train.gradient_checkpointing": "on"}),
        "neftune": cfg(**long, **{"train.neftune_alpha": 5.0}),
        "plain loss": cfg(**long, **{"train.fused_loss": False}),
        "compiled without graphs": cfg(**long, **{"train.compile": "on"}),
    }
    for why, config in layers.items():
        plan = decide(config, placement(), TinyConfig(), LENGTHS)
        assert plan.compile != "off" and plan.compile_scope == "layers", why
    head = decide(cfg(**long), placement(), TinyConfig(), LENGTHS, loss_blocker="LoRA on the output head")
    assert head.compile_scope == "layers"


def test_the_nf4_base_is_kept_dequantized_only_where_it_fits_and_costs_no_checkpointed_layer():
    small = decide(cfg(), placement(), TinyConfig(), LENGTHS, weights_bytes=1 << 20, dequantize_bytes=4 << 20)
    assert small.dequantize
    huge = decide(cfg(), placement(), TinyConfig(), LENGTHS, weights_bytes=1 << 30, dequantize_bytes=30 << 30)
    assert not huge.dequantize
    fp16 = decide(cfg(**{"train.precision": "fp16"}), placement(precision="fp16"), TinyConfig(), LENGTHS,
                  weights_bytes=1 << 20, dequantize_bytes=4 << 20)
    assert not fp16.dequantize  # peft's fp32 upcast would upcast the dequantized weights too
    off = decide(cfg(**{"model.dequantize": "off"}), placement(), TinyConfig(), LENGTHS, 1 << 20, 4 << 20)
    assert not off.dequantize and "dequantized_base" in off.record(placement())
    loftq = decide(cfg(**{"lora.init_lora_weights": "loftq"}), placement(), TinyConfig(), LENGTHS, 1 << 20, 4 << 20)
    assert not loftq.dequantize  # peft's LoftQ starts from the 4-bit weights: they must stay Linear4bit


def test_static_micro_batches_have_one_shape_and_the_same_targets_as_dynamic_ones(tiny_model_dir, tmp_path):
    from datasets import Dataset

    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * (n // 2) + list(range(n // 2, n)),
             "length": n, "n_targets": n - n // 2 - 1} for n in (5, 9, 30, 17, 3, 12, 25)]
    data = Dataset.from_list(rows)
    shapes, targets = set(), []
    for static in (True, False):
        batcher = Batcher(data, True, 2, 40, 0, seed=1, row_tokens=64, static=static)
        plan = batcher.plan(0)
        mbs = [batcher.collate(mb) for mb in plan]
        if static:
            shapes = {tuple(mb.input_ids.shape) for mb in mbs}
        targets.append(sorted(t for mb in mbs for t in mb.targets[mb.targets != -100].tolist()))
    assert shapes == {(1, 64)}
    assert targets[0] == targets[1]


def test_a_micro_batch_never_passes_its_token_budget_even_in_long_rows():
    lengths = [50] * 20
    from lora_cli.data.batching import plan_packed

    plan = plan_packed(list(range(20)), lengths, max_tokens=120, row_tokens=512)
    assert all(sum(lengths[i] for i in mb) <= 120 for mb in plan) and sum(map(len, plan)) == 20


def test_each_epochs_plan_is_made_once_and_only_two_are_kept():
    class Counting:
        def __init__(self):
            self.calls = []

        def plan(self, epoch):
            self.calls.append(epoch)
            return [[epoch]] * (4 + epoch)

    batcher = Counting()
    steps = StepPlan(batcher, per_step=2)
    assert [steps.steps_in(e) for e in range(4)] == [2, 3, 3, 4]  # ceil((4 + epoch) / 2)
    for epoch in range(4):
        steps.step(epoch, 0)
        assert len(steps._plans) <= StepPlan.KEEP
    assert batcher.calls[:4] == [0, 1, 2, 3] and batcher.calls.count(0) == 1 and batcher.calls.count(1) == 1


def test_a_dequantized_base_trains_to_the_same_losses_as_the_4bit_one(tiny_model_dir, data_files, tmp_path,
                                                                       one_thread):
    from lora_cli.train.recipe import train

    train_f, val_f = data_files
    losses = {}
    for mode in ("off", "on"):
        run = tiny_config(tiny_model_dir, train_f, val_f, tmp_path / mode, epochs=1, max_steps=3, lr=5e-3,
                          max_tokens=128).replace({"model.dequantize": mode})
        result = train(run)
        losses[mode] = result.summary.eval_losses
        assert result.decisions.dequantized_base is (mode == "on")
    assert losses["on"] == pytest.approx(losses["off"], abs=2e-4)
    assert losses["on"][-1] < losses["on"][0]
