"""Where a Quickstart rollout's seconds go: SmolLM2's bf16 sampling copy, 8 prompts x 8 completions x 48 tokens,
profiled op by op (torch.profiler), after one warm-up rollout. Usage: python decode_profile.py [--rows-only]"""
import sys, time, torch
sys.path.insert(0, "/work/main")
import engine, grpo_mini as g, tasks
from torch.profiler import profile, ProfilerActivity

engine.bound_kernel_caches(); engine.keep_freed_memory()
torch.manual_seed(0)
model, tok = engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)
own = engine.use_training_attention(model, "auto", torch.device("cpu"), torch.bfloat16)
sampler = engine.make_sampling_model(model, torch.bfloat16, own)
print("sampler attention:", sampler.config._attn_implementation)
cfg = g.Config()
train, _ = tasks.build_task(cfg)
problems = train[:8]
ids, mask = tasks.encode_prompts(tok, problems, torch.device("cpu"))
eos = engine.eos_token_ids(model, tok)
kw = dict(repeats=8, max_new_tokens=48, eos_ids=eos, pad_id=tok.pad_token_id, temperature=1.0, min_new_tokens=48)
for i in range(2):
    t = time.perf_counter(); out = engine.sample_completions(sampler, ids, mask, **kw); print(f"rollout {i}: {time.perf_counter()-t:.2f} s", out[0].shape)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t = time.perf_counter(); engine.sample_completions(sampler, ids, mask, **kw); print(f"profiled: {time.perf_counter()-t:.2f} s")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))
