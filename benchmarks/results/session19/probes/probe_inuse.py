"""Probe: per training phase, the highest glibc bytes in use and RSS (sampled every 5 ms), first N steps."""
import sys, threading, time, tempfile, ctypes
from pathlib import Path
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import benchmarks.memory as bm
import grpo_mini as gm, engine
from benchmarks.cli import short_run_argv
steps = int(sys.argv[1]); flags = sys.argv[2:]
GIB = 2**30
state = {"phase": "setup"}; peaks = {}
stop = threading.Event()
def sample():
    while not stop.is_set():
        h = bm.glibc_heap(); r = bm.rss(); p = state["phase"]
        a, b, c = peaks.get(p, (0, 0, 0))
        peaks[p] = (max(a, h["in_use"]), max(b, r), max(c, h["in_use"] + h["free"]))
        time.sleep(0.005)
count = {"step": 0}
real_acc, real_opt, real_gen = gm.accumulate_gradients, gm.optimizer_step, engine.sample_completions
def wrap(fn, name):
    def inner(*a, **k):
        old = state["phase"]; state["phase"] = f"step{count['step']} {name}"
        try: return fn(*a, **k)
        finally: state["phase"] = old
    return inner
real_step = gm.grpo_step
def step(*a, **k):
    count["step"] += 1
    return real_step(*a, **k)
gm.grpo_step = step
gm.accumulate_gradients = wrap(real_acc, "backward")
gm.optimizer_step = wrap(real_opt, "optim")
t = threading.Thread(target=sample, daemon=True); t.start()
with tempfile.TemporaryDirectory() as out:
    cfg = gm.parse_config(argv=short_run_argv(steps, Path(out) / "run", flags))
    gm.train(cfg)
stop.set(); t.join()
for p, (iu, r, arena) in peaks.items():
    print(f"{p:24s} in_use max {iu/GIB:.2f}  heap max {arena/GIB:.2f}  RSS max {r/GIB:.2f}")
