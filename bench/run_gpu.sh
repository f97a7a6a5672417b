#!/usr/bin/env bash
# The GPU machine's side of the speed benchmark (see docs/PERFORMANCE.md for the device call).
# Installs the carried wheels (bitsandbytes, datasets and its small deps are not in the image),
# reports the stack, then runs bench/train_speed.py with the given variants.
#   bash bench/run_gpu.sh ref,default,gc-all [extra train_speed.py args]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 - <<'PY'
import importlib, sys, torch
print("python", sys.version.split()[0])
for m in ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "triton"]:
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "IMPORT FAILED", e)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
for _ in range(10): a @ b
e.record(); torch.cuda.synchronize(); ms = s.elapsed_time(e) / 10
print(f"bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
PY
VARIANTS=$1; shift
python3 bench/train_speed.py --variants "$VARIANTS" --out "$OUT/results.jsonl" "$@" 2>&1 | tee "$OUT/log.txt" \
  | grep -v -E "^\s*$|Warning|warn\(" 
