"""The training recipe: from a run config to an adapter folder, top to bottom, torchtune's shape.

`LoRARecipe.setup()` builds every collaborator of a run once and keeps it as an attribute, in
this order: placement, data, output folder, model and plan, batches, trainable and loop state,
observers. `train()` runs the loop (loop.py: the step mechanics), `finish()` writes the adapter
folder. Resume lives in resume.py, what a run shows of itself in observe.py, the automatic
settings in plan.decide.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_cli import faults
from lora_cli.adapter.record import BestEvaluation, LoopSummary, RunDecisions
from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError
from lora_cli.progress import NULL_REPORTER

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lora_cli.data.batching import Batcher, StepPlan
    from lora_cli.data.current import CurrentDataset
    from lora_cli.model.params import ParamSummary
    from lora_cli.progress import Reporter
    from lora_cli.train.checkpoint import Checkpoint, LoopState
    from lora_cli.train.loop import TrainingLoop
    from lora_cli.train.observe import Observer
    from lora_cli.train.optim import Trainable
    from lora_cli.train.plan import RunPlan
    from lora_cli.train.probe import StopProbe
    from lora_cli.train.run_folder import OutputFolder
    from lora_cli.train.runtime import Placement


@dataclass
class TrainResult:
    """A finished run: where its adapter is, what the loop did (`summary`), what was decided."""

    output: str
    summary: LoopSummary  # what run_config.yaml records under run.summary
    resumed_from: str | None
    decisions: RunDecisions
    param_summary: dict[str, Any]
    is_main: bool = True  # this process reports the run (the others of `--gpus N` say nothing)


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
    base_identity: dict[str, Any] = field(default_factory=dict)  # model/identity.py: part of the run's fingerprint


def train(cfg: RunConfig, resume: bool | str = False, overwrite: bool = False, reporter: Reporter = NULL_REPORTER,
          current: CurrentDataset | None = None) -> TrainResult:
    """Tokenize (or reuse the cache), then train. `current`: the current dataset (data/current.py) the
    data came from, said in one line before anything loads."""
    with LoRARecipe(cfg, resume, overwrite, reporter) as recipe:
        recipe.setup(current=current)
        recipe.train()
        return recipe.finish()


class LoRARecipe:
    """One LoRA (QLoRA) run. Use it as a context manager: the output folder's lock and the observers
    are released however the run ends. Errors: LoraCliError for anything the run cannot do, said
    before the model loads where it can be."""

    placement: Placement
    data: TrainingData
    out: OutputFolder
    resume_from: Path | None  # the checkpoint the run continues from
    model: PeftModel
    plan: RunPlan
    initial: dict[str, torch.Tensor] | None  # pissa/olora: the initial LoRA tensors, for the saved adapter
    params: ParamSummary
    steps: StepPlan
    val: Batcher | None
    total_steps: int
    checkpoint: Checkpoint | None
    trainable: Trainable
    state: LoopState
    probe: StopProbe | None  # --eval-generate's stop-rate probe
    decisions: RunDecisions  # what the run decided, recorded under run: in run_config.yaml
    observers: list[Observer]
    loop: TrainingLoop
    summary: LoopSummary

    def __init__(self, cfg: RunConfig, resume: bool | str = False, overwrite: bool = False,
                 reporter: Reporter = NULL_REPORTER) -> None:
        self.cfg, self.resume, self.overwrite, self.reporter = cfg, resume, overwrite, reporter
        self.observers, self.finished = [], False
        self._held = contextlib.ExitStack()  # the output folder's lock

    def __enter__(self) -> LoRARecipe:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            for observer in self.observers if not self.finished else []:
                observer.on_end(finished=False)  # stopped: an interrupt, an error
        finally:
            self._held.close()

    # ---- setup ----------------------------------------------------------------------------
    def setup(self, current: CurrentDataset | None = None, placement: Placement | None = None,
              data: TrainingData | None = None) -> None:
        """Every collaborator of the run, built once. `placement` and `data` given (benchmarks: tokenized
        data in memory): used as they are, without the checks made before loading and the folder's lock."""
        from lora_cli.train import resume
        from lora_cli.train.observe import observers_for
        from lora_cli.train.run_folder import OutputFolder, output_lock

        self.placement = placement or self._place()
        if current is not None:
            self.reporter.message(f"Training on {current.describe(self.cfg)}")
        if placement is None:  # one run writes this output folder, from here to its end
            self._held.enter_context(output_lock(self.cfg, self.placement, self.reporter))
        self.data = data or self._prepare_data(current)
        d = self.data
        # the folder's rules, before any expensive work
        self.out = OutputFolder(self.cfg.output.dir, self.cfg, self.placement.is_main, d.cache_keys, d.data_sha256,
                                d.template_text, d.base_identity)
        self.resume_from = resume.admit(self.out, self.resume, self.overwrite)
        self.placement.accelerator.wait_for_everyone()
        self._model_and_plan()
        self._batches()
        self._trainable_and_state()
        resumed_step = self.state.step if self.checkpoint else None
        self.observers = observers_for(self.cfg, self.placement, self.out.path, self.out.metrics_path,
                                       self.decisions, resumed_step, self.probe, self.reporter)

    def _place(self) -> Placement:
        """Device, precision and processes; the checks that need no weights."""
        import torch

        from lora_cli.model.load import check_targets, quiet_libraries
        from lora_cli.train.run_folder import check_output
        from lora_cli.train.runtime import place

        cfg = self.cfg
        quiet_libraries()
        placement = place(cfg)
        targets = check_targets(cfg.model.name, cfg.lora, cfg.model.trust_remote_code)  # before tokenizing
        check_output(cfg, targets.lora_parameters, placement.is_main)
        if not placement.is_main:
            self.reporter = NULL_REPORTER  # one progress display: the main process's
        torch.manual_seed(cfg.train.seed)
        return placement

    def _prepare_data(self, current: CurrentDataset | None) -> TrainingData:
        """Tokenized once (main process), read from the cache by everyone."""
        from lora_cli.data.prepare import prepare_data
        from lora_cli.model.identity import base_identity

        where = self.placement
        data = prepare_data(self.cfg, self.reporter, is_main=where.is_main, barrier=where.accelerator.wait_for_everyone,
                            current=current)
        entries = {"train": data.train, "val": data.val}
        return TrainingData(data.train.load(), data.val.load() if data.val else None, data.tokenizer,
                            data.model.path, {k: e.key if e else None for k, e in entries.items()},
                            {k: e.meta.parts.data_sha256 if e else None for k, e in entries.items()},
                            getattr(data.template, "source", None), base_identity(data.model))

    def _model_and_plan(self) -> None:
        """The base loaded, every automatic setting decided once (plan.decide), then applied; LoRA on top."""
        import torch

        from lora_cli.model.load import dequantized_bytes, load_model
        from lora_cli.model.loss import fused_blocker
        from lora_cli.model.params import count_parameters
        from lora_cli.model.targets import resolve_targets
        from lora_cli.train.plan import decide

        cfg, where, reporter = self.cfg, self.placement, self.reporter
        quant = "4-bit NF4" if cfg.model.quantization == "nf4" else where.precision
        with reporter.stage(f"Loading {cfg.model.name} ({quant})"):  # FSDP: on the CPU, sharded later
            model = load_model(self.data.model_path, cfg.model.quantization, where.precision, where.device,
                               cfg.model.trust_remote_code, cfg.model.attn_implementation, sharded=where.fsdp)
        # why the fused loss would compute this run's logits wrongly (LoRA on the head, say), or None
        blocker = fused_blocker(model, resolve_targets(model, cfg.lora.target_modules, cfg.model.name).adapted)
        # the GPU memory the loaded base holds, and what its 4-bit weights dequantized would add (bytes)
        memory = ((torch.cuda.memory_allocated(where.device), dequantized_bytes(model, where.precision))
                  if where.on_cuda else (0, 0))
        self.plan = decide(cfg, where, model.config, list(self.data.train["length"]), *memory, loss_blocker=blocker)
        for note in (self.plan.memory_note, self.plan.loss_note, self.plan.compile_note):
            if note:
                reporter.message(note)
        self.model, self.initial = _attach(cfg, model, self.plan, self.data.model_path)
        self.params = count_parameters(self.model, cfg.model.name, cfg.lora)
        p = self.params
        reporter.message(f"Parameters: {p.trainable:,} trainable of {p.total:,} ({p.percent:.4f}%)")

    def _batches(self) -> None:
        """The micro-batches of each optimizer step, the evaluation's, and the run's length in optimizer steps."""
        from lora_cli.data.batching import Batcher, StepPlan
        from lora_cli.train.optim import warmup_note

        plan, train, pad_id = self.plan, self.cfg.train, self.data.tokenizer.pad_token_id
        self.steps = StepPlan(Batcher(self.data.train, plan.packed, train.batch_size, plan.max_tokens, pad_id,
                                      train.seed, plan.pack_length, plan.static_shapes), plan.micro_batches_per_step)
        self.val = (Batcher(self.data.val, plan.packed, train.eval_batch_size, plan.eval_max_tokens, pad_id,
                            train.seed, plan.pack_length, plan.static_shapes) if self.data.val is not None else None)
        self.total_steps = train.max_steps or sum(self.steps.steps_in(e) for e in range(train.epochs))
        if self.total_steps == 0:
            raise LoraCliError("The training set yields no optimizer step.", "Add data or lower --grad-accum.")
        note = warmup_note(train, self.total_steps)
        if note:
            self.reporter.message("note: " + note)

    def _trainable_and_state(self) -> None:
        """The wrapped module, optimizer and schedule, and the loop state: fresh, or the checkpoint's (resume.py)."""
        from lora_cli.train import resume
        from lora_cli.train.checkpoint import LoopState, load_checkpoint
        from lora_cli.train.optim import prepare_trainable, warmup_steps
        from lora_cli.train.probe import StopProbe

        cfg, where, total = self.cfg, self.placement, self.total_steps
        self.checkpoint = load_checkpoint(self.resume_from) if self.resume_from is not None else None
        note = resume.continuation(self.out, self.checkpoint, total) if self.checkpoint is not None else ""
        self.trainable = prepare_trainable(self.model, cfg, where, total, self.checkpoint, self.plan.fused_loss,
                                           graphed_backbone=self.plan.compile_scope == "backbone")
        self.state = self.checkpoint.state if self.checkpoint else LoopState(
            fingerprint=self.out.fingerprint, world_size=where.world_size, fsdp=where.fsdp)
        self.state.total_steps = total
        self.probe = StopProbe.build(cfg, self.data.tokenizer, where.fsdp, self.reporter)
        self.decisions = RunDecisions(**self.plan.record(where), warmup_steps=warmup_steps(cfg.train, total),
                                      eval_generate_max_new_tokens=self.probe.max_new_tokens if self.probe else 0)
        self.out.start(self.decisions, resuming=self.checkpoint is not None)
        if self.checkpoint is not None:
            resume.announce(self.out, self.checkpoint, note, self.reporter)

    # ---- train, finish ---------------------------------------------------------------------
    def train(self) -> None:
        """Run the loop to the run's end (or early stopping); its summary is `self.summary`."""
        from lora_cli.train.loop import TrainingLoop

        self.loop = TrainingLoop(self)
        self.summary = self.loop.run()

    def finish(self) -> TrainResult:
        """Put the best adapter in place under early stopping, write the adapter folder; the run's result."""
        summary, where = self.summary, self.placement
        summary.tokenize_cache = self.data.cache_keys
        summary.probe_seconds = round(self.probe.seconds, 2) if self.probe else 0.0
        lora, _ = self.loop.adapter_state()
        best = self._best_result()
        if best is not None:
            summary.best, tensors = best
            lora = tensors if where.fsdp else lora
        faults.point("train:end", self.loop)
        self.out.finish(self.model, self.data.tokenizer, self.decisions, summary, self.params,
                        adapter_state=lora, initial_adapter=self.initial)
        self.finished = True
        for observer in self.observers:
            observer.on_end(finished=True)
        where.accelerator.wait_for_everyone()
        return TrainResult(str(self.out.path), summary, str(self.resume_from) if self.resume_from else None,
                           self.decisions, self.params.to_dict(), self.placement.is_main)

    def _best_result(self) -> tuple[BestEvaluation, dict[str, torch.Tensor] | None] | None:
        """Early stopping: put the best evaluation's adapter (from its checkpoint) in place of the last one.

        Returns what the run says about it, and for FSDP runs the tensors the adapter is then written
        from (None otherwise); None without early stopping."""
        state, where = self.state, self.placement
        if not self.cfg.train.early_stopping_patience or not state.best_checkpoint:
            return None
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from lora_cli.adapter.folder import ADAPTER_WEIGHTS
        from lora_cli.train.checkpoint import checkpoint_dir

        best = BestEvaluation(state.best_step, state.best_eval_loss, state.best_checkpoint, state.stopped_early,
                              state.step)
        tensors = None
        if where.is_main:
            tensors = load_file(str(checkpoint_dir(self.out.path) / state.best_checkpoint / ADAPTER_WEIGHTS))
            if not where.fsdp:
                set_peft_model_state_dict(self.model, {k: v.to(where.device) for k, v in tensors.items()})
                tensors = None
        return best, tensors


# ---- the model, for the recipe ---------------------------------------------------------------
def _attach(cfg: RunConfig, model: PreTrainedModel, plan: RunPlan, model_path: Path
            ) -> tuple[PeftModel, dict[str, torch.Tensor] | None]:
    """Dequantize, freeze, upcast and checkpoint the base as planned, put LoRA on top (NEFTune's hook
    on its input embeddings), compile the layers. Returns (model, the initial LoRA tensors for a
    pissa or olora run, whose saved adapter is expressed against the original base; else None)."""
    from lora_cli.model.load import attach_lora, compile_layers, prepare_for_training

    if plan.dequantize:
        model = model.dequantize()  # transformers: every Linear4bit becomes a Linear of the very same values
    quantized = cfg.model.quantization == "nf4" and not plan.dequantize
    # compiled layers want every layer's input to require grad: one compiled graph serves them all
    compiled = plan.compile != "off" and plan.compile_layers
    prepare_for_training(model, quantized, plan.upcast, plan.checkpoint_layers, input_grads=compiled)
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
    if compiled:  # inside a captured backbone (the loss module's) each layer is compiled without graphs of its own
        mode = "on" if plan.compile_scope == "backbone" else plan.compile
        compile_layers(model, mode, plan.static_shapes and plan.packed)
    return model, initial
