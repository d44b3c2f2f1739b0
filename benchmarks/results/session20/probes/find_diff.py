"""Where dropping finished rows changes the sampler's log-probs: engine.py at 3256fbf (every row to the end) against
2d38cb8 (rows dropped down to one) and 5b6db28 (never down to one row), with extra EOS ids so that rows finish early
and the batch shrinks to a few rows; the batch sizes each rollout went through, and the rows whose log-probs differ."""
import sys, subprocess, types, torch
sys.path.insert(0, "/work/main")
import engine, grpo_mini as g, tasks
def engine_at(commit):
    src = subprocess.run(["git", "-C", "/work/main", "show", f"{commit}:engine.py"], capture_output=True, text=True).stdout
    module = types.ModuleType(f"engine_{commit}"); module.__file__ = "/work/main/engine.py"
    exec(compile(src, f"engine_{commit}", "exec"), module.__dict__)
    return module
old = engine_at("3256fbf")
engine.bound_kernel_caches(); engine.keep_freed_memory()
model, tok = engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)
own = engine.use_training_attention(model, "auto", torch.device("cpu"), torch.bfloat16)
sampler = engine.make_sampling_model(model, torch.bfloat16, own)
cfg = g.Config(); train, _ = tasks.build_task(cfg)
eos = engine.eos_token_ids(model, tok)
extra = [tok.convert_tokens_to_ids(t) for t in (".", "Ġ=", ",")]
print("extra eos", extra)
sizes = []
for commit in ("2d38cb8", "5b6db28"):
  new = engine_at(commit)
  expand = new.expand_cache_rows
  new.expand_cache_rows = lambda c, i, expand=expand: (sizes.append(len(i)), expand(c, i))
  print(f"--- {commit} against 3256fbf")
  for b in range(8):
      ids, mask = tasks.encode_prompts(tok, train[8 * b:8 * b + 8], torch.device("cpu"))
      kw = dict(repeats=8, max_new_tokens=48, eos_ids=eos + extra, pad_id=tok.pad_token_id, temperature=1.0)
      torch.manual_seed(b); a = old.sample_completions(sampler, ids, mask, **kw)
      sizes.clear(); torch.manual_seed(b); n = new.sample_completions(sampler, ids, mask, **kw)
      if a[0].shape != n[0].shape:
          print(f"batch {b}: sizes {sizes}; different lengths {a[0].shape} {n[0].shape}"); continue
      rows = torch.nonzero((a[1] != n[1]).any(1)).flatten().tolist()
      print(f"batch {b}: sizes {sizes}; tokens equal {torch.equal(a[0], n[0])}; rows whose logps differ {rows}")
      for r in rows[:3]:
          cols = torch.nonzero(a[1][r] != n[1][r]).flatten().tolist()
          end = int((a[0][r] != tok.pad_token_id).sum())
          print(f"   row {r}: columns {cols}, length {end}, diffs {[(a[1][r, c] - n[1][r, c]).item() for c in cols][:4]}")
