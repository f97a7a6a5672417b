"""Fast vs eager decoding, measured in one command: decode step time, and `lora-cli eval`'s answers.

    python bench/decode_speed.py step --model smollm2-135m --quantization nf4 --batches 8,52
    python bench/decode_speed.py step --config bench/configs/qwen2.5-1.5b-instruct.json --batches 8
    python bench/decode_speed.py eval ADAPTER held_out.jsonl --max-new-tokens 512 --batch-size 52
    python bench/decode_speed.py probe val.jsonl --repeat 2
    python bench/decode_speed.py agree --config bench/configs/smollm2-135m.json --batch 52 --tokens 64


`step` puts a LoRA (rank 16, every linear layer, B drawn small so that it changes the answers) on
the model and times one decoding step as the difference between generating `--long` and
`--short` new tokens (the prefill cancels), for random prompts of 16..128 tokens, no stop token:
the fast path (decode.py: plain merged copy, static cache, CUDA graph) and eager `generate` on the
model as loaded (4-bit NF4 with --quantization nf4; a --config model has random bf16 weights, so
its eager baseline is bf16 + LoRA). `eval` runs `lora-cli eval --json` twice, fast and then with
LORA_CLI_EAGER_GENERATE=1, and compares the answers: identical share, stop rates, generation time.
`probe` times the training probe's decoding (its first K prompts of a val file, each with its own
cap, one batch) on the model with such a LoRA: wall and process CPU seconds (CPU seconds are what
a shared machine cannot blur), of which the prefill, and the rows decoded summed over the steps
(--zero-b: the adapter as at the first evaluation, B still zero). `step` also prints which decoding
step ran ("fused": fused_step.py; "transformers": the model's own forward, LORA_CLI_TRANSFORMERS_STEP=1
asks for it) and its ops (and CUDA kernels) per layer. `agree` decodes the same prompts greedily with
both steps on one model (bf16 on a GPU) and counts identical answers.
Every result is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _with_lora(model, seed: int = 0, zero_b: bool = False):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name and not zero_b:
            p.data.normal_(0.0, 2e-3)
    return model.eval()


def _model(opts, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if opts.config:
        cfg = AutoConfig.from_pretrained(opts.config)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa"), \
                f"{cfg.model_type} random weights (bf16)"
    from lora_cli.model.load import load_model
    from lora_cli.model.resolve import resolve_model

    path = resolve_model(opts.model).path
    return load_model(path, opts.quantization, "bf16", device), f"{opts.model} ({opts.quantization})"


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _step_ops(decoder, ids, mask, layers: int) -> dict:
    """Ops of one decoding step (the second, profiled): top-level aten ops and, on CUDA, kernels; per layer too."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lora_cli.infer.generation import Sampling

    calls, counts = [0], {}
    inner = decoder._forward

    def counted(slot):
        calls[0] += 1
        if calls[0] != 2:
            return inner(slot)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
        with profile(activities=acts) as prof:
            inner(slot)
            _sync()
        events = prof.events()
        counts["ops"] = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
        if ids.is_cuda:
            counts["kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    graphs, decoder.graphs = decoder.graphs, False
    decoder._forward = counted
    try:
        decoder.run(ids, mask.bool(), Sampling(max_new_tokens=4), [-1], 0)
    finally:
        decoder._forward, decoder.graphs = inner, graphs
    return {f"step_{k}": v for k, v in counts.items()} | {f"{k}_per_layer": round(v / layers, 1)
                                                         for k, v in counts.items()}


def step(opts) -> None:
    import torch

    from lora_cli.infer.decode import build_decoder
    from lora_cli.infer.generation import Sampling, _left_padded

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    base, what = _model(opts, device)
    model = _with_lora(base)
    t0 = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(opts.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    decoder, reason = build_decoder(model, device, dtype)
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    for batch in [int(b) for b in opts.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(10, vocab - 10, (int(n),), generator=g).tolist()
                   for n in torch.randint(16, 129, (batch,), generator=g)]
        ids, mask = _left_padded(prompts, 0, device)

        def fast(n):
            return decoder.run(ids, mask.bool(), Sampling(max_new_tokens=n), [-1], 0)

        def eager(n):
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)

        row = {"bench": "step", "model": what, "batch": batch, "device": torch.cuda.get_device_name()
               if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)", "dtype": str(dtype)[6:],
               "copy_build_s": round(build_s, 2), "fallback": reason}
        if decoder is not None:
            row["step"] = decoder.step_kind  # fused (fused_step.py) or transformers (the model's own forward)
            row |= _step_ops(decoder, ids, mask, model.config.num_hidden_layers)
            row["fast_first_call_s"] = round(_timed(lambda: fast(opts.short)), 2)  # capture included
            long_s, short_s = _timed(lambda: fast(opts.long)), _timed(lambda: fast(opts.short))
            row["fast_step_ms"] = round(1000 * (long_s - short_s) / (opts.long - opts.short), 3)
            row["notes"] = decoder.notes
        if opts.no_eager:
            print(json.dumps(row), flush=True)
            continue
        eager(2)
        long_s, short_s = _timed(lambda: eager(opts.eager_long)), _timed(lambda: eager(opts.short))
        row["eager_step_ms"] = round(1000 * (long_s - short_s) / (opts.eager_long - opts.short), 3)
        if decoder is not None:
            row["speedup"] = round(row["eager_step_ms"] / row["fast_step_ms"], 1)
        print(json.dumps(row), flush=True)


def agree(opts) -> None:
    """Greedy answers of the fused step against transformers' forward as the step, same copy dtype, same prompts."""
    import torch

    from lora_cli.infer.decode import build_decoder
    from lora_cli.infer.generation import Sampling, _left_padded

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, what = _model(opts, device)
    model = _with_lora(base)
    if opts.config:  # random weights give flat logits: sharpened, greedy answers depend on the whole step
        with torch.no_grad():
            model.get_base_model().get_output_embeddings().weight.mul_(30)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused, _ = build_decoder(model, device, dtype)
    os.environ["LORA_CLI_TRANSFORMERS_STEP"] = "1"
    plain, _ = build_decoder(model, device, dtype)
    del os.environ["LORA_CLI_TRANSFORMERS_STEP"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, model.config.vocab_size - 10, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 129, (opts.batch,), generator=g)]
    ids, mask = _left_padded(prompts, 0, device)
    a, b = (d.run(ids, mask.bool(), Sampling(max_new_tokens=opts.tokens), [-1], 0) for d in (fused, plain))
    print(json.dumps({"bench": "agree", "model": what, "dtype": str(dtype)[6:], "steps": [fused.step_kind,
                      plain.step_kind], "rows": opts.batch, "tokens": opts.tokens,
                      "identical_rows": sum(bool(torch.equal(x, y)) for x, y in zip(a, b)),
                      "tokens_agree": round((a == b).float().mean().item(), 4)}), flush=True)


def _eval_json(adapter: str, data: str, opts, eager: bool) -> tuple[dict, float]:
    env = dict(os.environ, LORA_CLI_EAGER_GENERATE="1" if eager else "0")
    cmd = [sys.executable, "-m", "lora_cli", "eval", "--adapter", adapter, "--data", data, "--json",
           "--max-new-tokens", str(opts.max_new_tokens), "--batch-size", str(opts.batch_size)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"eval failed ({'eager' if eager else 'fast'}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):]), wall


def evaluate(opts) -> None:
    fast, fast_wall = _eval_json(opts.adapter, opts.data, opts, eager=False)
    eager, eager_wall = _eval_json(opts.adapter, opts.data, opts, eager=True)
    pairs = list(zip(fast["answers"], eager["answers"]))
    same = sum(a["answer"] == b["answer"] for a, b in pairs)
    print(json.dumps({
        "bench": "eval", "records": len(pairs), "max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size,
        "fast_generate_s": fast["generate_seconds"], "eager_generate_s": eager["generate_seconds"],
        "fast_command_s": round(fast_wall, 1), "eager_command_s": round(eager_wall, 1),
        "identical_answers": same, "identical_share": round(same / max(len(pairs), 1), 3),
        "fast_stopped": fast["stopped"], "eager_stopped": eager["stopped"],
        "fast_new_tokens": sum(a["new_tokens"] for a in fast["answers"]),
        "eager_new_tokens": sum(a["new_tokens"] for a in eager["answers"])}), flush=True)


def probe(opts) -> None:
    import types

    import torch

    from lora_cli.infer.decode import build_decoder
    from lora_cli.infer.generation import Sampling, generate_with
    from lora_cli.model.load import load_tokenizer
    from lora_cli.model.resolve import resolve_model
    from lora_cli.train.probe import StopProbe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    tokenizer = load_tokenizer(resolve_model(opts.model).path)
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(eval_generate=opts.k), data=types.SimpleNamespace(
        val=opts.val, template=opts.template, add_eos=True, max_length=opts.max_length))
    stop_probe = StopProbe.build(cfg, tokenizer)
    base, what = _model(opts, device)
    model = _with_lora(base, zero_b=opts.zero_b)
    decoder, reason = build_decoder(model, device, torch.bfloat16)
    if decoder is None:
        raise SystemExit(f"no fast path: {reason}")
    prefill = []
    inner = decoder._prefill

    def timed_prefill(*args):
        t0 = time.perf_counter()
        out = inner(*args)
        _sync()
        prefill.append(time.perf_counter() - t0)
        return out

    decoder._prefill = timed_prefill
    for _ in range(opts.repeat):
        prefill.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        answers = generate_with(model, tokenizer, device, stop_probe.prompts,
                                Sampling(max_new_tokens=stop_probe.max_new_tokens), batch_size=len(stop_probe.prompts),
                                decoder=decoder, caps=stop_probe.caps)
        _sync()
        print(json.dumps({"bench": "probe", "model": what, "step": getattr(decoder, "step_kind", "transformers"),
                          "threads": decoder.cpu_threads or torch.get_num_threads(),
                          "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                          "prefill_s": round(sum(prefill), 2), "row_steps": getattr(decoder, "row_steps", None),
                          "caps": stop_probe.caps, "new_tokens": [len(a.token_ids) for a in answers],
                          "stopped": sum(a.stopped for a in answers)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--quantization", default="nf4")
    s.add_argument("--config", default=None)
    s.add_argument("--batches", default="8,52")
    s.add_argument("--short", type=int, default=16)
    s.add_argument("--long", type=int, default=272)
    s.add_argument("--eager-long", type=int, default=48)
    s.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the copy's dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    s.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the process's)")
    s.add_argument("--no-eager", action="store_true", help="time the fast path only")
    a = sub.add_parser("agree")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--quantization", default="nf4")
    a.add_argument("--config", default=None)
    a.add_argument("--batch", type=int, default=52)
    a.add_argument("--tokens", type=int, default=64)
    e = sub.add_parser("eval")
    e.add_argument("adapter")
    e.add_argument("data")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=52)
    p = sub.add_parser("probe")
    p.add_argument("val")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--config", default=None)
    p.add_argument("--template", default="alpaca")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("-k", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the process's)")
    p.add_argument("--zero-b", action="store_true", help="LoRA B left at zero, as before the first optimizer step")
    opts = ap.parse_args()
    from lora_cli.model.load import quiet_libraries

    quiet_libraries()
    {"step": step, "agree": agree, "eval": evaluate, "probe": probe}[opts.what](opts)


if __name__ == "__main__":
    main()
