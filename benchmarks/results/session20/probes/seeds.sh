#!/bin/bash
# seeds of 83d4183's training code from session 19's new-user clone, glibc, one at a time; resumable
cd /work/s19/nu && . .venv/bin/activate
for s in "$@"; do
  d=/work/s20/seed$s; [ -s $d/time.txt ] && grep -q 'Exit status: 0' $d/time.txt && continue
  rm -rf $d && mkdir -p $d
  date -u +"seed $s start %H:%M:%S" >> /work/s20/seeds_progress.txt
  /usr/bin/time -v -o $d/time.txt python grpo_mini.py --seed $s --output_dir $d/run > $d/console.log 2>&1
  date -u +"seed $s end %H:%M:%S" >> /work/s20/seeds_progress.txt
done
echo SEEDS_DONE >> /work/s20/seeds_progress.txt
