#!/bin/bash
# session 20's rule: new code seed 4, old code (83d4183, session 19's clone) seed 4 again, then a new user's seed 0; resumable
run() {  # name, checkout, args...
  local name=$1 dir=$2; shift 2
  local d=/work/s20/$name; [ -s $d/time.txt ] && grep -q 'Exit status: 0' $d/time.txt && return
  rm -rf $d && mkdir -p $d
  date -u +"$name start %H:%M:%S" >> /work/s20/progress.txt
  (cd $dir && . /work/s19/nu/.venv/bin/activate && /usr/bin/time -v -o $d/time.txt python grpo_mini.py "$@" --output_dir $d/run > $d/console.log 2>&1)
  date -u +"$name end %H:%M:%S" >> /work/s20/progress.txt
}
run new_seed4 /work/s20/new --seed 4
run old_seed4_again /work/s19/nu --seed 4
echo RUNS_DONE >> /work/s20/progress.txt
