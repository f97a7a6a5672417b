"""One benchmark variant per process: the reference recipe (HF Trainer) or lora-cli's own loop.

Each worker loads the random-weight model from the folder the orchestrator built, trains
`warmup + steps` optimizer steps on the same examples, and appends one JSON line: step times
(taken after a CUDA synchronize at each step end), real and padded tokens per step, peak
memory, first and last loss.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
import time

PAD_ID = 151643


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _PadCollator:
    """The recipe's collator: right-pad to the batch max, labels = input_ids with pad -> -100."""

    def __init__(self, pad_id: int = PAD_ID):
        self.log, self.pad_id = [], pad_id

    def __call__(self, feats):
        import torch

        lens = [len(f["input_ids"]) for f in feats]
        width = max(lens)
        ids = torch.full((len(feats), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, : lens[i]] = torch.as_tensor(f["input_ids"])
            mask[i, : lens[i]] = 1
        self.log.append((sum(lens), len(feats) * width))
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def run_reference(model_dir: str, examples: list[dict], warmup: int, steps: int) -> dict:
    """The seed recipe: nf4 + fp16 compute, prepare_model_for_kbit_training (GC), 2 x accum 2, Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()  # on a CPU, fp16 does not apply: the recipe runs in fp32 there
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": 0 if cuda else "cpu"},
                                                 quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16 if cuda else torch.float32))
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    collator = _PadCollator(model.config.pad_token_id if model.config.pad_token_id is not None else PAD_ID)
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return {"input_ids": examples[i]["input_ids"]}

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=2e-4, fp16=cuda, use_cpu=not cuda, logging_steps=1,
                             max_steps=warmup + steps,
                             save_strategy="no", report_to=[], optim="adamw_torch", remove_unused_columns=False,
                             dataloader_num_workers=0, seed=42, logging_nan_inf_filter=False, disable_tqdm=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator, callbacks=[Timer()]).train()
    per_step = [(sum(r for r, _ in collator.log[2 * k: 2 * k + 2]), sum(p for _, p in collator.log[2 * k: 2 * k + 2]))
                for k in range(len(times))]
    return _result([t0, *times], per_step, warmup, losses)


def run_loracli(model_dir: str, examples: list[dict], warmup: int, steps: int, overrides: dict) -> dict:
    """lora-cli's real training path (recipe.LoRARecipe) on in-memory tokenized examples."""
    import torch
    from datasets import Dataset

    from lora_cli.config import RunConfig
    from lora_cli.model.load import quiet_libraries
    from lora_cli.train.recipe import LoRARecipe, TrainingData
    from lora_cli.train.runtime import place

    quiet_libraries()
    overrides = dict(overrides)
    on_prompt = overrides.pop("data.train_on_prompt", False)
    scope = overrides.pop("bench.compile_scope", None)
    if overrides.pop("bench.read_each_step", False):  # the loop's immediate read of each step's loss (a host sync)
        from lora_cli import faults

        faults.inject("train:begin", lambda loop: setattr(loop, "late_read", False)).__enter__()
    if scope:  # not a user setting: the plan's choice, forced to compare the two scopes
        import lora_cli.train.plan

        lora_cli.train.plan._compile_scope = lambda *args: scope
    if not torch.cuda.is_available():  # CPU dry run of the harness
        overrides["train.precision"] = "fp32"
    else:  # a short bench run stands for a long one: auto decides as for a run long enough to compile
        import lora_cli.train.plan

        lora_cli.train.plan.MIN_COMPILE_STEPS = lora_cli.train.plan.MIN_GRAPH_STEPS = 0
    cfg = RunConfig().replace({"model.name": model_dir, "train.max_steps": warmup + steps, "train.log_every": 1,
                               "train.eval_at_start": False, "train.keep_checkpoints": 1,
                               "output.dir": "/tmp/lora-cli-bench/run-adapters", **overrides})
    labels = [[-100] * e["prompt_len"] + e["input_ids"][e["prompt_len"]:] if not on_prompt else e["input_ids"]
              for e in examples]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples], "labels": labels,
                            "length": [len(e["input_ids"]) for e in examples],
                            "n_targets": [sum(1 for x in lab[1:] if x != -100) for lab in labels]})
    placement = place(cfg)
    log, times = [], []

    from lora_cli.data.batching import Batcher

    original = Batcher.collate

    def counting_collate(self, indices):
        mb = original(self, indices)
        log.append((mb.n_real, mb.n_padded))
        return mb

    Batcher.collate = counting_collate
    reporter = _TimingReporter(times, log, _profiler(warmup))

    pad = json.load(open(f"{model_dir}/config.json")).get("pad_token_id")

    class _Tok:
        pad_token_id = PAD_ID if pad is None else pad

        def save_pretrained(self, folder):
            pass

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with LoRARecipe(cfg, overwrite=True, reporter=reporter) as recipe:
        recipe.setup(placement=placement, data=TrainingData(ds, None, _Tok(), model_dir, {}))
        recipe.train()
        result = recipe.finish()
    metrics = f"{cfg.output.dir}/metrics.jsonl"
    losses = [json.loads(line)["loss"] for line in open(metrics) if '"train"' in line] if placement.is_main else []
    out = _result(times, reporter.per_step, warmup, losses)
    out["decisions"] = asdict(result.decisions)
    out["memory_plan"] = reporter.messages
    return out


def _profiler(warmup: int):
    """torch.profiler over 4 steps inside the warm-up (BENCH_PROFILE=FILE: its tables go there), else None."""
    import os

    import torch

    path = os.environ.get("BENCH_PROFILE")
    if not path or warmup < 6 or not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    def done(prof):
        averages = prof.key_averages()
        with open(path, "w") as fh:
            fh.write("4 optimizer steps, sorted by GPU time\n")
            fh.write(averages.table(sort_by="cuda_time_total", row_limit=30) + "\n\n")
            fh.write("sorted by host time\n" + averages.table(sort_by="cpu_time_total", row_limit=30) + "\n")
        prof.export_chrome_trace(path.removesuffix(".txt") + ".trace.json")  # the timeline: gaps show host-bound time

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=warmup - 5, warmup=1, active=4, repeat=1), on_trace_ready=done)
    prof.start()
    return prof


class _TimingReporter:
    def __init__(self, times, log, prof=None):
        self.times, self.log, self.per_step, self.messages, self._seen = times, log, [], [], 0
        self.prof = prof

    def stage(self, name, total=None, unit=""):
        import contextlib
        import os

        reporter = self

        class Stage:
            def update(self, advance=1, **fields):
                if name != "Training":
                    return
                if not os.environ.get("BENCH_HOST_CLOCK"):  # else: the host's pace, no sync added per step
                    _sync()
                reporter.times.append(time.perf_counter())
                if reporter.prof is not None and advance:
                    reporter.prof.step()
                if advance and len(reporter.times) > 1:
                    new = reporter.log[reporter._seen:]
                    reporter._seen = len(reporter.log)
                    reporter.per_step.append((sum(r for r, _ in new), sum(p for _, p in new)))

        return contextlib.nullcontext(Stage())

    def message(self, text):
        self.messages.append(text)


def _result(times: list[float], per_step: list[tuple[int, int]], warmup: int, losses: list[float]) -> dict:
    """Throughput over the steps after warm-up; times[0] is the start of step 1."""
    import torch

    durations = [b - a for a, b in zip(times, times[1:])]
    timed = slice(warmup, len(durations))
    seconds = sum(durations[timed])
    real = sum(r for r, _ in per_step[timed])
    padded = sum(p for _, p in per_step[timed])
    return {"steps_timed": len(durations[timed]), "seconds": seconds, "real_tokens": real, "padded_tokens": padded,
            "real_tok_s": real / seconds if seconds else 0.0, "padded_tok_s": padded / seconds if seconds else 0.0,
            "median_step_s": sorted(durations[timed])[len(durations[timed]) // 2] if durations[timed] else 0.0,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "losses": losses, "step_seconds": [round(d, 4) for d in durations]}
