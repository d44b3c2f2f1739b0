"""Where a Quickstart training pass's seconds go: shared_prompt_logps forward and backward under bf16 autocast,
eager attention, 8 prompts x 8 rows, completions of random length up to 48 (as a rollout gives), op by op."""
import sys, time, torch
sys.path.insert(0, "/work/main")
import engine, grpo_mini as g, tasks
from torch.profiler import profile, ProfilerActivity
engine.bound_kernel_caches(); engine.keep_freed_memory()
torch.manual_seed(0)
model, tok = engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)
engine.use_training_attention(model, "auto", torch.device("cpu"), torch.bfloat16)
print("training attention:", model.config._attn_implementation)
cfg = g.Config(); train, _ = tasks.build_task(cfg)
ids, mask = tasks.encode_prompts(tok, train[:8], torch.device("cpu"))
n, T = 64, 48
completion = torch.randint(100, 20000, (n, T))
lengths = torch.randint(20, T + 1, (n,))
cmask = (torch.arange(T)[None] < lengths[:, None]).long()
index = torch.arange(8).repeat_interleave(8)
def once():
    with engine.autocast(torch.device("cpu"), torch.bfloat16):
        lp = engine.shared_prompt_logps(model, ids, mask, completion, cmask, 1.0, prompt_index=index)
    (lp * cmask).sum().backward()
    model.zero_grad(set_to_none=False)
for i in range(2):
    t = time.perf_counter(); once(); print(f"pass {i}: {time.perf_counter()-t:.2f} s", flush=True)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t = time.perf_counter(); once(); print(f"profiled: {time.perf_counter()-t:.2f} s")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
