"""The training recipe: from a run config to an adapter folder, top to bottom.

`train()` reads like the recipe it is: runtime, data, output folder, model, optimizer, loop,
final save. The step mechanics (gradient accumulation over packed micro-batches, loss
normalisation, distributed reduction, checkpoints, interrupt and NaN handling) live in
`loop.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    cache_keys: dict


def train(cfg: RunConfig, resume: bool | str = False, overwrite: bool = False, reporter=NULL_REPORTER,
          force_tokenize: bool = False) -> TrainResult:
    """Tokenize (or reuse the cache), then train."""
    import torch

    from lora_cli.modeling import quiet_libraries
    from lora_cli.prepare import prepare_data
    from lora_cli.runtime import make_runtime

    quiet_libraries()
    rt = make_runtime(cfg)
    if not rt.is_main:
        reporter = NULL_REPORTER  # one progress display: the main process's
    torch.manual_seed(cfg.train.seed)
    # Tokenized once (main process), read from the cache by everyone.
    data = prepare_data(cfg, reporter, force_tokenize, rt.is_main, rt.accelerator.wait_for_everyone)
    prepared = TrainingData(data.train.load(), data.val.load() if data.val else None, data.tokenizer, data.model.path,
                            {"train": data.train.key, "val": data.val.key if data.val else None})
    return train_on(cfg, rt, prepared, resume, overwrite, reporter)


def train_on(cfg: RunConfig, rt, data: TrainingData, resume: bool | str = False, overwrite: bool = False,
             reporter=NULL_REPORTER) -> TrainResult:
    """The recipe proper, from tokenized data to the adapter folder (benchmarks call it directly)."""
    from lora_cli.batching import Batcher
    from lora_cli.loop import TrainingLoop, make_optimizer, make_scheduler
    from lora_cli.modeling import attach_lora, compile_layers, load_model, prepare_for_training
    from lora_cli.outputs import OutputFolder
    from lora_cli.params import count_parameters
    from lora_cli.runtime import resolve_checkpointing, resolve_max_tokens

    acc = rt.accelerator

    # 1. Output folder rules, before any expensive work.
    out = OutputFolder(cfg.output.dir, cfg, rt.is_main)
    checkpoint = out.prepare(resume, overwrite)
    acc.wait_for_everyone()

    # 2. Model: base (4-bit or not) + LoRA, checkpointing only as many layers as memory needs.
    quant = "4-bit NF4" if cfg.model.quantization == "nf4" else rt.precision
    with reporter.stage(f"Loading {cfg.model.name} ({quant})"):
        model = load_model(data.model_path, cfg.model.quantization, rt.precision, rt.device,
                           cfg.model.trust_remote_code, cfg.model.attn_implementation, sharded=rt.fsdp)
        resolve_checkpointing(rt, data.model_path, cfg.train.memory_budget_gib, reporter)
        prepare_for_training(model, cfg.model.quantization == "nf4", rt.upcast, rt.checkpoint_layers)
        model = attach_lora(model, cfg.lora)
        if rt.compile:
            compile_layers(model)
    params = count_parameters(model, cfg.model.name, cfg.lora)
    reporter.message(f"Parameters: {params.trainable:,} trainable of {params.total:,} ({params.percent:.4f}%)")

    # 3. Batches, optimizer, schedule.
    pad_id = data.tokenizer.pad_token_id
    batcher = Batcher(data.train, rt.packed, cfg.train.batch_size, rt.max_tokens, pad_id, cfg.train.seed,
                      rt.pack_length)
    batcher.max_tokens = resolve_max_tokens(rt, batcher.lengths, cfg.train.batch_size)
    eval_tokens = max(rt.max_tokens, cfg.train.eval_batch_size * cfg.data.max_length)
    val_batcher = (Batcher(data.val, rt.packed, cfg.train.eval_batch_size, eval_tokens, pad_id, cfg.train.seed,
                           rt.pack_length) if data.val is not None else None)
    out.start(rt.decisions(), resuming=checkpoint is not None)
    loop = TrainingLoop(cfg, rt, model, batcher, val_batcher, out, reporter)
    if loop.total_steps == 0:
        raise LoraCliError("The training set yields no optimizer step.", "Add data or lower --grad-accum.")
    resumed = loop.load(checkpoint) if checkpoint is not None else None  # adapter weights in before wrapping
    loop.bind(lambda params: make_optimizer(params, cfg.train, rt),
              lambda optimizer: make_scheduler(optimizer, cfg.train, loop.total_steps))

    # 4. Resume, train, save.
    if resumed is not None:
        loop.restore(resumed)
        reporter.message(f"Resuming from {checkpoint} (step {loop.state.step} of {loop.total_steps}).")
    summary = loop.run()
    summary["tokenize_cache"] = data.cache_keys
    lora, _ = loop.adapter_state()
    out.finish(model, data.tokenizer, rt.decisions(), summary, params, adapter_state=lora)
    acc.wait_for_everyone()
    return TrainResult(str(out.path), loop.state.step, summary.get("first_loss"), summary.get("last_loss"),
                       summary.get("eval_losses", []), loop.state.tokens_seen, summary.get("seconds", 0.0),
                       str(checkpoint) if checkpoint else None, rt.decisions(), params.to_dict())
