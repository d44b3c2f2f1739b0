#!/bin/bash
# resumable screen of allocator / cache settings, 8 steps each; one at a time
cd /work/main && . .venv/bin/activate && export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() { name=$1; shift; out=/work/s19/mem8_$name.txt; [ -s $out ] && grep -q 'peak RSS' $out && return; env "$@" python benchmarks/memory.py --steps 8 --heap > $out.tmp 2>&1 && mv $out.tmp $out; }
run caches32 ONEDNN_PRIMITIVE_CACHE_CAPACITY=32 LRU_CACHE_CAPACITY=32
run arena1 MALLOC_ARENA_MAX=1
run caches8 ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 LRU_CACHE_CAPACITY=8
run default_b X=1
echo SCREEN_DONE
