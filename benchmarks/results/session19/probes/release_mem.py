"""Experiment: the bf16 sampling copy's weights are handed back during the training phase and made again after it.
Runs benchmarks/memory.py's main with the remaining argv."""
import sys, torch
sys.path.insert(0, "/work/main")
import engine, grpo_mini as gm
held = {}
real_make, real_refresh, real_acc = engine.make_sampling_model, engine.refresh_sampling_model, gm.accumulate_gradients
def make(model, *a, **k):
    s = real_make(model, *a, **k); held["sampler"], held["model"] = s, model; return s
@torch.no_grad()
def refresh(sampler, model):
    if sampler is not model:
        for t, s in zip(sampler.parameters(), model.parameters()):
            if t.numel() == 0: t.data = s.detach().to(torch.bfloat16)
            else: t.copy_(s)
def acc(*a, **k):
    s = held.get("sampler")
    if s is not None and s is not held["model"]:
        for p in s.parameters(): p.data = torch.empty(0, dtype=p.dtype)
    return real_acc(*a, **k)
engine.make_sampling_model, engine.refresh_sampling_model, gm.accumulate_gradients = make, refresh, acc
sys.argv = ["benchmarks/memory.py"] + sys.argv[1:]
import runpy
runpy.run_path("/work/main/benchmarks/memory.py", run_name="__main__")
