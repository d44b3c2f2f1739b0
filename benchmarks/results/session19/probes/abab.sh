#!/bin/bash
cd /work/main && . .venv/bin/activate && export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for i in 1 2; do
  for c in 256 32; do
    out=/work/s19/step_time_c${c}_$i.txt; [ -s $out ] && continue
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=$c LRU_CACHE_CAPACITY=$c python benchmarks/step_time.py --models smollm2 --betas 0 --no-trl --rounds 1 --steps 3 > $out.tmp 2>&1 && mv $out.tmp $out
  done
done
echo ABAB_DONE
