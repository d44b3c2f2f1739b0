"""Issue 25's pieces: the harder tool task, chains at a token budget, the A_inter-only ablation, and
benchmarks/tree_compare.py's success-vs-tokens numbers, end to end on the tiny offline model."""

import json
import random

import pytest
import torch

import grpo_mini as g
import tree_grpo as t
from benchmarks.tree_compare import success_token_auc, success_vs_tokens
from conftest import run_script

CPU = torch.device("cpu")


def test_three_hops_need_every_search_and_hints_name_the_next_person():
    quest = t.make_quest(random.Random(1), hops=3, people=6, hinted_share=1.0)
    asked = quest.prompt.removeprefix("Where does the friend of ").removesuffix("'s friend live?")
    assert len(quest.facts) == 6 and quest.prompt.startswith("Where does the friend of ")
    friend = quest.facts[asked].split("'s friend is ")[1].split(".")[0]
    second = quest.facts[friend].split("'s friend is ")[1].split(".")[0]
    assert f"Search {friend} to find {friend}'s friend." in quest.facts[asked]
    assert quest.facts[friend].endswith(f"Search {second} to find where {second} lives.")
    assert quest.facts[second] == f"{second} lives in {quest.answer}."
    others = [p for p in quest.facts if p not in (asked, friend, second)]
    assert all(quest.answer not in quest.facts[p] for p in others)  # distractors live elsewhere
    unhinted = t.make_quest(random.Random(1), hops=3, people=6, hinted_share=0.0)
    assert not any("Search" in fact for fact in unhinted.facts.values())


def test_the_default_setting_draws_the_same_questions_as_before():
    """The harder settings were added without changing the default's random draws (pinned from the code before)."""
    quest = t.make_quest(random.Random(0))
    assert quest.prompt == "Where does Nina's friend live?" and quest.answer == "Dublin"
    assert quest.facts == {"Nina": "Nina's friend is Sam. Search Sam to find where Sam lives.",
                           "Sam": "Sam lives in Dublin.", "Grace": "Grace lives in Perth.",
                           "Ava": "Ava lives in Lagos."}


def test_new_flags_fail_in_one_line():
    with pytest.raises(g.ConfigError, match="--max_turns must be >= --hops \\+ 1 = 4"):
        t.TreeConfig(hops=3, max_turns=3).validate()
    with pytest.raises(g.ConfigError, match="--hops and --people_per_world"):
        t.TreeConfig(hops=4, people_per_world=4, max_turns=6).validate()
    with pytest.raises(g.ConfigError, match="--tree_advantage must be one of inter_intra, inter"):
        t.TreeConfig(tree_advantage="intra").validate()
    with pytest.raises(g.ConfigError, match="--tokens_per_step .* for the chains"):
        t.TreeConfig(tokens_per_step=500).validate()
    with pytest.raises(g.ConfigError, match="--hinted_share"):
        t.TreeConfig(hinted_share=1.5).validate()
    t.TreeConfig(tree=False, tokens_per_step=500).validate()


def test_chains_stop_at_the_budget_to_the_nearest_half_chain(monkeypatch):
    """Every episode costs 10 tokens; 2 prompts; a wave (one chain per prompt) costs 20. From G = 2 (40 tokens),
    waves are added while spent + 10 < B: B = 75 -> 60, 80: G = 4 (80 is nearer 75 than 60 is)."""
    def fake_episodes(sampler, fmt, episodes, cfg, device, next_node, greedy=False):
        for e in episodes:
            e.generated_tokens, e.finished, e.turns = 10, True, [[1]]

    monkeypatch.setattr(t, "run_episodes", fake_episodes)
    quests = t.make_quest_split(0, 2, 1)[0]
    for budget, expected in ((75, 4), (69, 3), (0, 2), (10**6, t.MAX_CHAINS)):
        cfg = t.TreeConfig(tree=False, num_generations=2, tokens_per_step=budget)
        chains = t.run_chains(None, None, quests, cfg, CPU)
        assert len(chains) == 2 * expected
        assert [c.quest for c in chains] == [quests[0]] * expected + [quests[1]] * expected  # contiguous groups
        assert [c.tree for c in chains[:expected]] == list(range(expected))


def test_inter_ablation_is_the_prompt_standardised_reward():
    """Docstring example of tree_advantages: A_inter alone is its first half."""
    cfg = t.TreeConfig(tree_advantage="inter", num_trees=2, leaves_per_tree=3)
    ro = t.TreeRollout(*([None] * 8), num_generations=6, rewards=torch.tensor([1.0, 1, 0, 0, 0, 0]),
                       tree_index=torch.tensor([0, 0, 0, 1, 1, 1]))
    advantages, _ = t.tree_advantage_fn(cfg)(ro)
    assert torch.allclose(advantages, torch.tensor([1.2910, 1.2910, -0.6455, -0.6455, -0.6455, -0.6455]), atol=1e-4)
    full, _ = t.tree_advantage_fn(t.TreeConfig())(ro)
    assert torch.allclose(full[:3], torch.tensor([1.8684, 1.8684, -1.8002]), atol=1e-4)


def test_success_vs_tokens_and_its_area_docstring_examples():
    records = [{"step": 0, "eval_accuracy": 0.1}, {"step": 1, "reward": 0, "tokens_sampled": 100},
               {"step": 2, "reward": 0, "tokens_sampled": 150}, {"step": 2, "eval_accuracy": 0.5}]
    assert success_vs_tokens(records) == [(0, 0.1), (250, 0.5)]
    assert success_token_auc([(0, 0.2), (100, 0.6), (200, 1.0)], 150) == pytest.approx(0.5)
    assert success_token_auc([(0, 0.2), (100, 0.6)], 200) == pytest.approx((40 + 60) / 200)  # the last value holds
    with pytest.raises(ValueError):
        success_token_auc([(10, 0.2)], 100)


def test_budget_chains_and_ablation_train_through_grpo_mini(tiny_model, tiny_tokenizer, tmp_path):
    common = dict(max_turns=4, hops=3, people_per_world=5, hinted_share=0.5, max_turn_tokens=6, device="cpu",
                  dtype="fp32", max_steps=1, prompts_per_step=2, num_train_problems=8, num_eval_problems=2,
                  eval_every=0, save_model=False, save_every=0)
    for name, flags in (("chains", dict(tree=False, num_generations=2, tokens_per_step=10**4)),
                        ("inter", dict(tree_advantage="inter"))):
        cfg = t.TreeConfig(**common, **flags, output_dir=str(tmp_path / name))
        g.train(cfg, model=tiny_model, tokenizer=tiny_tokenizer, **t.TREE_HOOKS)
        record = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][1]
        assert record["rows_per_prompt"] == (t.MAX_CHAINS if name == "chains" else 6)
        assert record["tokens_sampled"] > 0


def test_tree_compare_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "tree_compare"
    result = run_script("benchmarks/tree_compare.py", "--output_dir", out, "--seeds", "0", "1", "--budget", "40",
                        "--set", f"model={tiny_model_dir}", "max_steps=2", "prompts_per_step=2", "num_eval_problems=2",
                        "num_train_problems=8", "eval_every=1", "max_turn_tokens=4", "device=cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tree, chains, inter = (summary["per_seed"][m]["0"] for m in ("tree_grpo", "chains_equal_tokens", "tree_inter"))
    assert len(tree["points"]) == 3 and tree["points"][0][0] == 0  # evals at steps 0, 1, 2
    assert 0 <= tree["auc"] <= 1 and tree["auc_budget"] == min(tree["tokens_total"], chains["tokens_total"],
                                                              inter["tokens_total"])
    assert inter["rows_per_prompt"] == 6 and chains["rows_per_prompt"] >= 3
    assert (out / "chains_equal_tokens_seed0.log").exists()
    flags = json.loads((out / "chains_equal_tokens_seed1" / "config.json").read_text())
    assert flags["tokens_per_step"] == 40 and flags["tree"] is False  # the budget fixed before the runs, every seed
    assert set(summary["paired"]) == {"tree_grpo vs chains_equal_tokens", "tree_grpo vs tree_inter",
                                      "tree_inter vs chains_equal_tokens"}
    assert summary["paired"]["tree_grpo vs tree_inter"]["auc"]["n"] == 2
    results = (out / "results.md").read_text()
    assert "| tree_inter |" in results and "| tree_grpo vs chains_equal_tokens | 2 |" in results
    assert "trees whose leaves disagree" in results
    metrics = [json.loads(line) for line in (out / "tree_grpo_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["mixed_trees"] <= 1 for r in metrics if "reward" in r)
    # the two methods only, from the same finished runs (--reuse): one pair, its AUC budget over the two
    result = run_script("benchmarks/tree_compare.py", "--output_dir", out, "--seeds", "0", "1", "--budget", "40",
                        "--methods", "tree_grpo", "chains_equal_tokens", "--reuse", "--overwrite",
                        "--set", f"model={tiny_model_dir}", "max_steps=2", "prompts_per_step=2", "num_eval_problems=2",
                        "num_train_problems=8", "eval_every=1", "max_turn_tokens=4", "device=cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("reusing the finished run") == 4
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_seed"]) == {"tree_grpo", "chains_equal_tokens"}
    assert set(summary["paired"]) == {"tree_grpo vs chains_equal_tokens"}
    assert summary["per_seed"]["tree_grpo"]["0"]["auc_budget"] == min(tree["tokens_total"], chains["tokens_total"])
    assert "| tree_inter |" not in (out / "results.md").read_text()


def test_tree_compare_probe_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "probe"
    result = run_script("benchmarks/tree_compare.py", "probe", "--model", tiny_model_dir, "--questions", "2",
                        "--settings", "2h4p50", "3h6p25", "--output_dir", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["2h4p50", "3h6p25"]
    for r in summary.values():
        assert 0 <= r["sampled_success"] <= 1 and 0 <= r["mixed_groups"] <= 1 and r["tokens_per_chain"] > 0
        assert r["tree_cost_in_chains"] > 0
    assert "| 3h6p25 |" in (out / "results.md").read_text()
