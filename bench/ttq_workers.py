"""The two worker processes of bench/time_to_quality.py: the reference recipe through HF Trainer, and
the one scoring pass over every saved adapter. Each runs as its own process (`--worker recipe|score`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def recipe_worker(args) -> None:
    """The seed recipe through HF Trainer (one process, timed from outside)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from lora_cli.data.records import iter_examples
    from lora_cli.data.templates import get_template

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    precision = args.recipe_precision if cuda else "fp32"  # fp16 mixed precision needs a GPU
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    template = get_template("alpaca-seed")  # the recipe's prompt, empty Input block kept

    def encode(path):  # the recipe: whole text, truncation at 512, labels = input_ids, no eos
        texts = [template.prompt_text(e.instruction, e.input) + e.output for e in iter_examples(path)]
        return [{"input_ids": ids} for ids in tok(texts, truncation=True, max_length=512)["input_ids"]]

    train_rows = encode(args.train)
    val_rows = encode(args.val) if args.recipe_eval else None
    if args.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, device_map={"": 0 if cuda else "cpu"},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=compute))
    else:  # the same script with the BitsAndBytesConfig left out: fp32 weights, mixed precision by autocast
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        model.to("cuda" if cuda else "cpu")
    model.config.use_cache = False
    # the recipe calls it whatever the quantization; it enables gradient checkpointing only for k-bit models
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                             task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    pad = tok.pad_token_id
    tokens = [0]

    def collate(feats):  # pads dynamically, labels padded with -100
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), pad, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        tokens[0] += int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / 2) / 2)
    info = {"precision": precision, "saves": [], "epoch_ends": [], "step_times": [], "losses": [],
            "nonfinite_losses": 0, "steps_full": steps_per_epoch * args.epochs, "save_seconds": []}
    out_f = run_dir / "recipe_times.json"

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            info["step_times"].append(time.time())

        def on_epoch_end(self, a, state, control, **kw):
            info["epoch_ends"].append({"epoch": state.epoch, "step": state.global_step, "time": time.time()})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                info["losses"].append(float(logs["loss"]))
                info["nonfinite_losses"] += not math.isfinite(float(logs["loss"]))

        def on_save(self, a, state, control, **kw):
            now = time.time()
            start = info["step_times"][-1] if info["step_times"] else now
            info["save_seconds"].append(round(now - start, 3))
            folder = Path(a.output_dir) / f"checkpoint-{state.global_step}"
            info["saves"].append({"epoch": round(state.epoch or 0, 3), "step": state.global_step, "time": now,
                                  "path": str(folder / "adapter_model.safetensors")})
            info["global_step"], info["tokens"] = state.global_step, tokens[0]
            out_f.write_text(json.dumps(info))

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    short = args.recipe_max_steps or 0
    targs = TrainingArguments(
        output_dir=str(run_dir / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=2e-4, num_train_epochs=args.epochs, max_steps=short or -1,
        fp16=precision == "fp16", bf16=precision == "bf16", use_cpu=not cuda, logging_steps=10,
        save_strategy="steps" if short else "epoch", save_steps=short or 500, eval_strategy="epoch" if val_rows else "no",
        optim="adamw_torch", report_to=[], remove_unused_columns=False, seed=42, dataloader_num_workers=0,
        disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=Rows(train_rows), eval_dataset=Rows(val_rows) if val_rows else None,
            data_collator=collate, callbacks=[Clock()]).train()
    info["global_step"], info["tokens"] = len(info["step_times"]), tokens[0]
    out_f.write_text(json.dumps(info))


def score_worker(args) -> None:
    """One pass over every saved adapter: response loss on the val records, stop rate of the finals."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lora_cli.adapter.folder import AdapterInfo
    from lora_cli.config import LoraSettings
    from lora_cli.infer.evaluation import read_examples, response_loss
    from lora_cli.infer.generation import Sampling, generate, load_for_inference
    from lora_cli.data.templates import get_template

    job = json.loads(Path(args.job).read_text())
    examples = read_examples(job["val"])
    prompts_n = job["stop_prompts"]
    results = {"adapters": [], "base": {}}
    t_all = time.time()
    for quant, items in job["by_quant"].items():
        t0 = time.time()
        first = Path(items[0]["adapter"]).parent
        info = AdapterInfo(path=first, base_model=job["model"], template="alpaca", add_eos=True, max_length=512,
                           quantization=quant, trust_remote_code=False, lora=LoraSettings())
        # the LoRA config (r 16, alpha 32, q/v) is the same for every run; the folder's adapter_config.json
        # comes from the final adapter (lora-cli) or the checkpoint itself (Trainer)
        loaded = load_for_inference(info, quantization=quant, precision=job["precision"], with_adapter=True)
        n_lora = sum(1 for n, _ in loaded.model.named_parameters() if "lora_" in n)
        alpaca = get_template("alpaca")

        def loss_of(use_adapter=True):
            s = response_loss(loaded, examples, use_adapter=use_adapter)
            return s.total / s.n, s.text_total / s.text_n, s.n

        def stop_rate():
            sample = examples[:prompts_n]
            answers = generate(loaded, [loaded.example_prompt(e) for e in sample],
                               Sampling(max_new_tokens=job["max_new_tokens"]), job["gen_batch_size"])
            return sum(a.stopped for a in answers) / len(answers), sum(len(a.token_ids) for a in answers) / len(answers)

        loaded.template = alpaca
        b_loss, b_text, n = loss_of(use_adapter=False)
        base = {"quantization": quant, "loss": b_loss, "loss_text": b_text, "targets": n}
        if prompts_n:
            with loaded.model.disable_adapter():
                base["stop_rate"], base["mean_new_tokens"] = stop_rate()
        results["base"][quant] = base
        print(f"[score] {quant} base: loss {b_loss:.4f}", flush=True)
        for item in items:
            tensors = load_file(item["adapter"])
            loaded_keys = set_peft_model_state_dict(loaded.model, tensors)
            unexpected = list(getattr(loaded_keys, "unexpected_keys", []) or [])
            if len(tensors) != n_lora or unexpected:
                raise SystemExit(f"{item['adapter']}: {len(tensors)} tensors for {n_lora} LoRA parameters, "
                                 f"unexpected {unexpected[:3]}")
            loaded.template = get_template(item["template"])
            loss, text, _ = loss_of()
            row = {**item, "loss": loss, "loss_text": text}
            if item.get("final") and prompts_n:
                row["stop_rate"], row["mean_new_tokens"] = stop_rate()
            results["adapters"].append(row)
            print(f"[score] {quant} {item['run']} epoch {item['epoch']}: loss {loss:.4f}"
                  + (f", stop rate {row['stop_rate']:.1%}" if "stop_rate" in row else ""), flush=True)
        results.setdefault("seconds", {})[quant] = round(time.time() - t0, 1)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results["seconds_total"] = round(time.time() - t_all, 1)
    Path(args.result).write_text(json.dumps(results, indent=1))
