"""The paired protocol of benchmarks/compare.py and tree_compare.py (../shared/EXPERIMENTS.md): the statistics'
worked examples, the controls (seed_shuffled, SEED-GRPO at the released strength, the mixed-tree share), and a
two-seed comparison end to end on the tiny model."""

import importlib.util
import json
import math
import os

import pytest
import torch

import seed_grpo
import tree_grpo

pytest.importorskip("scipy")
from benchmarks.paired import mean_ci, paired, verdict  # noqa: E402
from conftest import run_script  # noqa: E402


def test_mean_ci_worked_example():
    ci = mean_ci([0.5, 0.6, 0.7])
    assert math.isclose(ci["mean"], 0.6) and math.isclose(ci["low"], 0.352, abs_tol=1e-3)
    assert math.isclose(ci["high"], 0.848, abs_tol=1e-3) and ci["n"] == 3
    assert mean_ci([0.4])["low"] is None and mean_ci([None])["n"] == 0


def test_paired_wilcoxon_worked_example_and_ties():
    result = paired([0.6, 0.7, 0.8, 0.9, 0.7, 0.6, 0.8, 0.9], [0.5] * 8)
    assert math.isclose(result["p"], 2 / 256) and result["low"] > 0  # every seed higher: the smallest p of 8 pairs
    assert paired([0.5, 0.6], [0.5, 0.6])["p"] == 1.0  # nothing to rank
    assert paired([0.7, None, 0.9], [0.5, 0.5, None])["n"] == 1  # only the seeds where both ran


def test_verdict_is_the_decision_rule():
    assert verdict({"low": 0.01, "high": 0.09}, "grpo_2g", "grpo") == "grpo_2g beats grpo"
    assert verdict({"low": -0.09, "high": -0.01}, "a", "b") == "a trails b"
    assert verdict({"low": -0.02, "high": 0.05}, "a", "b") == "a is not significantly different from b"


def test_seed_shuffled_permutes_the_factors_docstring_example():
    rewards, entropy = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, math.log(2)])
    kwargs = dict(modulation="inverse", alpha=1.0, scale_rewards="none")
    plain, factors = seed_grpo.seed_advantages(rewards, entropy, 2, **kwargs)
    shuffled, shuffled_factors = seed_grpo.seed_advantages(rewards, entropy, 2, permutation=torch.tensor([1, 0]),
                                                           **kwargs)
    assert torch.allclose(plain, torch.tensor([0.5, -0.5, 0.25, -0.25]))
    assert torch.allclose(shuffled, torch.tensor([0.25, -0.25, 0.5, -0.5]))
    assert sorted(factors.tolist()) == sorted(shuffled_factors.tolist())  # the same factors, reassigned


def test_seed_shuffled_keeps_its_permutations_across_a_checkpoint():
    cfg = seed_grpo.SeedConfig(shuffle_factors=True, seed=3)
    first, second = seed_grpo.seed_advantage_fn(cfg), seed_grpo.seed_advantage_fn(cfg)
    state = first.state_dict()
    second.load_state_dict(state)
    draws = [torch.randperm(8, generator=torch.Generator().set_state(state["shuffler"])) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_mixed_tree_share_docstring_example():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    share = tree_grpo.mixed_tree_share(rewards, torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert share == 0.5


def test_compare_paired_preset_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "paired"
    settings = ["max_steps=2", "prompts_per_step=2", "num_generations=2", "max_completion_length=8",
                "num_eval_problems=4", "num_train_problems=20", "device=cpu", "eval_every=1"]
    result = run_script("benchmarks/compare.py", "--preset", "paired", "--output_dir", out, "--seeds", "0", "1",
                        "--methods", "grpo", "seed_grpo", "seed_shuffled", "--set", f"model={tiny_model_dir}",
                        *settings, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["lr_scheduler_type"] == "linear"  # today's default, not the recorded constant
    assert set(summary["paired"]) == {"seed_grpo vs grpo", "seed_shuffled vs grpo", "seed_grpo vs seed_shuffled"}
    assert summary["paired"]["seed_grpo vs seed_shuffled"]["acc_after"]["n"] == 2
    assert "min of CPU time over the 6 runs" in summary["cost"]
    cost = json.loads((out / "grpo_seed0" / "cost.json").read_text())  # the allocator, where one was preloaded
    assert cost["ld_preload"] == os.environ.get("LD_PRELOAD") and cost["cpu_s"] > 0
    assert json.loads((out / "seed_shuffled_seed1" / "config.json").read_text())["shuffle_factors"] is True
    text = (out / "results.md").read_text()
    assert "| seed_grpo vs seed_shuffled | 2 |" in text and "Wilcoxon" in text
    assert "Answer styles" not in text  # the cold-start style table belongs to the cold-start presets only
    if importlib.util.find_spec("matplotlib"):  # SEED-GRPO's own picture: against GRPO and against its control
        assert (out / "paired.png").is_file() and (out / "paired_seed_grpo.png").is_file()
    # a third seed later, keeping the six finished runs: --reuse with --overwrite (the results exist)
    again = run_script("benchmarks/compare.py", "--preset", "paired", "--output_dir", out, "--seeds", "0", "1",
                       "--methods", "grpo", "seed_grpo", "seed_shuffled", "--set", f"model={tiny_model_dir}",
                       *settings, "--reuse", "--overwrite", timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") == 6, again.stderr[-2000:]


def test_paired_tables_print_shares_to_three_decimals_and_lengths_to_one():
    from benchmarks.paired import paired_tables

    values = {"tree_grpo": {"success_after": [0.5, 0.6, 0.7], "len_after": [20.0, 21.0, 22.0]},
              "chains": {"success_after": [0.4, 0.5, 0.5], "len_after": [20.0, 20.0, 20.0]}}
    text, _ = paired_tables(values, [("tree_grpo", "chains")], [("success_after", "success"), ("len_after", "len")])
    assert "| tree_grpo | 3 | 0.600 [0.352, 0.848] | 21.0 [18.5, 23.5] |" in text  # success: 3 decimals (was 1)
    assert "| tree_grpo vs chains | 3 | 0.133 [-0.010, 0.277], p = 0.250 | 1.0 [-1.5, 3.5], p = 0.500 |" in text
