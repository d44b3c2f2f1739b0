"""The fast sampler (engine.py) against the plain one (grpo_mini.generate_completions) and bf16 precision, on the
tiny random model.

The fast sampler must be a faster `model.generate`, nothing else: same greedy tokens, its own first token per row,
and log-probs equal to a recomputed forward. The plain sampler is held to the same standard."""

import copy
from pathlib import Path

import pytest
import torch

import engine
import grpo_mini as g

CPU = torch.device("cpu")


def _prompts(tokenizer, n=2):
    problems = g.make_arithmetic_split(0, n, 1)[0]
    tokenizer.padding_side = "left"
    enc = tokenizer([g.format_prompt(tokenizer, p.prompt) for p in problems], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return problems, enc.input_ids, enc.attention_mask


def test_inverse_cdf_sample_worked_example():
    probs = torch.tensor([[0.1, 0.6, 0.3]] * 3)
    assert g.inverse_cdf_sample(probs, torch.tensor([0.05, 0.5, 0.95])).tolist() == [0, 1, 2]
    # a zero-probability token is never drawn, even at the edges of [0, 1)
    zero_middle = torch.tensor([[0.5, 0.0, 0.5]] * 3)
    assert 1 not in g.inverse_cdf_sample(zero_middle, torch.tensor([0.0, 0.5, 0.999999])).tolist()


def test_inverse_cdf_sample_matches_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.6, 0.3]]).expand(200_000, 3)
    counts = torch.bincount(g.inverse_cdf_sample(probs, torch.rand(200_000)), minlength=3) / 200_000
    assert torch.allclose(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.005)


@pytest.mark.parametrize("sampler", [engine.sample_completions, g.generate_completions])
def test_greedy_sampling_equals_model_generate(tiny_model, tiny_tokenizer, sampler):
    tiny_model.eval()
    _, ids, mask = _prompts(tiny_tokenizer, 3)
    eos = g.eos_token_ids(tiny_model, tiny_tokenizer)
    ours, _ = sampler(tiny_model, ids, mask, repeats=1, max_new_tokens=12, eos_ids=eos,
                      pad_id=tiny_tokenizer.pad_token_id, greedy=True)
    theirs = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=eos)[:, ids.size(1):]
    assert torch.equal(ours, theirs)


def test_fast_and_plain_samplers_give_the_same_greedy_log_probs(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    _, ids, mask = _prompts(tiny_tokenizer, 3)
    kwargs = dict(repeats=2, max_new_tokens=9, eos_ids=g.eos_token_ids(tiny_model, tiny_tokenizer),
                  pad_id=tiny_tokenizer.pad_token_id, temperature=0.7, greedy=True)
    fast_ids, fast_logps = engine.sample_completions(tiny_model, ids, mask, **kwargs)
    plain_ids, plain_logps = g.generate_completions(tiny_model, ids, mask, **kwargs)
    assert torch.equal(fast_ids, plain_ids) and fast_ids.size(0) == 6
    assert torch.allclose(fast_logps, plain_logps, atol=1e-5)


def test_last_position_only_gives_the_last_logits_from_a_contiguous_hidden_state(tiny_model, tiny_tokenizer):
    # logits_to_keep=1 hands lm_head a strided view, which on a bf16 CPU costs a weight-sized copy per row
    # (see last_position_only); our tensor of positions must hand it a contiguous one, with the same logits.
    model = g.make_sampling_model(tiny_model, torch.bfloat16)
    _, ids, mask = _prompts(tiny_tokenizer, 3)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, logits_to_keep=g.last_position_only(ids)).logits
        full = model(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (3, 1, full.size(-1))
    assert torch.equal(ours[:, 0], full[:, -1])
    assert seen[0] is True


def test_every_row_draws_its_own_first_token(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    _, ids, mask = _prompts(tiny_tokenizer, 1)
    tokens, _ = g.sample_completions(tiny_model, ids, mask, repeats=8, max_new_tokens=3,
                                     eos_ids=g.eos_token_ids(tiny_model, tiny_tokenizer),
                                     pad_id=tiny_tokenizer.pad_token_id, temperature=1.0)
    assert tokens.shape[0] == 8
    assert len(set(tokens[:, 0].tolist())) > 1  # a shared first token would be the known pitfall


@pytest.mark.parametrize("engine_name", ["fast", "plain"])
def test_sampler_logps_equal_a_recomputed_forward(tiny_model, tiny_tokenizer, engine_name):
    torch.manual_seed(0)
    cfg = g.Config(num_generations=4, max_completion_length=10, temperature=0.7, dtype="fp32", engine=engine_name)
    problems, _, _ = _prompts(tiny_tokenizer, 2)
    ro = g.rollout(tiny_model, tiny_tokenizer, problems, cfg, CPU)
    recomputed = g.compute_logps_for_rows(tiny_model, ro, list(range(8)), cfg, CPU, g.logps_fn(cfg))
    mask = ro.completion_mask
    assert mask.sum() > 8  # the samples are more than their first tokens
    assert torch.allclose(ro.sampling_logps * mask, recomputed * mask, atol=1e-5)


def test_bf16_sampling_copy_is_refreshed_and_keeps_fp32_buffers(tiny_model):
    sampler = g.make_sampling_model(tiny_model, torch.bfloat16)
    assert sampler is not tiny_model
    assert all(p.dtype == torch.bfloat16 for p in sampler.parameters())
    assert all(b.dtype == torch.float32 for b in sampler.buffers() if b.is_floating_point())
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    g.refresh_sampling_model(sampler, tiny_model)
    for mine, source in zip(sampler.parameters(), tiny_model.parameters()):
        assert torch.equal(mine, source.to(torch.bfloat16))
    assert g.make_sampling_model(tiny_model, torch.float32) is tiny_model  # fp32: no copy


def test_released_sampling_copy_is_made_again_with_the_same_values(tiny_model):
    """grpo_step releases the bf16 copy's weights for the training phase; the refresh after it gives the values that
    an in-place refresh gives, bit for bit, with the tied weights still one tensor."""
    sampler, kept = g.make_sampling_model(tiny_model, torch.bfloat16), g.make_sampling_model(tiny_model, torch.bfloat16)
    engine.release_sampling_model(sampler, tiny_model)
    assert all(p.numel() == 0 and p.dtype == torch.bfloat16 for p in sampler.parameters())
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(1.001)
    g.refresh_sampling_model(sampler, tiny_model)
    g.refresh_sampling_model(kept, tiny_model)
    for mine, theirs in zip(sampler.parameters(), kept.parameters()):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs)
    assert sampler.get_input_embeddings().weight is sampler.get_output_embeddings().weight  # still tied
    engine.release_sampling_model(tiny_model, tiny_model)  # fp32: the policy samples itself, and keeps its weights
    engine.release_sampling_model(None, tiny_model)
    assert all(p.numel() > 0 for p in tiny_model.parameters())


def test_dtype_choice():
    assert g.pick_dtype("fp32", torch.device("cuda")) == torch.float32
    assert g.pick_dtype("bf16", CPU) == torch.bfloat16
    assert g.pick_dtype("auto", CPU) == (torch.bfloat16 if g.cpu_has_fast_bf16() else torch.float32)
    with pytest.raises(g.ConfigError, match="--dtype "):
        g.Config(dtype="fp16").validate()


def test_bf16_step_moves_the_weights_like_an_fp32_step(tiny_tokenizer):
    """One optimiser step under bf16 autocast and one in fp32, from the same weights on the same rollout: the two
    updates point the same way (cosine close to 1). The master weights stay fp32 in both."""
    from conftest import build_tiny_model

    torch.manual_seed(0)
    base = build_tiny_model(tiny_tokenizer)
    cfg = g.Config(num_generations=4, max_completion_length=10, dtype="fp32")
    ro = g.rollout(base, tiny_tokenizer, g.make_arithmetic_split(0, 2, 1)[0], cfg, CPU)
    ro.rewards = torch.arange(8, dtype=torch.float32) / 8  # dense: every row has an advantage
    advantages = g.group_advantages(ro.rewards, 4)
    updates = []
    for dtype in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        step_cfg = g.Config(**{**vars(cfg), "dtype": dtype})
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        g.accumulate_gradients(model, ro, advantages, list(range(8)), None, None, step_cfg, CPU)
        optimizer.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        updates.append(torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), base.parameters())]))
    cosine = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0).item()
    assert cosine > 0.99, cosine


def test_attention_choice_and_the_sampling_copy_keeps_its_kernel(tiny_model):
    """auto trains with eager attention only on a CPU computing in bf16 (where it was measured faster); the bf16
    sampling copy gets the kernel it is given, whatever the policy trains with."""
    assert g.pick_attention("auto", CPU, torch.bfloat16) == "eager"
    assert g.pick_attention("auto", CPU, torch.float32) is None  # fp32: the policy also samples; leave it alone
    assert g.pick_attention("auto", torch.device("cuda"), torch.bfloat16) is None
    assert g.pick_attention("sdpa", CPU, torch.bfloat16) == "sdpa"
    with pytest.raises(g.ConfigError, match="--attn_implementation "):
        g.Config(attn_implementation="flash").validate()
    policy = copy.deepcopy(tiny_model)
    own_kernel = g.use_training_attention(policy, "auto", CPU, torch.bfloat16)
    assert own_kernel == "sdpa" and policy.config._attn_implementation == "eager"
    sampler = g.make_sampling_model(policy, torch.bfloat16, own_kernel)
    assert policy.config._attn_implementation == "eager" and sampler.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_give_the_same_logps_and_gradients(tiny_model, tiny_tokenizer):
    """The attention kernel is a speed choice only: completion log-probs and their gradient agree (fp32)."""
    torch.manual_seed(0)
    cfg = g.Config(num_generations=3, max_completion_length=6, temperature=0.7, device="cpu", dtype="fp32")
    ro = g.rollout(tiny_model, tiny_tokenizer, g.make_arithmetic_split(0, 2, 1)[0], cfg, CPU)
    prompt_ids, prompt_mask, completion_ids, mask, prompt_index, _ = g.micro_batch_tensors(ro, list(range(6)))
    results = []
    for kernel in ("sdpa", "eager"):
        model = copy.deepcopy(tiny_model)
        model.set_attn_implementation(kernel)
        logps = g.completion_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7, prompt_index)
        (logps * mask).sum().backward()
        results.append((logps * mask, [p.grad for p in model.parameters()]))
    (sdpa_logps, sdpa_grads), (eager_logps, eager_grads) = results
    assert torch.allclose(sdpa_logps, eager_logps, atol=1e-5)
    for a, b in zip(sdpa_grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_takes_effect_and_allocations_still_work():
    assert g.keep_freed_memory() is True  # glibc accepted both settings
    big = torch.ones(64, 2**20)  # 256 MB, now from the heap instead of its own mapping
    assert big.sum().item() == 64 * 2**20


KERNEL_CACHE_PROBE = """
import sys
import torch
import engine
from benchmarks.memory import glibc_heap
engine.bound_kernel_caches(int(sys.argv[1]))
weight = torch.randn(1536, 576, requires_grad=True)
def matmul_of_rows(rows):  # one bf16 linear forward and backward, as in training: three kernel shapes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.linear(torch.randn(rows, 576, requires_grad=True), weight).float().sum().backward()
matmul_of_rows(1000)
before = glibc_heap()["in_use"]
for rows in range(1001, 1041):  # 40 new shapes, as a rollout's new lengths bring
    matmul_of_rows(rows)
print((glibc_heap()["in_use"] - before) / 2**20)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="mallinfo2 is glibc's")
def test_bounded_kernel_caches_stop_memory_growing_with_each_new_matmul_shape(tmp_path):
    """Each new matmul shape leaves a compiled kernel in memory; engine.bound_kernel_caches keeps a few of them, so
    the bytes in use stop growing (the default caches of 1024 kept growing through the Quickstart)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(KERNEL_CACHE_PROBE)
    env = {key: value for key, value in os.environ.items()
           if key not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY", "LD_PRELOAD")}  # glibc's malloc
    env["PYTHONPATH"] = str(Path(engine.__file__).parent)

    def growth_mib(capacity):
        out = subprocess.run([sys.executable, str(script), str(capacity)], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.split()[-1])

    bounded, unbounded = growth_mib(8), growth_mib(1024)
    assert unbounded > 20 and bounded < unbounded / 10, (bounded, unbounded)  # here: 3 MiB against 71 MiB


def test_bound_kernel_caches_leaves_a_users_setting_alone(monkeypatch):
    monkeypatch.setattr(engine.os, "environ", {"LRU_CACHE_CAPACITY": "64"})  # the user's, and no other
    assert engine.bound_kernel_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(engine.KERNEL_CACHE_CAPACITY),
                                            "LRU_CACHE_CAPACITY": "64"}
