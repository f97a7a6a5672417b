"""The training recipe: from a run config to an adapter folder, top to bottom.

`train()` reads like the recipe it is: placement, data, output folder, model, the run's
decisions, optimizer, loop, final save. The step mechanics (gradient accumulation over packed
micro-batches, loss normalisation, distributed reduction, checkpoints, interrupt and NaN
handling) live in `loop.py`; the automatic settings are decided once, in `plan.decide`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError
from lora_cli.progress import NULL_REPORTER


@dataclass
class TrainResult:
    output: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_losses: list
    tokens: int
    seconds: float
    resumed_from: str | None
    decisions: dict
    param_summary: dict


@dataclass
class TrainingData:
    """What the loop trains on: tokenized splits plus the tokenizer saved beside the adapter."""

    train: object  # datasets.Dataset with input_ids, labels, length, n_targets
    val: object | None
    tokenizer: object
    model_path: object
    cache_keys: dict  # split -> tokenize cache key (part of the run's fingerprint)
    data_sha256: dict = field(default_factory=dict)  # split -> sha256 of the data file
    template_text: str | None = None  # a template file's text, saved with the adapter


def train(cfg: RunConfig, resume: bool | str = False, overwrite: bool = False, reporter=NULL_REPORTER,
          force_tokenize: bool = False, current=None) -> TrainResult:
    """Tokenize (or reuse the cache), then train. `current`: the current dataset (data/current.py) the
    data came from, said in one line before anything loads."""
    import torch

    from lora_cli.data.prepare import prepare_data
    from lora_cli.model.load import check_targets, quiet_libraries
    from lora_cli.train.runtime import place

    quiet_libraries()
    placement = place(cfg)
    check_targets(cfg.model.name, cfg.lora, cfg.model.trust_remote_code)  # before any tokenizing or weights
    if not placement.is_main:
        reporter = NULL_REPORTER  # one progress display: the main process's
    torch.manual_seed(cfg.train.seed)
    if current is not None:
        reporter.message(f"Training on {current.describe(cfg)}")
    # Tokenized once (main process), read from the cache by everyone.
    data = prepare_data(cfg, reporter, force_tokenize, placement.is_main, placement.accelerator.wait_for_everyone,
                        current=current)
    entries = {"train": data.train, "val": data.val}
    prepared = TrainingData(data.train.load(), data.val.load() if data.val else None, data.tokenizer, data.model.path,
                            {k: e.key if e else None for k, e in entries.items()},
                            {k: e.meta.get("parts", {}).get("data_sha256") if e else None for k, e in entries.items()},
                            getattr(data.template, "source", None))
    return train_on(cfg, placement, prepared, resume, overwrite, reporter)


def _load_model(cfg: RunConfig, placement, data: TrainingData, reporter):
    """The base model, 4-bit or not, on this process's device (FSDP: on the CPU, sharded later)."""
    from lora_cli.model.load import load_model

    quant = "4-bit NF4" if cfg.model.quantization == "nf4" else placement.precision
    with reporter.stage(f"Loading {cfg.model.name} ({quant})"):
        return load_model(data.model_path, cfg.model.quantization, placement.precision, placement.device,
                          cfg.model.trust_remote_code, cfg.model.attn_implementation, sharded=placement.fsdp)


def _loss_blocker(cfg: RunConfig, model) -> str | None:
    """Why the fused loss would compute this run's logits wrongly (LoRA on the head, say), or None."""
    from lora_cli.model.loss import fused_blocker
    from lora_cli.model.targets import resolve_targets

    return fused_blocker(model, resolve_targets(model, cfg.lora.target_modules, cfg.model.name).adapted)


def _attach(cfg: RunConfig, model, plan):
    """Dequantize, freeze, upcast and checkpoint the base as planned, put LoRA on top, compile the layers."""
    from lora_cli.model.load import attach_lora, compile_layers, prepare_for_training

    if plan.dequantize:
        model = model.dequantize()  # transformers: every Linear4bit becomes a Linear of the very same values
    quantized = cfg.model.quantization == "nf4" and not plan.dequantize
    prepare_for_training(model, quantized, plan.upcast, plan.checkpoint_layers, input_grads=plan.compile != "off")
    model = attach_lora(model, cfg.lora, cfg.model.name)
    if plan.compile != "off":
        compile_layers(model, plan.compile, plan.static_shapes and plan.packed)
    return model


def _memory(placement, model) -> tuple[int, int]:
    """(bytes the loaded base holds on the GPU, bytes its dequantized 4-bit weights would add); CPU: (0, 0)."""
    import torch

    from lora_cli.model.load import dequantized_bytes

    if not placement.on_cuda:
        return 0, 0
    return torch.cuda.memory_allocated(placement.device), dequantized_bytes(model, placement.precision)


def train_on(cfg: RunConfig, placement, data: TrainingData, resume: bool | str = False, overwrite: bool = False,
             reporter=NULL_REPORTER) -> TrainResult:
    """The recipe proper, from tokenized data to the adapter folder (benchmarks call it directly)."""
    from lora_cli.data.batching import Batcher, StepPlan
    from lora_cli.model.params import count_parameters
    from lora_cli.train.checkpoint import LoopState, load_checkpoint
    from lora_cli.train.loop import TrainingLoop
    from lora_cli.train.optim import prepare_trainable
    from lora_cli.train.plan import decide
    from lora_cli.train.run_folder import OutputFolder

    # 1. Output folder rules, before any expensive work.
    out = OutputFolder(cfg.output.dir, cfg, placement.is_main, data.cache_keys, data.data_sha256, data.template_text)
    checkpoint_path = out.prepare(resume, overwrite)
    placement.accelerator.wait_for_everyone()

    # 2. Model, and every automatic setting decided once its inputs are known.
    model = _load_model(cfg, placement, data, reporter)
    plan = decide(cfg, placement, model.config, list(data.train["length"]), *_memory(placement, model),
                  loss_blocker=_loss_blocker(cfg, model))
    for note in (plan.memory_note, plan.loss_note):
        if note:
            reporter.message(note)
    model = _attach(cfg, model, plan)
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
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    extended = out.continuation(checkpoint, total_steps) if checkpoint is not None else ""
    trainable = prepare_trainable(model, cfg, placement, total_steps, checkpoint, plan.fused_loss)
    state = checkpoint.state if checkpoint else LoopState(fingerprint=out.fingerprint, world_size=placement.world_size,
                                                          fsdp=placement.fsdp)
    state.total_steps = total_steps
    out.start(plan.record(placement), resuming=checkpoint is not None)
    if checkpoint is not None:
        out.truncate_metrics(state.metrics_lines)
        reporter.message(f"Resuming from {checkpoint.path} (step {state.step} of {total_steps}).")
        if extended:
            reporter.message(extended)

    # 4. Train, save.
    loop = TrainingLoop(cfg, placement, plan, model, trainable, steps, val, out, reporter, state)
    summary = loop.run()
    summary["tokenize_cache"] = data.cache_keys
    lora, _ = loop.adapter_state()
    out.finish(model, data.tokenizer, plan.record(placement), summary, params, adapter_state=lora)
    placement.accelerator.wait_for_everyone()
    return TrainResult(str(out.path), state.step, state.first_loss, state.last_loss, list(state.eval_losses),
                       state.tokens_seen, summary.get("seconds", 0.0), str(checkpoint_path) if checkpoint_path else None,
                       plan.record(placement), params.to_dict())
