"""A Quickstart rollout (8 prompts x 8 completions x 48 tokens, SmolLM2's bf16 sampling copy) with the sampling
copy's attention as sdpa and as eager, alternating; and whether the tokens agree."""
import sys, time, torch
sys.path.insert(0, "/work/main")
import engine, grpo_mini as g, tasks
engine.bound_kernel_caches(); engine.keep_freed_memory()
model, tok = engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)
own = engine.use_training_attention(model, "auto", torch.device("cpu"), torch.bfloat16)
sampler = engine.make_sampling_model(model, torch.bfloat16, own)
cfg = g.Config(); train, _ = tasks.build_task(cfg)
ids, mask = tasks.encode_prompts(tok, train[:8], torch.device("cpu"))
print("prompt shape", tuple(ids.shape))
eos = engine.eos_token_ids(model, tok)
kw = dict(repeats=8, max_new_tokens=48, eos_ids=eos, pad_id=tok.pad_token_id, temperature=1.0, min_new_tokens=48)
out = {}
for rnd in range(3):
    for attn in ("sdpa", "eager"):
        sampler.set_attn_implementation(attn)
        torch.manual_seed(1)
        t = time.perf_counter(); out[attn] = engine.sample_completions(sampler, ids, mask, **kw)
        print(f"round {rnd} {attn:6s} {time.perf_counter()-t:.2f} s", flush=True)
same = (out["sdpa"][0] == out["eager"][0]).float().mean().item()
print("tokens equal (fraction):", same, "max |logp diff|:", (out["sdpa"][1] - out["eager"][1]).abs().max().item())
greedy = {}
for attn in ("sdpa", "eager"):
    sampler.set_attn_implementation(attn)
    t = time.perf_counter(); greedy[attn] = engine.sample_completions(sampler, ids, mask, **{**kw, "repeats": 1, "min_new_tokens": 0}, greedy=True)
    print(f"greedy {attn} {time.perf_counter()-t:.2f} s")
print("greedy tokens equal:", torch.equal(greedy["sdpa"][0], greedy["eager"][0]))
