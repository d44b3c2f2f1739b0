"""seed_grpo.py: hand-computed modulated advantages, the entropy of special groups, and a 2-step smoke run."""

import json
import math

import pytest
import torch

import grpo_mini as g
import seed_grpo as sg
from conftest import TINY_RUN_FLAGS, run_script
from semantic_entropy import MathAnswerJudge

G = 8


def test_modulation_factor_docstring_example():
    half = torch.tensor([math.log(8) / 2])
    assert sg.modulation_factor(half, 8, "linear", 1.0).item() == pytest.approx(0.5)
    assert sg.modulation_factor(half, 8, "exp", 1.0).item() == pytest.approx(math.exp(-0.5))
    assert sg.modulation_factor(half, 8, "inverse", 1.0).item() == pytest.approx(2 / 3)
    for mode in ("linear", "exp", "inverse"):
        assert sg.modulation_factor(torch.tensor([0.0]), 8, mode, 1.0).item() == 1.0


@pytest.mark.parametrize("modulation, factor", [("inverse", 0.5), ("exp", math.exp(-1)), ("linear", 0.0)])
def test_seed_advantages_each_f_by_hand(modulation, factor):
    # G = 2; prompt 0 has SE = 0 (factor 1), prompt 1 has SE = log 2 = SE_max (x = alpha = 1).
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv, factors = sg.seed_advantages(rewards, torch.tensor([0.0, math.log(2)]), 2, modulation=modulation, alpha=1.0)
    assert factors.tolist() == pytest.approx([1.0, factor])
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.5 * factor, -0.5 * factor])  # Dr. GRPO base: r - mean


def test_seed_advantages_docstring_example_and_grpo_std_flag():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    entropy = torch.tensor([0.0, math.log(2)])
    adv, _ = sg.seed_advantages(rewards, entropy, 2, modulation="inverse", alpha=1.0)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 0.25, -0.25])
    adv, _ = sg.seed_advantages(rewards, entropy, 2, modulation="inverse", alpha=1.0, scale_rewards="group")
    assert adv.tolist() == pytest.approx([0.7070, -0.7070, 0.3535, -0.3535], abs=1e-4)


def test_bins_variant_by_hand():
    assert sg.uncertainty_bins(torch.tensor([0.0, 1.0, 2.0])).tolist() == pytest.approx([0.8, 1.0, 1.2])
    assert sg.uncertainty_bins(torch.tensor([0.5, 0.5, 0.5])).tolist() == [1.0, 1.0, 1.0]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    adv, _ = sg.seed_advantages(rewards, torch.tensor([2.0, 0.0, 1.0]), 2, modulation="bins", alpha=1.0)
    assert adv.tolist() == pytest.approx([0.6, -0.6, 0.4, -0.4, 0.5, -0.5])  # HIGH uncertainty gets MORE


def _rollout(completions, rewards, sampling_logps=None):
    n = len(completions)
    mask = torch.ones(n, 3)
    return g.Rollout(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                     completion_ids=torch.zeros(n, 3, dtype=torch.long), completion_mask=mask,
                     truncated=torch.zeros(n, dtype=torch.bool), completions=completions, answers=[4.0] * n,
                     questions=["2+2?"] * n, num_generations=G, rewards=torch.tensor(rewards),
                     sampling_logps=torch.full((n, 3), -1.0) if sampling_logps is None else sampling_logps)


@pytest.mark.parametrize("estimator", ["likelihood", "discrete"])
def test_identical_answers_have_zero_entropy_and_factor_one(estimator):
    ro = _rollout(["4"] * 4 + ["It is 4."] * 4, [1.0] * G)
    entropy = sg.group_entropies(ro, MathAnswerJudge(), estimator)
    assert entropy.tolist() == [0.0]
    assert sg.modulation_factor(entropy, G, "inverse", 1.0).tolist() == [1.0]


@pytest.mark.parametrize("estimator", ["likelihood", "discrete"])
def test_all_different_answers_have_maximal_entropy(estimator):
    ro = _rollout([str(i) for i in range(G)], [0.0] * 7 + [1.0])  # equal likelihoods -> uniform clusters
    entropy = sg.group_entropies(ro, MathAnswerJudge(), estimator)
    assert entropy.item() == pytest.approx(math.log(G), abs=1e-6)
    adv, factors = sg.seed_advantages(ro.rewards, entropy, G, modulation="inverse", alpha=1.0)
    assert factors.item() == pytest.approx(0.5, abs=1e-6)
    assert adv[-1].item() == pytest.approx((1 - 1 / 8) * 0.5, abs=1e-6)


def test_group_without_parsable_answers_is_all_singletons():
    ro = _rollout(["no idea"] * G, [0.0] * G)
    assert sg.group_entropies(ro, MathAnswerJudge(), "discrete").item() == pytest.approx(math.log(G))
    adv, factors = sg.seed_advantages(ro.rewards, torch.tensor([math.log(G)]), G, modulation="exp", alpha=1.0)
    assert factors.item() == pytest.approx(math.exp(-1)) and adv.abs().sum().item() == 0.0  # all wrong: A = 0


def test_likelihood_estimator_uses_the_sampling_logps():
    logps = torch.full((G, 3), -1.0)
    logps[:4] = -0.1  # the four "5" answers are far more likely than the four "6"s
    ro = _rollout(["5"] * 4 + ["6"] * 4, [1.0] * 4 + [0.0] * 4, sampling_logps=logps)
    p5 = 1 / (1 + math.exp(-0.9))
    expected = -(p5 * math.log(p5) + (1 - p5) * math.log(1 - p5))
    assert sg.group_entropies(ro, MathAnswerJudge(), "likelihood").item() == pytest.approx(expected, abs=1e-6)
    assert sg.group_entropies(ro, MathAnswerJudge(), "discrete").item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("flags, message", [
    (["--modulation", "focal"], "--modulation must be one of"), (["--alpha", "-1"], "--alpha must be >= 0"),
    (["--modulation", "linear", "--alpha", "2"], "--alpha must be <= 1 with --modulation linear"),
    (["--judge", "llm"], "--judge must be one of"), (["--estimator", "rao"], "--estimator must be one of"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    # the NLI judge loads (and fails) before the policy model: the policy path here does not exist either
    (["--judge", "nli", "--nli_model", "/nonexistent/nli", "--model", "/nonexistent/policy"], "--nli-model"),
])
def test_bad_flags_fail_before_any_model_loads(flags, message):
    result = run_script("seed_grpo.py", *flags, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_seed_grpo_smoke_two_steps(tiny_model_dir, tmp_path):
    out = tmp_path / "seed"
    result = run_script("seed_grpo.py", "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS,
                        "--num_generations", "4", "--no-save_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert " se " in result.stdout and " factor " in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "semantic_entropy" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0.0 <= r["semantic_entropy"] <= math.log(4) + 1e-6 and 0.5 - 1e-6 <= r["seed_factor"] <= 1.0
    assert json.loads((out / "config.json").read_text())["scale_rewards"] == "group"  # see the module docstring


# ---------------------------------------------------------------------------------------------- closer to the paper
def test_exact_judge_docstring_example():
    from semantic_entropy import ExactAnswerJudge, MathAnswerJudge

    responses = ["so 12", "it is 12.0", "12", "no idea", "no idea"]
    assert ExactAnswerJudge().cluster(responses) == [0, 1, 0, 2, 3]
    assert MathAnswerJudge().cluster(responses) == [0, 0, 0, 1, 2]  # numeric: 12 and 12.0 merge
    assert g.final_answer_text("so 3 + 4 = 7.0") == "7.0" and g.final_answer_text("\\boxed{ 12 }") == "12"
    assert g.final_answer_text("no idea") is None


def test_monte_carlo_estimator_uses_raw_sequence_logprobs():
    """Two prompts of G = 2. The MC form uses the SUM of token log-probs (the paper's raw sequence probability)."""
    ro = g.Rollout(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1),
                   completion_ids=torch.zeros(4, 2, dtype=torch.long), completion_mask=torch.tensor(
                       [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]), truncated=torch.zeros(4, dtype=torch.bool),
                   completions=["7", "8", "7", "7"], answers=[7.0] * 4, questions=["q1", "q1", "q2", "q2"],
                   num_generations=2, rewards=torch.zeros(4),
                   sampling_logps=torch.tensor([[-1.0, -1.0], [-1.0, 9.0], [-0.5, -0.5], [-2.0, 0.0]]))
    from semantic_entropy import MathAnswerJudge, monte_carlo_semantic_entropy

    se = sg.group_entropies(ro, MathAnswerJudge(), "monte_carlo")
    # prompt 1: two clusters with sequence log-probs -2 and -1 (the 9.0 is masked out); prompt 2: one cluster -> 0
    assert se[0].item() == pytest.approx(monte_carlo_semantic_entropy([0, 1], [-2.0, -1.0]), abs=1e-6)
    assert se[1].item() == pytest.approx(0.0, abs=1e-6)


def test_authors_flag_set_parses():
    cfg = g.parse_config(sg.SeedConfig, ["--judge", "exact", "--estimator", "likelihood", "--modulation", "inverse",
                                         "--alpha", "0.0417", "--scale_rewards", "none"])
    cfg.validate()
    # alpha 0.0417 in f(alpha * SE / log G) is the authors' alpha_eff = 0.0417 / log G times SE
    factor = sg.modulation_factor(torch.tensor([math.log(8)]), 8, "inverse", cfg.alpha)
    assert factor.item() == pytest.approx(1 / 1.0417, abs=1e-6)
