"""engine.sample_completions, and the same loop that drops finished rows from the batch (and the KV cache) once a
quarter of the batch has finished: the same tokens and log-probs bit for bit? How much faster? Quickstart shapes."""
import sys, time, torch
sys.path.insert(0, "/work/main")
import engine, grpo_mini as g, tasks
from transformers import StaticCache
from engine import (cache_keyword, expand_cache_rows, inverse_cdf_sample, last_position_only)

@torch.no_grad()
def compact_sample(model, prompt_ids, prompt_mask, *, repeats, max_new_tokens, eos_ids, pad_id, temperature=1.0,
                   greedy=False, min_new_tokens=0):
    U, P = prompt_ids.shape
    device = prompt_ids.device
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    attention = torch.zeros(U, P + max_new_tokens, dtype=prompt_mask.dtype, device=device)
    attention[:, :P] = prompt_mask
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, **{cache_keyword(): cache},
                use_cache=True, logits_to_keep=last_position_only(prompt_ids))
    index = torch.arange(U, device=device).repeat_interleave(repeats)
    expand_cache_rows(cache, index)
    logits, attention = out.logits[index, -1], attention[index]
    next_position = positions[index, -1:] + 1
    N = index.numel()
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(N, max_new_tokens, device=device)
    live = torch.arange(N, device=device)  # the rows still in the batch (and the cache), as rows of the result
    done = torch.zeros(N, dtype=torch.bool, device=device)  # [A]: finished, of the rows in the batch
    eos = torch.tensor(list(eos_ids), device=device)
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits.float() / temperature  # [A, V]
        if t < min_new_tokens:
            scaled[:, eos] = -float("inf")
        log_z = torch.logsumexp(scaled, dim=-1)
        if greedy:
            token = scaled.argmax(dim=-1)
        else:
            uniform = torch.rand(N, device=device)[live]  # every row's number drawn, as before: the same stream
            token = inverse_cdf_sample(torch.exp(scaled - log_z.unsqueeze(1)), uniform)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens[live, t] = token
        logps[live, t] = torch.where(done, 0.0, scaled.gather(1, token.unsqueeze(1)).squeeze(1) - log_z)
        done |= torch.isin(token, eos)
        steps = t + 1
        if done.all() or steps == max_new_tokens:
            break
        attention[:, P + t] = 1
        if int(done.sum()) * 4 >= done.numel():  # a quarter of the batch finished: drop them, and their cache rows
            keep = torch.nonzero(~done).squeeze(1)
            expand_cache_rows(cache, keep)
            live, token, attention, next_position, done = (x[keep] for x in (live, token, attention, next_position, done))
        logits = model(input_ids=token.unsqueeze(1), attention_mask=attention, position_ids=next_position,
                       **{cache_keyword(): cache}, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return tokens[:, :steps], logps[:, :steps]


if __name__ == "__main__":
    engine.bound_kernel_caches(); engine.keep_freed_memory()
    model, tok = engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)
    own = engine.use_training_attention(model, "auto", torch.device("cpu"), torch.bfloat16)
    sampler = engine.make_sampling_model(model, torch.bfloat16, own)
    cfg = g.Config(); train, held = tasks.build_task(cfg)
    eos = engine.eos_token_ids(model, tok)
    for batch in range(3):
        ids, mask = tasks.encode_prompts(tok, train[8 * batch:8 * batch + 8], torch.device("cpu"))
        kw = dict(repeats=8, max_new_tokens=48, eos_ids=eos, pad_id=tok.pad_token_id, temperature=1.0)
        res = {}
        for fn in (engine.sample_completions, compact_sample, engine.sample_completions, compact_sample):
            torch.manual_seed(batch)
            t = time.perf_counter(); res[fn.__name__] = fn(sampler, ids, mask, **kw)
            print(f"batch {batch} {fn.__name__:18s} {time.perf_counter()-t:.2f} s", flush=True)
        a, b = res["sample_completions"], res["compact_sample"]
        lengths = (a[0] != tok.pad_token_id).sum(1).float()
        print(f"  tokens equal {torch.equal(a[0], b[0])}, logps equal {torch.equal(a[1], b[1])}; steps {a[0].shape[1]}, "
              f"mean length {lengths.mean():.1f}")
    ids, mask = tasks.encode_prompts(tok, held[:64], torch.device("cpu"))
    res = {}
    for fn in (engine.sample_completions, compact_sample):
        t = time.perf_counter()
        res[fn.__name__] = fn(sampler, ids, mask, repeats=1, max_new_tokens=48, eos_ids=eos, pad_id=tok.pad_token_id, greedy=True)
        print(f"greedy eval, 64 prompts, {fn.__name__:18s} {time.perf_counter()-t:.2f} s")
    a, b = res["sample_completions"], res["compact_sample"]
    print(f"  greedy tokens equal {torch.equal(a[0], b[0])}, logps equal {torch.equal(a[1], b[1])}")
