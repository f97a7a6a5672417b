"""The training recipe: from a run config to an adapter folder, top to bottom.

`train()` reads like the recipe it is: placement, data, output folder, model, the run's
decisions, optimizer, loop, final save. The step mechanics (gradient accumulation over packed
micro-batches, loss normalisation, distributed reduction, checkpoints, interrupt and NaN
handling) live in `loop.py`; the automatic settings are decided once, in `plan.decide`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_cli import faults
from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError
from lora_cli.progress import NULL_REPORTER
from lora_cli.train.loop import BestEvaluation, LoopSummary

if TYPE_CHECKING:
    from pathlib import Path

    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lora_cli.data.current import CurrentDataset
    from lora_cli.model.params import ParamSummary
    from lora_cli.progress import Reporter
    from lora_cli.train.checkpoint import LoopState
    from lora_cli.train.loop import TrainingLoop
    from lora_cli.train.plan import RunPlan
    from lora_cli.train.run_folder import OutputFolder
    from lora_cli.train.runtime import Placement


@dataclass
class TrainResult:
    """A finished run: where its adapter is, what the loop did (`summary`), what was decided."""

    output: str
    summary: LoopSummary  # what run_config.yaml records under run.summary
    resumed_from: str | None
    decisions: dict[str, Any]
    param_summary: dict[str, Any]

    # the summary's numbers, by the names callers used before it was one object
    steps = property(lambda self: self.summary.steps)
    first_loss = property(lambda self: self.summary.first_loss)
    last_loss = property(lambda self: self.summary.last_loss)
    eval_losses = property(lambda self: self.summary.eval_losses)
    tokens = property(lambda self: self.summary.tokens)
    seconds = property(lambda self: self.summary.seconds)
    best = property(lambda self: self.summary.best)  # early stopping: the evaluation whose adapter is the result


@dataclass
class TrainingData:
    """What the loop trains on: tokenized splits plus the tokenizer saved beside the adapter."""

    train: Dataset  # columns input_ids, labels, length, n_targets
    val: Dataset | None
    tokenizer: PreTrainedTokenizerBase
    model_path: Path  # the base model's local folder
    cache_keys: dict[str, str | None]  # split -> tokenize cache key (part of the run's fingerprint)
    data_sha256: dict[str, str | None] = field(default_factory=dict)  # split -> sha256 of the data file
    template_text: str | None = None  # a template file's text, saved with the adapter
    base_identity: dict = field(default_factory=dict)  # model/identity.py: part of the run's fingerprint


def train(cfg: RunConfig, resume: bool | str = False, overwrite: bool = False, reporter: Reporter = NULL_REPORTER,
          force_tokenize: bool = False, current: CurrentDataset | None = None) -> TrainResult:
    """Tokenize (or reuse the cache), then train. `current`: the current dataset (data/current.py) the
    data came from, said in one line before anything loads."""
    import torch

    from lora_cli.data.prepare import prepare_data
    from lora_cli.model.identity import base_identity
    from lora_cli.model.load import check_targets, quiet_libraries
    from lora_cli.train.output_check import check_output, output_lock
    from lora_cli.train.runtime import place

    quiet_libraries()
    placement = place(cfg)
    targets = check_targets(cfg.model.name, cfg.lora, cfg.model.trust_remote_code)  # before any tokenizing or weights
    check_output(cfg, targets.lora_parameters, placement.is_main)
    if not placement.is_main:
        reporter = NULL_REPORTER  # one progress display: the main process's
    torch.manual_seed(cfg.train.seed)
    if current is not None:
        reporter.message(f"Training on {current.describe(cfg)}")
    with output_lock(cfg, placement, reporter):  # one run writes this output folder, from here to its end
        # Tokenized once (main process), read from the cache by everyone.
        data = prepare_data(cfg, reporter, force_tokenize, placement.is_main,
                            placement.accelerator.wait_for_everyone, current=current)
        entries = {"train": data.train, "val": data.val}
        prepared = TrainingData(data.train.load(), data.val.load() if data.val else None, data.tokenizer,
                                data.model.path, {k: e.key if e else None for k, e in entries.items()},
                                {k: e.meta.get("parts", {}).get("data_sha256") if e else None
                                 for k, e in entries.items()}, getattr(data.template, "source", None),
                                base_identity(data.model))
        return train_on(cfg, placement, prepared, resume, overwrite, reporter)


def _load_model(cfg: RunConfig, placement: Placement, data: TrainingData, reporter: Reporter):
    """The base model, 4-bit or not, on this process's device (FSDP: on the CPU, sharded later)."""
    from lora_cli.model.load import load_model

    quant = "4-bit NF4" if cfg.model.quantization == "nf4" else placement.precision
    with reporter.stage(f"Loading {cfg.model.name} ({quant})"):
        return load_model(data.model_path, cfg.model.quantization, placement.precision, placement.device,
                          cfg.model.trust_remote_code, cfg.model.attn_implementation, sharded=placement.fsdp)


def _loss_blocker(cfg: RunConfig, model: PreTrainedModel) -> str | None:
    """Why the fused loss would compute this run's logits wrongly (LoRA on the head, say), or None."""
    from lora_cli.model.loss import fused_blocker
    from lora_cli.model.targets import resolve_targets

    return fused_blocker(model, resolve_targets(model, cfg.lora.target_modules, cfg.model.name).adapted)


def _attach(cfg: RunConfig, model: PreTrainedModel, plan: RunPlan, model_path: Path):
    """Dequantize, freeze, upcast and checkpoint the base as planned, put LoRA on top (NEFTune's hook
    on its input embeddings), compile the layers. Returns (model, the initial LoRA tensors for a
    pissa or olora run, whose saved adapter is expressed against the original base; else None)."""
    from lora_cli.model.load import attach_lora, compile_layers, prepare_for_training

    if plan.dequantize:
        model = model.dequantize()  # transformers: every Linear4bit becomes a Linear of the very same values
    quantized = cfg.model.quantization == "nf4" and not plan.dequantize
    prepare_for_training(model, quantized, plan.upcast, plan.checkpoint_layers, input_grads=plan.compile != "off")
    model = attach_lora(model, cfg.lora, cfg.model.name, model_path)
    initial = None
    if cfg.lora.init_lora_weights in ("pissa", "olora"):
        from peft import get_peft_model_state_dict

        initial = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    if cfg.train.neftune_alpha:
        from transformers.integrations.neftune import neftune_post_forward_hook

        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = cfg.train.neftune_alpha  # the hook adds noise only in training mode
        embeddings.register_forward_hook(neftune_post_forward_hook)
    if plan.compile != "off":
        compile_layers(model, plan.compile, plan.static_shapes and plan.packed)
    return model, initial


def _model_and_plan(cfg: RunConfig, placement: Placement, data: TrainingData, reporter: Reporter):
    """(the model ready to train, its RunPlan, pissa/olora's initial LoRA tensors or None): the base
    loaded, every automatic setting decided once (plan.decide), then applied."""
    from lora_cli.train.plan import decide

    model = _load_model(cfg, placement, data, reporter)
    plan = decide(cfg, placement, model.config, list(data.train["length"]), *_memory(placement, model),
                  loss_blocker=_loss_blocker(cfg, model))
    for note in (plan.memory_note, plan.loss_note, plan.compile_note):
        if note:
            reporter.message(note)
    model, initial = _attach(cfg, model, plan, data.model_path)
    return model, plan, initial


def _memory(placement: Placement, model: PreTrainedModel) -> tuple[int, int]:
    """(bytes the loaded base holds on the GPU, bytes its dequantized 4-bit weights would add); CPU: (0, 0)."""
    import torch

    from lora_cli.model.load import dequantized_bytes

    if not placement.on_cuda:
        return 0, 0
    return torch.cuda.memory_allocated(placement.device), dequantized_bytes(model, placement.precision)


def train_on(cfg: RunConfig, placement: Placement, data: TrainingData, resume: bool | str = False,
             overwrite: bool = False, reporter: Reporter = NULL_REPORTER) -> TrainResult:
    """The recipe proper, from tokenized data to the adapter folder (benchmarks call it directly)."""
    from lora_cli.data.batching import Batcher, StepPlan
    from lora_cli.model.params import count_parameters
    from lora_cli.train.checkpoint import LoopState, load_checkpoint
    from lora_cli.train.loop import TrainingLoop
    from lora_cli.train import trackers
    from lora_cli.train.optim import prepare_trainable, warmup_note, warmup_steps
    from lora_cli.train.probe import StopProbe
    from lora_cli.train.run_folder import OutputFolder
    from lora_cli.train.watch import RunWatch

    # 1. Output folder rules, before any expensive work.
    out = OutputFolder(cfg.output.dir, cfg, placement.is_main, data.cache_keys, data.data_sha256, data.template_text,
                       data.base_identity)
    checkpoint_path = out.prepare(resume, overwrite)
    placement.accelerator.wait_for_everyone()

    # 2. Model, and every automatic setting decided once its inputs are known.
    model, plan, initial = _model_and_plan(cfg, placement, data, reporter)
    params = count_parameters(model, cfg.model.name, cfg.lora)
    reporter.message(f"Parameters: {params.trainable:,} trainable of {params.total:,} ({params.percent:.4f}%)")

    # 3. Batches, optimizer, schedule: ready (and restored) before the loop starts.
    pad_id, train_cfg = data.tokenizer.pad_token_id, cfg.train
    steps = StepPlan(Batcher(data.train, plan.packed, train_cfg.batch_size, plan.max_tokens, pad_id, train_cfg.seed,
                             plan.pack_length, plan.static_shapes), plan.micro_batches_per_step)
    val = (Batcher(data.val, plan.packed, train_cfg.eval_batch_size, plan.eval_max_tokens, pad_id, train_cfg.seed,
                   plan.pack_length, plan.static_shapes) if data.val is not None else None)
    total_steps = steps.total_steps(train_cfg.epochs, train_cfg.max_steps)
    if total_steps == 0:
        raise LoraCliError("The training set yields no optimizer step.", "Add data or lower --grad-accum.")
    if warmup_note(train_cfg, total_steps):
        reporter.message("note: " + warmup_note(train_cfg, total_steps))
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    extended = out.continuation(checkpoint, total_steps) if checkpoint is not None else ""
    trainable = prepare_trainable(model, cfg, placement, total_steps, checkpoint, plan.fused_loss)
    state = checkpoint.state if checkpoint else LoopState(fingerprint=out.fingerprint, world_size=placement.world_size,
                                                          fsdp=placement.fsdp)
    state.total_steps = total_steps
    probe = StopProbe.build(cfg, data.tokenizer, placement.fsdp, reporter)
    decisions = plan.record(placement) | {"warmup_steps": warmup_steps(train_cfg, total_steps),
                                          "eval_generate_max_new_tokens": probe.max_new_tokens if probe else 0}
    out.start(decisions, resuming=checkpoint is not None)
    if checkpoint is not None:
        out.truncate_metrics(state.metrics_lines)
        reporter.message(f"Resuming from {checkpoint.path} (step {state.step} of {total_steps}).")
        if extended:
            reporter.message(extended)
    tracking = trackers.start(placement.accelerator, cfg, decisions, state.step if checkpoint else None)
    watch = RunWatch(placement, out.path, probe, tracking)

    # 4. Train, save.
    loop = TrainingLoop(cfg, placement, plan, model, trainable, steps, val, out, reporter, state, watch)
    summary = _train_and_save(loop, data, decisions, params, initial)
    placement.accelerator.wait_for_everyone()
    return TrainResult(str(out.path), summary, str(checkpoint_path) if checkpoint_path else None, decisions,
                       params.to_dict())


def _train_and_save(loop: TrainingLoop, data: TrainingData, decisions: dict[str, Any], params: ParamSummary,
                    initial: dict | None) -> LoopSummary:
    """Run the loop, put the best adapter in place under early stopping, write the folder; the run's summary."""
    cfg, placement, model, out, state, watch = loop.cfg, loop.placement, loop.model, loop.out, loop.state, loop.watch
    try:
        summary = loop.run()
        summary.tokenize_cache = data.cache_keys
        summary.probe_seconds = round(watch.probe.seconds, 2) if watch.probe is not None else 0.0
        lora, _ = loop.adapter_state()
        best = _best_result(cfg, placement, model, out, state)
        if best is not None:
            summary.best, tensors = best
            lora = tensors if placement.fsdp else lora
        faults.point("train:end", loop)
        out.finish(model, data.tokenizer, decisions, summary.to_dict(), params, adapter_state=lora,
                   initial_adapter=initial)
        watch.close(state.metrics_lines)
    finally:
        watch.close()
    return summary


def _best_result(cfg: RunConfig, placement: Placement, model: PeftModel, out: OutputFolder,
                 state: LoopState) -> tuple[BestEvaluation, dict | None] | None:
    """Early stopping: put the best evaluation's adapter (from its checkpoint) in place of the last one.

    Returns what the run says about it, and for FSDP runs the tensors the adapter is then written
    from (None otherwise); None without early stopping."""
    if not cfg.train.early_stopping_patience or not state.best_checkpoint:
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lora_cli.adapter.folder import ADAPTER_WEIGHTS
    from lora_cli.train.checkpoint import checkpoint_dir

    best = BestEvaluation(state.best_step, state.best_eval_loss, state.best_checkpoint, state.stopped_early,
                          state.step)
    tensors = None
    if placement.is_main:
        tensors = load_file(str(checkpoint_dir(out.path) / state.best_checkpoint / ADAPTER_WEIGHTS))
        if not placement.fsdp:
            set_peft_model_state_dict(model, {k: v.to(placement.device) for k, v in tensors.items()})
            tensors = None
    return best, tensors
