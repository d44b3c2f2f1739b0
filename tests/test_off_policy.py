"""What was really sampled, and which tokens learn (issue 24): the sampler-trainer mismatch, its correction, token
entropy, the high-entropy mask, DAPO's truncation mask, delta, cispo and sapo inside the training step. Their maths
against TRL's own numbers is in test_trl_reference.py."""

import json
import math
from pathlib import Path

import pytest
import torch

import engine
import grpo_mini as g
import tree_grpo
from test_training import TINY, char_code_reward

CPU = torch.device("cpu")


def _rollout(model, tokenizer, **overrides):
    torch.manual_seed(0)
    cfg = g.Config(**{**TINY, "num_generations": 4, "max_completion_length": 10, **overrides})
    ro = g.rollout(model, tokenizer, g.make_arithmetic_split(0, 3, 1)[0], cfg, CPU)
    ro.rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0, 0.1, 0.9, 0.9, 0.3])  # group 1: zero std
    return ro, cfg


def _step_gradient(model, ro, cfg):
    model.zero_grad(set_to_none=True)
    advantages = g.group_advantages(ro.rewards, ro.num_generations)
    stats = g.accumulate_gradients(model, ro, advantages, g.rows_to_train(advantages, cfg), None, None, cfg, CPU)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return stats, grads


# ---------------------------------------------------------------------------------------------- entropy
def test_token_logprobs_entropy_docstring_example():
    logp, entropy = engine.chunked_token_logps(torch.tensor([[0.0, math.log(3)]]), torch.tensor([1]), 1.0, True)
    assert logp.item() == pytest.approx(math.log(0.75)) and entropy.item() == pytest.approx(0.5623, abs=1e-4)


def test_entropy_fast_equals_plain_equals_textbook_and_leaves_the_gradient_alone(tiny_model, tiny_tokenizer):
    ro, _ = _rollout(tiny_model, tiny_tokenizer)
    prompt_ids, prompt_mask, completion_ids, mask, prompt_index, _ = g.micro_batch_tensors(ro, list(range(12)))
    args = (tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 0.7, prompt_index)
    full_ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)
    attention = torch.cat([prompt_mask[prompt_index], mask.long()], dim=1)
    with torch.no_grad():
        logits = tiny_model(input_ids=full_ids, attention_mask=attention,
                            position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits[:, -mask.size(1) - 1:-1]
    textbook = torch.special.entr(torch.softmax(logits / 0.7, -1)).sum(-1)  # [n, T]
    for fn in (engine.shared_prompt_logps, g.completion_logps):
        tiny_model.zero_grad(set_to_none=True)
        logps, entropies = fn(*args, with_entropy=True)
        assert not entropies.requires_grad
        assert torch.allclose(entropies * mask, textbook * mask, atol=1e-5)
        (logps * mask).sum().backward()
        with_entropy = [p.grad.clone() for p in tiny_model.parameters()]
        tiny_model.zero_grad(set_to_none=True)
        (fn(*args) * mask).sum().backward()
        for a, b in zip(with_entropy, [p.grad for p in tiny_model.parameters()]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    tiny_model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- the loss variants
def test_cispo_and_sapo_docstring_examples():
    logp = torch.full((1, 2), math.log(0.5), requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(1.5), 0.0]])  # rho = [1.5, 1.0]
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    loss, stats = g.policy_loss(logp, old, None, adv, mask, loss_type="cispo", epsilon_high=1.2)
    assert loss.item() == pytest.approx((1.2 + 1.0) * math.log(2) / 2, abs=1e-4)  # 0.7625
    assert stats["clip_high"] == 0.5  # the capped token
    ratio = torch.ones(1, 2, requires_grad=True)  # sapo at rho = 1: l = -2A, d l / d rho = -A
    loss, _ = g.policy_loss(torch.log(ratio), torch.zeros(1, 2), None, adv, mask, loss_type="sapo")
    loss.backward()
    assert loss.item() == pytest.approx(-2.0) and torch.allclose(ratio.grad, torch.tensor([[-0.5, -0.5]]))


@pytest.mark.parametrize("field, value", [("loss_type", "cispo"), ("delta", 0.9), ("top_entropy_quantile", 1.5),
                                          ("importance_sampling_mode", "tok"), ("importance_sampling_clip_min", 5.0),
                                          ("sapo_temperature_pos", 0.0)])
def test_new_flags_bad_values_name_the_flag(field, value):
    flag = "epsilon_high" if field == "loss_type" else field  # cispo's cap is epsilon_high, which must be set
    with pytest.raises(g.ConfigError, match=f"--{flag} "):
        g.Config(**{field: value}).validate()


def test_both_importance_bounds_none_is_refused():
    with pytest.raises(g.ConfigError, match="--importance_sampling_clip_min "):
        g.Config(importance_sampling_clip_max=None).validate()


def test_tree_grpo_refuses_the_correction_in_one_line():
    with pytest.raises(g.ConfigError, match="--importance_sampling_correction"):
        tree_grpo.TreeConfig(importance_sampling_correction=True).validate()


# ---------------------------------------------------------------------------------------------- inside the step
def test_mismatch_is_measured_and_the_correction_weights_the_gradient(tiny_model, tiny_tokenizer):
    ro, cfg = _rollout(tiny_model, tiny_tokenizer)
    off, grads_off = _step_gradient(tiny_model, ro, cfg)
    # fp32: the sampler is the policy, so the mismatch is rounding only
    assert off["is_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and 0 <= off["sampler_kl"] < 1e-6
    assert off["entropy"] > 0
    on_cfg = g.Config(**{**vars(cfg), "importance_sampling_correction": True})
    _, grads_on = _step_gradient(tiny_model, ro, on_cfg)
    for a, b in zip(grads_off, grads_on):  # weights of exp(rounding) = 1: the same gradient
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)
    ro.sampling_logps = ro.sampling_logps - 2.0 * ro.completion_mask  # the sampler now looks e^2 less likely per token
    measured, grads_masked = _step_gradient(tiny_model, ro, on_cfg)
    assert measured["is_ratio_min"] > 7 and measured["sampler_kl"] > 1  # e^2 = 7.4 on every token
    assert all(torch.count_nonzero(grad) == 0 for grad in grads_masked)  # sequence_mask: every ratio > 3, all dropped


def test_mask_truncated_completions_trains_only_finished_rows(tiny_model, tiny_tokenizer):
    ro, cfg = _rollout(tiny_model, tiny_tokenizer)
    ro.truncated = torch.tensor([True, False, True, False] * 3)
    cfg = g.Config(**{**vars(cfg), "mask_truncated_completions": True})
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    _, stats, _, _ = g.grpo_step(tiny_model, None, tiny_tokenizer, optimizer, scheduler, [], cfg, CPU, None,
                                 g.grpo_advantage_fn(cfg), rollout_fn=lambda *args: (ro, {}))
    advantages = g.group_advantages(ro.rewards, 4)
    finished = [r for r in range(12) if not ro.truncated[r] and advantages[r] != 0]
    assert stats["tokens_trained"] == ro.completion_mask[finished].sum().item()


def test_step_gives_the_sampling_copy_back_whole_however_the_training_phase_ends(tiny_model, tiny_tokenizer,
                                                                                  monkeypatch):
    """grpo_step releases the bf16 copy's weights while the policy trains, and makes them again after the update, or
    after an error: the next rollout samples from the policy's current weights."""
    ro, cfg = _rollout(tiny_model, tiny_tokenizer)
    sampler = g.make_sampling_model(tiny_model, torch.bfloat16)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = lambda: g.grpo_step(tiny_model, None, tiny_tokenizer, optimizer, scheduler, [], cfg, CPU, None,  # noqa
                               g.grpo_advantage_fn(cfg), sampler=sampler, rollout_fn=lambda *args: (ro, {}))
    released = []
    real_accumulate = g.accumulate_gradients
    monkeypatch.setattr(g, "accumulate_gradients", lambda *a, **k: (released.append(all(
        p.numel() == 0 for p in sampler.parameters())), real_accumulate(*a, **k))[1])
    before = [p.detach().clone() for p in tiny_model.parameters()]
    _, stats, _, _ = step()
    assert released == [True] and stats is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))  # the policy moved
    for mine, source in zip(sampler.parameters(), tiny_model.parameters()):
        assert torch.equal(mine, source.detach().to(torch.bfloat16))  # and the copy with it
    monkeypatch.setattr(g, "accumulate_gradients", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        step()
    for mine, source in zip(sampler.parameters(), tiny_model.parameters()):
        assert torch.equal(mine, source.detach().to(torch.bfloat16))


def test_top_entropy_quantile_trains_every_row_for_its_quantile():
    assert g.rows_to_train(torch.tensor([0.0, 1.0, 0.0]), g.Config(top_entropy_quantile=0.2)) == [0, 1, 2]


@pytest.mark.parametrize("extra", [dict(loss_type="cispo", epsilon_high=5.0), dict(loss_type="sapo"),
                                   dict(delta=1.5, top_entropy_quantile=0.5, mask_truncated_completions=True,
                                        importance_sampling_correction=True, importance_sampling_mode="token_mask")])
def test_every_new_option_trains_and_logs_its_keys(tiny_model, tiny_tokenizer, tmp_path, extra):
    cfg = g.Config(**{**TINY, "output_dir": str(tmp_path / "run"), "dtype": "bf16", "max_completion_length": 6,
                      **extra})
    g.train(cfg, reward_fn=char_code_reward, model=tiny_model, tokenizer=tiny_tokenizer,
            problems=g.make_arithmetic_split(0, 20, 4))
    steps = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
             if '"reward"' in line]
    for key in ("entropy", "is_ratio_mean", "is_ratio_min", "is_ratio_max", "sampler_kl"):
        assert key in steps[0], key
    trained = [s for s in steps if s["tokens_trained"]]
    assert trained, "no step trained"
    for record in trained:  # bf16 sampler, fp32 policy: a real mismatch, measured
        assert record["is_ratio_min"] <= record["is_ratio_mean"] <= record["is_ratio_max"]
        assert record["sampler_kl"] >= 0 and record["entropy"] > 0
