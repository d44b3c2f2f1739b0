#!/bin/bash
# seeds of the committed code (83d4183) from the new user's clone, glibc, one at a time; resumable
cd /work/s19/nu && . .venv/bin/activate
for s in "$@"; do
  d=/work/s19/seed$s; [ -s $d/time.txt ] && grep -q 'Exit status: 0' $d/time.txt && continue
  rm -rf $d && mkdir -p $d
  date -u +"seed $s start %H:%M:%S" >> /work/s19/seeds_progress.txt
  /usr/bin/time -v -o $d/time.txt python grpo_mini.py --seed $s --output_dir $d/run > $d/console.log 2>&1
  date -u +"seed $s end %H:%M:%S" >> /work/s19/seeds_progress.txt
done
echo SEEDS_DONE >> /work/s19/seeds_progress.txt
