"""gfpo.py: masks, advantages, the normaliser and the skip, adaptive k, ELR, and a 2-step smoke run."""

import json

import pytest
import torch

import gfpo
import grpo_mini as g
from conftest import TINY_RUN_FLAGS, run_script


def test_retain_mask_docstring_examples_and_ties():
    assert gfpo.retain_mask(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), [2]).tolist() == [[1, 0, 1, 0]]
    assert gfpo.retain_mask(torch.tensor([[5.0, 5.0, 5.0]]), [2]).tolist() == [[1, 1, 0]]  # earlier wins ties
    assert gfpo.retain_mask(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), [1, 2]).tolist() == [[0, 1], [1, 1]]


def test_shortest_metric_keeps_the_shortest():
    rewards, lengths = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([30.0, 10.0, 5.0, 10.0])
    scores = gfpo.shortest(rewards, lengths, [""] * 4)
    assert gfpo.retain_mask(scores.unsqueeze(0), [2]).tolist() == [[0, 1, 1, 0]]  # 5 and the first 10 (tie)


def test_token_efficiency_metric_keeps_correct_and_short():
    rewards, lengths = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([30.0, 10.0, 5.0, 20.0])
    scores = gfpo.token_efficiency(rewards, lengths, [""] * 4)
    assert scores.tolist() == pytest.approx([1 / 30, 0.1, 0.0, 0.05])
    assert gfpo.retain_mask(scores.unsqueeze(0), [2]).tolist() == [[0, 1, 0, 1]]


def test_filtered_advantages_docstring_example():
    adv = gfpo.filtered_advantages(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # mean_S = 2/3, population std_S = sqrt(2/9) = 0.4714
    assert adv.tolist() == pytest.approx([(1 / 3) / 0.4715, (-2 / 3) / 0.4715, (1 / 3) / 0.4715, 0.0], abs=1e-3)
    assert adv.tolist() == pytest.approx([0.7070, -1.4140, 0.7070, 0.0], abs=1e-3)


def test_zero_variance_retained_set_gets_zero_advantage():
    adv = gfpo.filtered_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_difficulty_record_docstring_example_adds_first_then_buckets():
    record = gfpo.DifficultyRecord([8, 8, 6, 4], warmup_steps=0)
    assert record.step_ks([0.0, 0.25, 0.5, 0.75, 1.0]) == [8, 8, 6, 4, 4]
    # adding first matters: a lone first prompt is its own whole record (all quartiles equal it), so it is "easy";
    # bucketing before adding would have had no record to read at all
    assert gfpo.DifficultyRecord([8, 8, 6, 4], warmup_steps=0).step_ks([0.3]) == [4]


def test_difficulty_warmup_counts_steps():
    record = gfpo.DifficultyRecord([9, 7, 5, 3], warmup_steps=2)
    assert record.step_ks([0.0, 1.0]) == [9, 9]  # step 1: warm-up
    assert record.step_ks([0.25, 0.75]) == [9, 9]  # step 2: warm-up, however many prompts were recorded
    # step 3: record [0, 1, .25, .75, .5, .1] -> q25 0.1375, q50 0.375, q75 0.6875
    assert record.step_ks([0.5, 0.1]) == [5, 9]
    assert [record.bucket_k(d) for d in (0.1, 0.3, 0.6, 0.8)] == [9, 7, 5, 3]


def test_adaptive_defaults_to_the_shortest_metric():
    assert gfpo.metric_name(gfpo.GFPOConfig()) == "token_efficiency"
    assert gfpo.metric_name(gfpo.GFPOConfig(adaptive=True)) == "shortest"
    assert gfpo.metric_name(gfpo.GFPOConfig(adaptive=True, filter_metric="token_efficiency")) == "token_efficiency"


def test_excess_length_reduction():
    assert gfpo.excess_length_reduction(1000, 700, 600) == pytest.approx(0.75)
    assert gfpo.excess_length_reduction(1000, 1100, 600) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="undefined"):
        gfpo.excess_length_reduction(600, 500, 600)


def test_normaliser_counts_every_sampled_token_and_the_skip_is_exact(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = gfpo.GFPOConfig(num_generations=6, num_remains_in_group=3, max_completion_length=10, device="cpu",
                          max_tokens_per_micro_batch=10**6, dtype="fp32")  # exactness: bf16 rounding varies with shape
    problems = g.make_arithmetic_split(0, 2, 1)[0]
    ro = g.rollout(tiny_model, tiny_tokenizer, problems, cfg, torch.device("cpu"))
    ro.rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    adv, metrics = gfpo.gfpo_advantage_fn(cfg)(ro)
    kept = torch.count_nonzero(adv).item()
    rows = g.rows_to_train(adv, cfg)
    assert len(rows) == kept < 12 and metrics["k"] == 3

    def grads(rows_used):
        tiny_model.zero_grad(set_to_none=True)
        stats = g.accumulate_gradients(tiny_model, ro, adv, rows_used, None, None, cfg, torch.device("cpu"))
        return stats, [p.grad.clone() for p in tiny_model.parameters()]

    full_stats, full = grads(list(range(12)))
    skip_stats, skipped = grads(rows)
    assert full_stats["loss"] == pytest.approx(skip_stats["loss"], abs=1e-7)
    for a, b in zip(full, skipped):
        assert torch.allclose(a, b, atol=1e-7)
    # The loss value by hand: with ratio 1 the dapo loss is -sum_i A_i |o_i| / (tokens of ALL 12 completions).
    lengths = ro.lengths
    assert skip_stats["loss"] == pytest.approx(-(adv * lengths).sum().item() / lengths.sum().item(), abs=1e-6)
    assert skip_stats["tokens_trained"] == lengths[rows].sum().item() < lengths.sum().item()


def my_metric(rewards, lengths, completions):
    return -torch.tensor([float(len(c)) for c in completions])


@pytest.mark.parametrize("flags, message", [
    (["--num_remains_in_group", "16"], "--num_remains_in_group must be at least 2 and below --num_generations"),
    (["--num_remains_in_group", "1"], "--num_remains_in_group must be at least 2"),
    (["--filter_metric", "longest"], "--filter_metric must be one of"),
    (["--filter_metric", "no_such_module:f"], "--filter_metric must be one of"),
    (["--adaptive", "--k_easy", "1"], "--k_easy must be at least 2"),
    (["--loss_type", "grpo"], "--loss_type must be dapo"),
])
def test_bad_flags_fail_before_any_model_loads(flags, message):
    result = run_script("gfpo.py", *flags, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_user_metric_resolves():
    assert gfpo.resolve_metric("tests.test_gfpo:my_metric") is my_metric or callable(
        gfpo.resolve_metric("tests.test_gfpo:my_metric"))


@pytest.mark.parametrize("extra", [["--filter_metric", "shortest"], ["--adaptive", "--adaptive_warmup_steps", "1"]])
def test_gfpo_smoke_two_steps(tiny_model_dir, tmp_path, extra):
    out = tmp_path / "gfpo"
    result = run_script("gfpo.py", "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS,
                        "--num_generations", "6", "--num_remains_in_group", "3", "--k_very_hard", "3", "--k_hard", "3",
                        "--k_medium", "2", "--k_easy", "2", "--no-save_model", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"len_sampled"' in l]
    assert len(steps) == 2
    for r in steps:
        assert r["len_retained"] <= r["len_sampled"] or extra[0] == "--adaptive"
        assert r["tokens_trained"] <= r["tokens_sampled"]
        assert 2 <= r["k"] <= 3
