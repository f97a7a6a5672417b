"""One optimizer step at a time: accumulation, normalisation, reduction, checkpoints.

Loss normalisation: every optimizer step divides the summed token losses of all its
micro-batches (on all processes) by their total number of target tokens, known in advance
from the plan. Each token weighs the same whatever the packing, the accumulation or the
number of GPUs, so changing those levers does not change what is optimised.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

from lora_cli import faults
from lora_cli.adapter.record import LoopSummary
from lora_cli.errors import NonFiniteLoss, TrainingInterrupted
from lora_cli.model.backbone import detach_grads
from lora_cli.train.checkpoint import checkpoint_dir, save_checkpoint
from lora_cli.train.interrupt import InterruptFlag
from lora_cli.train.late_read import StepNumbers, step_with_skip, supports_late_read
from lora_cli.train.oom import StepMemory, out_of_memory_as_error

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from peft import PeftModel

    from lora_cli.config import RunConfig
    from lora_cli.data.batching import Batcher, StepPlan
    from lora_cli.progress import Reporter, Stage
    from lora_cli.train.checkpoint import LoopState
    from lora_cli.train.optim import Trainable
    from lora_cli.train.plan import RunPlan
    from lora_cli.train.observe import Observer
    from lora_cli.train.run_folder import OutputFolder
    from lora_cli.train.runtime import Placement


class RecipeParts(Protocol):
    """What the loop takes from the recipe (recipe.LoRARecipe, once its setup() has built them); a
    Protocol, not the recipe's own type, which would import the recipe back (an import cycle)."""

    cfg: RunConfig
    placement: Placement
    plan: RunPlan
    model: PeftModel
    trainable: Trainable
    steps: StepPlan
    val: Batcher | None
    out: OutputFolder
    reporter: Reporter
    state: LoopState
    observers: list[Observer]


class TrainingLoop:
    """The recipe's loop over its collaborators (`RecipeParts`)."""

    def __init__(self, recipe: RecipeParts) -> None:
        self.cfg, self.train_cfg = recipe.cfg, recipe.cfg.train
        self.placement, self.plan = recipe.placement, recipe.plan
        self.model, self.trainable = recipe.model, recipe.trainable
        self.steps, self.val_batcher = recipe.steps, recipe.val
        self.out, self.reporter, self.state = recipe.out, recipe.reporter, recipe.state
        self.observers: list[Observer] = recipe.observers  # told of every row, evaluation and the end (observe.py)
        self.last_checkpoint: Path | None = None
        self._last_log, self._last_tok_s = time.time(), None
        self._compile_reported = False
        self.late_read = supports_late_read(recipe.trainable.optimizer, recipe.placement.world_size,
                                            recipe.placement.precision)
        self._pending: StepNumbers | None = None  # the last step's numbers, not yet read (late_read.py)

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> LoopSummary:
        t0 = time.time()
        state = self.state
        self.trainable.module.train()  # from_pretrained leaves eval mode: no LoRA dropout, no checkpointing
        faults.point("train:begin", self)
        with InterruptFlag(self.reporter) as flag, out_of_memory_as_error(self._memory_levers):
            if self.train_cfg.eval_at_start and state.step == 0 and self.val_batcher is not None:
                self._log_eval(self.evaluate())
            self._last_log = time.time()
            with self.reporter.stage("Training", total=state.total_steps, unit="steps") as bar:
                bar.update(state.step)
                while state.step < state.total_steps and not state.stopped_early:
                    self._run_epoch(flag, bar)
        return LoopSummary(state.first_loss, state.last_loss, list(state.eval_losses), list(state.stop_rates),
                           state.step, state.tokens_seen, round(time.time() - t0, 3))

    def _run_epoch(self, flag: InterruptFlag, bar: Stage) -> None:
        """The rest of the current epoch, its end, and a stop when a signal asked for one."""
        state = self.state
        n_steps = self.steps.steps_in(state.epoch)
        while state.step_in_epoch < n_steps and state.step < state.total_steps:
            started = time.perf_counter()
            self._step(self.steps.step(state.epoch, state.step_in_epoch), flag)
            if not self._compile_reported and self.plan.compile != "off":
                self._compile_reported = True  # paid once, at the first step: said, so it is not taken for slowness
                self.reporter.message(f"First step: {time.perf_counter() - started:.1f} s ({self._first_step_work()}, "
                                      "paid once)")
                graphed = getattr(self.placement.accelerator.unwrap_model(self.trainable.module), "graphed", None)
                if graphed is not None and graphed.failure:
                    self.reporter.message(f"Not captured as CUDA graphs ({graphed.failure}): the decoder runs eagerly.")
            faults.point("train:step")
            bar.update(1, loss=state.last_loss, tok_s=self._last_tok_s)
            at_end = state.step_in_epoch >= n_steps or state.step >= state.total_steps
            if flag.set and not at_end:
                self._interrupt(flag)
            every = self.train_cfg.save_every_steps
            if every and state.step % every == 0 and not at_end:
                self._checkpoint(f"step-{state.step}")
        self.settle()
        bar.update(0, loss=state.last_loss, tok_s=self._last_tok_s)  # the last step's loss, read late
        self._end_epoch(partial=state.step_in_epoch < n_steps)
        self._sync_flag(flag)  # a signal during the evaluation reached only some processes
        if flag.set and state.step < state.total_steps and not state.stopped_early:
            self._interrupt(flag, saved=True)

    def _first_step_work(self) -> str:
        plan = self.plan
        if plan.compile_scope == "backbone":
            layers = "torch.compile of the decoder layers, then " if plan.compile_layers else ""
            return f"{layers}the capture of the decoder's forward and backward as CUDA graphs"
        graphs = " and their capture as CUDA graphs" if plan.compile == "graphs" else ""
        return f"torch.compile of the decoder layers{graphs}"

    def _sync_flag(self, flag: InterruptFlag) -> None:
        if self.placement.world_size > 1:
            import torch

            raised = torch.tensor(float(flag.set), device=self.placement.device)
            flag.set = self.placement.accelerator.reduce(raised, reduction="sum").item() > 0

    def _step(self, step_batches: list[list[int]], flag: InterruptFlag) -> None:
        """One optimizer step over `step_batches` (all processes' micro-batches; this one takes its share)."""
        import torch

        where, state, batcher = self.placement, self.state, self.steps.batcher
        acc, module = where.accelerator, self.trainable.module
        n_global = max(1, sum(batcher.n_targets(mb) for mb in step_batches))
        mine = step_batches[where.rank::where.world_size]
        slots = math.ceil(len(step_batches) / where.world_size)
        loss_sum = torch.zeros((), device=where.device)
        real = 0
        for i in range(slots):
            live = i < len(mine)
            mb = batcher.collate(mine[i] if live else step_batches[0]).to(where.device)
            if self.plan.compile == "graphs":
                torch.compiler.cudagraph_mark_step_begin()  # a new step: graph outputs of the last are done with
            sync = i == slots - 1 or where.world_size == 1
            with contextlib.nullcontext() if sync else acc.no_sync(module):
                loss, _ = module(*mb.loss_args())
                loss = faults.point("train:loss", loss)
                acc.backward(loss * ((1.0 if live else 0.0) * where.world_size / n_global))
            if self.plan.compile_scope == "backbone" and i < slots - 1:
                detach_grads(self.trainable.params)  # the next replay would overwrite these gradients
            if live:
                loss_sum += loss.detach().float()
                real += mb.n_real
        # the gradient norm is taken before the loss is checked (clipping only scales the gradients, and a
        # non-finite loss raises before they are applied), so one host read per step gets both
        grad_norm = self._clip() if self.train_cfg.max_grad_norm else None
        norm = (torch.zeros((), device=where.device) if grad_norm is None
                else torch.as_tensor(grad_norm, dtype=torch.float32, device=where.device))
        if where.world_size > 1:  # the token counts and signal flags of every process
            shared = torch.tensor([float(real), float(flag.set)], device=where.device)
            stats = acc.reduce(torch.cat([loss_sum.reshape(1), shared]), reduction="sum")
            loss_total, real_total, interrupted, norm_value = torch.cat([stats, norm.reshape(1)]).tolist()
            flag.set = flag.set or interrupted > 0
        elif self.late_read:  # read one step late (late_read.py): the GPU is never left waiting for the host
            stats = torch.stack([loss_sum.float(), norm.float()])
            self.settle()  # the previous step's numbers, copied while this step's work was queued
            place = self._update(found_inf=(~torch.isfinite(stats).all()).float())
            self._pending = StepNumbers.start(stats, n_targets=n_global, real_tokens=real,
                                              clipped=grad_norm is not None, **place)
            return
        else:  # a host value copied to the GPU would cost a sync of its own
            loss_total, norm_value = torch.stack([loss_sum, norm]).tolist()
            real_total = real
        grad_norm = None if grad_norm is None else norm_value
        self._check_finite(loss_total, grad_norm, state.step + 1)
        self._account(loss_total, n_global, int(real_total), grad_norm, **self._update())

    def settle(self) -> None:
        """Take in the numbers of a step read late (late_read.py): before anything reads the loop's counters."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        loss_total, grad_norm = pending.read()
        self._check_finite(loss_total, grad_norm, pending.step)
        self._account(loss_total, pending.n_targets, pending.real_tokens, grad_norm, pending.lr, pending.step,
                      pending.epoch)

    def _check_finite(self, loss_total: float, grad_norm: float | None, step: int) -> None:
        if not math.isfinite(loss_total):
            raise NonFiniteLoss(self._nonfinite_message(step))
        # fp16's loss scaler skips steps with inf gradients by design; elsewhere they would poison the weights
        if grad_norm is not None and self.placement.precision != "fp16" and not math.isfinite(grad_norm):
            raise NonFiniteLoss(self._nonfinite_message(step, "gradient norm"))

    def _update(self, found_inf: torch.Tensor | None = None) -> dict[str, float]:
        """Optimizer and schedule step (skipped on the device where `found_inf` is 1), the step counters;
        the step's learning rate and place, for its log row."""
        state, trainable = self.state, self.trainable
        lr = trainable.scheduler.get_last_lr()[0]
        step_with_skip(trainable.optimizer, found_inf)
        trainable.scheduler.step()
        trainable.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.step_in_epoch += 1
        return {"lr": lr, "step": state.step, "epoch": self._epochs_done()}

    def _account(self, loss_total: float, n_targets: int, real_tokens: int, grad_norm: float | None, lr: float,
                 step: int, epoch: float) -> None:
        """A step's numbers, on the host: the token counts, the loss window and, when due, its log row."""
        state = self.state
        state.tokens_seen += real_tokens
        state.window_loss += loss_total
        state.window_targets += n_targets
        state.window_tokens += real_tokens
        # the first step is logged too: a short run's first and last train loss then mean something
        if step % self.train_cfg.log_every == 0 or step in (1, state.total_steps):
            self._log_train(lr, grad_norm, step, epoch)

    def _clip(self) -> torch.Tensor | float:
        """Clip by the global gradient norm; under FSDP each process holds a shard of the gradients,
        and only FSDP's own clip_grad_norm_ sums the norm over all of them."""
        acc, max_norm = self.placement.accelerator, self.train_cfg.max_grad_norm
        if self.placement.fsdp:
            acc.unscale_gradients()  # fp16's loss scale (a no-op otherwise)
            return self.trainable.module.clip_grad_norm_(max_norm)
        return acc.clip_grad_norm_(self.trainable.params, max_norm)

    def _log_train(self, lr: float, grad_norm: float | None, step: int, epoch: float) -> None:
        state = self.state
        now = time.time()
        loss = state.window_loss / max(state.window_targets, 1)
        self._last_tok_s = state.window_tokens / max(now - self._last_log, 1e-9)
        state.first_loss = loss if state.first_loss is None else state.first_loss
        state.last_loss = loss
        self._write({"type": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                     "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": state.tokens_seen,
                     "tokens_per_s": round(self._last_tok_s, 2)})
        state.window_loss, state.window_targets, state.window_tokens = 0.0, 0, 0
        self._last_log = now

    def _epochs_done(self) -> float:
        """Epochs trained so far, a fraction within an epoch: the `epoch` of every metrics row alike."""
        state = self.state
        return state.epoch + state.step_in_epoch / max(self.steps.steps_in(state.epoch), 1)

    def _log_eval(self, value: float | None, checkpoint: str = "") -> None:
        """The evaluation's row (with what the observers measure: the probe's stop rate), its line, early stopping."""
        if value is None:
            return
        state = self.state
        state.eval_losses.append(value)
        self.reporter.message(f"eval loss at step {state.step}: {value:.4f}")
        row = {"type": "eval", "step": state.step, "epoch": self._epochs_done(), "eval_loss": value}
        for observer in self.observers:
            row |= observer.on_eval(self.model)
        if "stop_rate" in row:
            state.stop_rates.append([row["stopped"], row["generated"]])
        self._write(row)
        if checkpoint and self.train_cfg.early_stopping_patience:
            self._early_stopping(value, checkpoint, row.get("stop_rate"))

    def _early_stopping(self, value: float, checkpoint: str, stop_rate: float | None = None) -> None:
        """Track the best evaluation since training began; stop after `patience` evaluations without a better one.

        Better: a lower eval loss, or with --select-by stop-rate a higher stop rate (ties: the lower eval loss)."""
        state, patience = self.state, self.train_cfg.early_stopping_patience
        by_rate = self.train_cfg.select_by == "stop-rate" and stop_rate is not None
        key = (-stop_rate, value) if by_rate else (value,)
        best = (-(state.best_stop_rate or 0.0), state.best_eval_loss) if by_rate else (state.best_eval_loss,)
        if state.best_eval_loss is None or key < best:
            state.best_eval_loss, state.best_step, state.best_checkpoint = value, state.step, checkpoint
            state.best_stop_rate = stop_rate
            state.evals_since_best = 0
            return
        state.evals_since_best += 1
        if state.evals_since_best >= patience and state.step < state.total_steps:
            state.stopped_early = True
            what = f"stop rate {state.best_stop_rate:.0%}, " if by_rate else ""
            self.reporter.message(f"Early stopping: no better {'stop rate' if by_rate else 'eval loss'} in {patience} "
                                  f"evaluation(s) since step {state.best_step} ({what}{state.best_eval_loss:.4f}).")

    def _write(self, row: dict[str, Any]) -> None:
        self.state.metrics_lines += 1
        for observer in self.observers:
            observer.on_row(row)

    def _end_epoch(self, partial: bool = False) -> None:
        state = self.state
        if not partial:
            state.epoch += 1
            state.step_in_epoch = 0
        name = f"step-{state.step}" if partial else f"epoch-{state.epoch}"
        if self.val_batcher is not None:
            self._log_eval(self.evaluate(), checkpoint=name)
        self._checkpoint(name)

    def adapter_state(self) -> tuple[dict | None, dict | None]:
        """(LoRA tensors, optimizer state) to save. Under FSDP they are gathered from the shards
        (every process must call this); otherwise (None, None): read them from the model."""
        if not self.placement.fsdp:
            return None, None
        from lora_cli.train import sharding

        trainable = self.trainable
        return sharding.gather(trainable.module, trainable.optimizer, trainable.adapter_names)

    def _checkpoint(self, name: str) -> Path:
        from peft import get_peft_model_state_dict

        self.settle()  # the counters a checkpoint saves include the last step's
        acc = self.placement.accelerator
        acc.wait_for_everyone()
        lora, optim = self.adapter_state()
        path = None
        if self.placement.is_main:
            adapter = get_peft_model_state_dict(self.model) if lora is None else lora
            optimizer_state = self.trainable.optimizer.state_dict() if optim is None else optim
            path = save_checkpoint(self.out.path, name, self.state, adapter, optimizer_state,
                                   self.trainable.scheduler, self.train_cfg.keep_checkpoints)
        self.last_checkpoint = path or (checkpoint_dir(self.out.path) / name)
        acc.wait_for_everyone()
        return self.last_checkpoint

    def _interrupt(self, flag: InterruptFlag, saved: bool = False) -> None:
        self.settle()
        path = self.last_checkpoint if saved else self._checkpoint(f"step-{self.state.step}")
        raise TrainingInterrupted(f"Training interrupted at step {self.state.step}; checkpoint saved to {path}.",
                                  str(path), exit_code=128 + int(flag.signum))

    def _nonfinite_message(self, step: int, what: str = "loss") -> str:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was saved before it")
        levers = {"fp16": "a lower --lr, or --precision bf16 (or fp32) instead of fp16",
                  "bf16": "a lower --lr, or --precision fp32"}.get(self.placement.precision, "a lower --lr")
        return (f"The {what} became NaN or infinite at step {step}; training stopped before applying it, and {where}. "
                f"Try {levers}.")

    def _memory_levers(self) -> StepMemory:
        """The settings that decide a step's memory, for the out-of-memory message."""
        return StepMemory(self.state.step + 1, self.plan.packed, self.plan.max_tokens, self.train_cfg.batch_size,
                          self.cfg.data.max_length, self.train_cfg.grad_accum, self.plan.checkpoint_layers)

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self) -> float | None:
        import torch

        if self.val_batcher is None:
            return None
        where, module = self.placement, self.trainable.module
        module.eval()
        total = torch.zeros((), device=where.device)
        count = 0
        plan = self.val_batcher.plan(0, shuffle=False)
        mine = plan[where.rank::where.world_size]
        # Every forward of a wrapped model is collective (DDP syncs buffers, FSDP gathers weights): all
        # processes run as many forwards, the spare ones counting nothing. Otherwise a val set of fewer
        # micro-batches than processes, or an uneven split, pairs mismatched collectives and hangs.
        slots = math.ceil(len(plan) / where.world_size)
        # CUDA graphs replay one buffer per layer graph; without autograd keeping each layer's output
        # alive, the next layer's replay overwrites it (seen on an H200): evaluate uncompiled there
        eager = torch.compiler.set_stance("force_eager") if self.plan.compile == "graphs" else contextlib.nullcontext()
        with eager, torch.no_grad(), self.reporter.stage("Evaluating", total=None, unit="batches") as bar:
            for i in range(slots):
                live = i < len(mine)
                mb = self.val_batcher.collate(mine[i] if live else plan[0]).to(where.device)
                loss, n = module(*mb.loss_args())
                if live:
                    total += loss.float()
                    count += n
                bar.update(1)
        module.train()
        stats = torch.stack([total, torch.tensor(float(count), device=where.device)])
        if where.world_size > 1:
            stats = where.accelerator.reduce(stats, reduction="sum")
        loss, n = stats.tolist()
        return faults.point("train:eval-loss", loss / n if n else None)
