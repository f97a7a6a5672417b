"""One optimizer step at a time: accumulation, normalisation, reduction, checkpoints.

Loss normalisation: every optimizer step divides the summed token losses of all its
micro-batches (on all processes) by their total number of target tokens, known in advance
from the plan. Each token weighs the same whatever the packing, the accumulation or the
number of GPUs, so changing those levers does not change what is optimised.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict

from lora_cli.atomic import kill_point
from lora_cli.checkpoint import LoopState, checkpoint_dir, load_checkpoint, restore_rng, save_checkpoint
from lora_cli.errors import LoraCliError, NonFiniteLoss, TrainingInterrupted
from lora_cli.oom import out_of_memory_as_error


def make_optimizer(params, t, rt):
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        raise LoraCliError("No trainable parameters: LoRA matched no module.", "Check --target-modules.")
    return torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay,
                             fused=rt.on_cuda or None)


def make_scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                         num_warmup_steps=t.warmup_steps, num_training_steps=max(total_steps, 1))


class InterruptFlag:
    """First Ctrl-C (or SIGTERM, as schedulers and spot instances send before a kill): finish the
    step, checkpoint, stop. A second one: stop at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, reporter):
        self.reporter = reporter
        self.set = False
        self.signum = signal.SIGINT
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum
        self.reporter.message("Interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort).")

    def __enter__(self):
        for name in self.SIGNALS:
            with contextlib.suppress(ValueError, AttributeError):  # not the main thread: no handler
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingLoop:
    def __init__(self, cfg, rt, model, batcher, val_batcher, out, reporter):
        self.cfg, self.t, self.rt = cfg, cfg.train, rt
        self.model, self.batcher, self.val_batcher = model, batcher, val_batcher
        self.out, self.reporter = out, reporter
        self.state = LoopState(fingerprint=out.fingerprint, world_size=rt.world_size)
        self.group = self.t.grad_accum * rt.world_size  # micro-batches per optimizer step
        self._plans: dict[int, list] = {}
        self.steps_per_epoch = self._groups_in(0)
        self.total_steps = self.t.max_steps or sum(self._groups_in(e) for e in range(self.t.epochs))
        self.state.total_steps = self.total_steps
        self.eval_losses: list[float] = []
        self.first_loss = self.last_loss = None

    # ---- planning ---------------------------------------------------------------------
    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: self.batcher.plan(epoch)}
        return self._plans[epoch]

    def _groups_in(self, epoch: int) -> int:
        return math.ceil(len(self.plan(epoch)) / self.group)

    # ---- setup ------------------------------------------------------------------------
    def bind(self, make_optimizer, make_scheduler) -> None:
        """Wrap the training module (DDP, FSDP or nothing), then build the optimizer over the
        wrapped module's parameters: FSDP replaces them with flat shards."""
        from lora_cli.loss import make_loss_module

        acc = self.rt.accelerator
        if self.rt.fsdp:
            from lora_cli import sharding

            sharding.configure(acc, self.model, self.rt.precision)
            self._adapter_names = sharding.adapter_names(self.model)
        self.module = acc.prepare(make_loss_module(self.model, self.t.fused_loss))
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.trainable)
        self.scheduler = make_scheduler(optimizer)
        self.optimizer = acc.prepare(optimizer)

    def load(self, checkpoint) -> tuple:
        """Read a checkpoint and put its adapter weights into the model (before bind: FSDP shards them)."""
        from peft import set_peft_model_state_dict

        loaded = load_checkpoint(checkpoint)
        state, adapter = loaded[0], loaded[1]
        if state.world_size != self.rt.world_size:
            raise LoraCliError(f"Checkpoint {checkpoint} was made with {state.world_size} process(es); "
                               f"resume with the same number (now {self.rt.world_size}).")
        if bool(state.extra.get("fsdp")) != self.rt.fsdp:
            how = "with FSDP" if state.extra.get("fsdp") else "without FSDP"
            raise LoraCliError(f"Checkpoint {checkpoint} was made {how}; resume it the same way.")
        device = "cpu" if self.rt.fsdp else self.rt.device  # under FSDP the model waits on the CPU
        set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in adapter.items()})
        return loaded

    def restore(self, loaded) -> None:
        """Optimizer, schedule, RNG and loop position of a checkpoint read by `load` (after bind)."""
        state, _, optim, sched, rng = loaded
        if self.rt.fsdp:
            from lora_cli import sharding

            sharding.load_optimizer(self.module, self.optimizer, optim)
        else:
            self.optimizer.load_state_dict(optim)
        self.scheduler.load_state_dict(sched)
        restore_rng(rng)
        self.state = state
        summary = state.extra.get("summary", {})  # so a resumed run reports the whole run's losses
        self.first_loss, self.last_loss = summary.get("first_loss"), summary.get("last_loss")
        self.eval_losses = list(summary.get("eval_losses", []))
        self.out.truncate_metrics(state.metrics_lines)

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        st = self.state
        self.module.train()  # from_pretrained leaves eval mode: no LoRA dropout, no checkpointing
        with InterruptFlag(self.reporter) as flag, out_of_memory_as_error(self._memory_levers):
            if self.t.eval_at_start and st.step == 0 and self.val_batcher is not None:
                self._log_eval(self.evaluate())
            self._last_log = time.time()
            with self.reporter.stage("Training", total=self.total_steps, unit="steps") as bar:
                bar.update(st.step)
                while st.step < self.total_steps:
                    self._run_epoch(flag, bar)
        return {"first_loss": self.first_loss, "last_loss": self.last_loss, "eval_losses": self.eval_losses,
                "steps": st.step, "tokens": st.tokens_seen, "seconds": round(time.time() - t0, 3)}

    def _run_epoch(self, flag, bar) -> None:
        """The rest of the current epoch, its end, and a stop when a signal asked for one."""
        st = self.state
        groups = self.plan(st.epoch)
        n_groups = math.ceil(len(groups) / self.group)
        while st.step_in_epoch < n_groups and st.step < self.total_steps:
            g = st.step_in_epoch
            self._step(groups[g * self.group:(g + 1) * self.group], flag)
            kill_point("train:step")
            bar.update(1, loss=self.last_loss, tok_s=self._tok_s)
            at_end = st.step_in_epoch >= n_groups or st.step >= self.total_steps
            if flag.set and not at_end:
                self._interrupt(flag)
            if self.t.save_every_steps and st.step % self.t.save_every_steps == 0 and not at_end:
                self._checkpoint(f"step-{st.step}")
        self._end_epoch(partial=st.step_in_epoch < n_groups)
        self._sync_flag(flag)  # a signal during the evaluation reached only some processes
        if flag.set and st.step < self.total_steps:
            self._interrupt(flag, saved=True)

    def _sync_flag(self, flag) -> None:
        if self.rt.world_size > 1:
            import torch

            raised = torch.tensor(float(flag.set), device=self.rt.device)
            flag.set = self.rt.accelerator.reduce(raised, reduction="sum").item() > 0

    def _step(self, group: list[list[int]], flag) -> None:
        import torch

        acc, rt, st = self.rt.accelerator, self.rt, self.state
        n_global = max(1, sum(self.batcher.n_targets(mb) for mb in group))
        mine = group[rt.rank::rt.world_size]
        slots = math.ceil(len(group) / rt.world_size)
        loss_sum = torch.zeros((), device=rt.device)
        real = 0
        for i in range(slots):
            live = i < len(mine)
            mb = self.batcher.collate(mine[i] if live else group[0]).to(rt.device)
            sync = i == slots - 1 or rt.world_size == 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.module):
                loss, _ = self.module(*mb.loss_args())
                acc.backward(loss * ((1.0 if live else 0.0) * rt.world_size / n_global))
            if live:
                loss_sum += loss.detach().float()
                real += mb.n_real
        stats = torch.stack([loss_sum, torch.tensor(float(real), device=rt.device),
                             torch.tensor(float(flag.set), device=rt.device)])
        if rt.world_size > 1:
            stats = acc.reduce(stats, reduction="sum")
        loss_total, real_total, interrupted = stats.tolist()
        flag.set = flag.set or interrupted > 0
        if not math.isfinite(loss_total):
            raise NonFiniteLoss(self._nonfinite_message(st.step + 1))
        grad_norm = self._clip() if self.t.max_grad_norm else None
        # fp16's loss scaler skips steps with inf gradients by design; elsewhere they would poison the weights
        if grad_norm is not None and rt.precision != "fp16" and not math.isfinite(float(grad_norm)):
            raise NonFiniteLoss(self._nonfinite_message(st.step + 1, "gradient norm"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        st.step_in_epoch += 1
        st.tokens_seen += int(real_total)
        st.window_loss += loss_total
        st.window_targets += n_global
        st.window_tokens += int(real_total)
        st.window_steps += 1
        if st.step % self.t.log_every == 0 or st.step == self.total_steps:
            self._log_train(lr, grad_norm)

    def _clip(self):
        """Clip by the global gradient norm; under FSDP each process holds a shard of the gradients,
        and only FSDP's own clip_grad_norm_ sums the norm over all of them."""
        acc = self.rt.accelerator
        if self.rt.fsdp:
            acc.unscale_gradients()  # fp16's loss scale (a no-op otherwise)
            return self.module.clip_grad_norm_(self.t.max_grad_norm)
        return acc.clip_grad_norm_(self.trainable, self.t.max_grad_norm)

    @property
    def _tok_s(self) -> float | None:
        return getattr(self, "_last_tok_s", None)

    def _log_train(self, lr, grad_norm) -> None:
        st = self.state
        now = time.time()
        loss = st.window_loss / max(st.window_targets, 1)
        self._last_tok_s = st.window_tokens / max(now - self._last_log, 1e-9)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self._write({"type": "train", "step": st.step, "epoch": st.epoch + st.step_in_epoch / max(self._groups_in(st.epoch), 1),
                     "loss": loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                     "tokens": st.tokens_seen, "tokens_per_s": round(self._last_tok_s, 2)})
        st.window_loss, st.window_targets, st.window_tokens, st.window_steps = 0.0, 0, 0, 0
        self._last_log = now

    def _log_eval(self, value: float | None) -> None:
        if value is None:
            return
        self.eval_losses.append(value)
        self._write({"type": "eval", "step": self.state.step, "epoch": self.state.epoch, "eval_loss": value})
        self.reporter.message(f"eval loss at step {self.state.step}: {value:.4f}")

    def _write(self, row: dict) -> None:
        self.out.append_metrics(row)
        self.state.metrics_lines += 1

    def _end_epoch(self, partial: bool = False) -> None:
        st = self.state
        if not partial:
            st.epoch += 1
            st.step_in_epoch = 0
        if self.val_batcher is not None:
            self._log_eval(self.evaluate())
        self._checkpoint(f"step-{st.step}" if partial else f"epoch-{st.epoch}")

    def adapter_state(self) -> tuple[dict | None, dict | None]:
        """(LoRA tensors, optimizer state) to save. Under FSDP they are gathered from the shards
        (every process must call this); otherwise (None, None): read them from the model."""
        if not self.rt.fsdp:
            return None, None
        from lora_cli import sharding

        return sharding.gather(self.module, self.optimizer, self._adapter_names)

    def _checkpoint(self, name: str):
        from peft import get_peft_model_state_dict

        self.rt.accelerator.wait_for_everyone()
        self.state.extra["summary"] = {"first_loss": self.first_loss, "last_loss": self.last_loss,
                                       "eval_losses": self.eval_losses}
        self.state.extra["fsdp"] = self.rt.fsdp
        lora, optim = self.adapter_state()
        path = None
        if self.rt.is_main:
            adapter = get_peft_model_state_dict(self.model) if lora is None else lora
            path = save_checkpoint(self.out.path, name, self.state, adapter,
                                   self.optimizer.state_dict() if optim is None else optim, self.scheduler,
                                   self.t.keep_checkpoints)
        self.last_checkpoint = path or (checkpoint_dir(self.out.path) / name)
        self.rt.accelerator.wait_for_everyone()
        return self.last_checkpoint

    def _interrupt(self, flag, saved: bool = False) -> None:
        path = self.last_checkpoint if saved else self._checkpoint(f"step-{self.state.step}")
        raise TrainingInterrupted(f"Training interrupted at step {self.state.step}; checkpoint saved to {path}.",
                                  str(path), None, exit_code=128 + int(flag.signum))

    def _nonfinite_message(self, step: int, what: str = "loss") -> str:
        last = getattr(self, "last_checkpoint", None)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        return (f"The {what} became NaN or infinite at step {step}; training stopped before applying it, and {where}. "
                f"Try a lower --lr, or --precision bf16/fp32 instead of fp16.")

    def _memory_levers(self) -> dict:
        """The settings that decide a step's memory, for the out-of-memory message."""
        return {"step": self.state.step + 1, "packed": self.rt.packed, "max_tokens": self.rt.max_tokens,
                "batch_size": self.t.batch_size, "max_length": self.cfg.data.max_length,
                "grad_accum": self.t.grad_accum, "checkpoint_layers": getattr(self.rt, "checkpoint_layers", None)}

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self) -> float | None:
        import torch

        if self.val_batcher is None:
            return None
        rt = self.rt
        self.module.eval()
        total = torch.zeros((), device=rt.device)
        count = 0
        plan = self.val_batcher.plan(0, shuffle=False)
        mine = plan[rt.rank::rt.world_size]
        # Every forward of a wrapped model is collective (DDP syncs buffers, FSDP gathers weights): all
        # processes run as many forwards, the spare ones counting nothing. Otherwise a val set of fewer
        # micro-batches than processes, or an uneven split, pairs mismatched collectives and hangs.
        slots = math.ceil(len(plan) / rt.world_size)
        with torch.no_grad(), self.reporter.stage("Evaluating", total=None, unit="batches") as bar:
            for i in range(slots):
                live = i < len(mine)
                mb = self.val_batcher.collate(mine[i] if live else plan[0]).to(rt.device)
                loss, n = self.module(*mb.loss_args())
                if live:
                    total += loss.float()
                    count += n
                bar.update(1)
        self.module.train()
        stats = torch.stack([total, torch.tensor(float(count), device=rt.device)])
        if rt.world_size > 1:
            stats = rt.accelerator.reduce(stats, reduction="sum")
        loss, n = stats.tolist()
        return loss / n if n else None
