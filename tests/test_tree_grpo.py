"""Tree-GRPO: the advantage by hand, tree construction, observation masking, and a 2-step run on the tiny model."""

import json
import random

import pytest
import torch

import grpo_mini as g
import tree_grpo as t
from conftest import TINY_RUN_FLAGS, run_script

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- the advantage
def test_tree_advantages_docstring_example():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    prompt = torch.tensor([0, 0, 0, 0, 0, 0])
    tree = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = torch.tensor([1.8684, 1.8684, -1.8002, -0.6455, -0.6455, -0.6455])
    assert torch.allclose(t.tree_advantages(rewards, prompt, tree), expected, atol=1e-4)


def test_tree_advantages_by_hand_two_prompts_and_singletons():
    """Tree ids repeat across prompts; a singleton tree has mean 0 and std 1, so A_intra = R / (1 + eps)."""
    rewards = torch.tensor([2.0, 0.0, 1.0, 3.0])
    prompt = torch.tensor([0, 0, 1, 1])
    tree = torch.tensor([0, 1, 0, 0])  # prompt 0: two singleton trees; prompt 1: one tree of two leaves
    # prompt 0: inter mean 1, std sqrt(2) -> [0.7071, -0.7071]; intra (singletons) -> [2, 0]
    # prompt 1: inter mean 2, std sqrt(2) -> [-0.7071, 0.7071]; intra (same group) -> [-0.7071, 0.7071]
    expected = torch.tensor([2.7071, -0.7071, -1.4142, 1.4142])
    assert torch.allclose(t.tree_advantages(rewards, prompt, tree), expected, atol=1e-4)


def test_standardise_within_docstring_example():
    out = t.standardise_within(torch.tensor([1.0, 0.0, 1.0, 7.0]), torch.tensor([0, 0, 0, 1]))
    assert torch.allclose(out, torch.tensor([0.5774, -1.1547, 0.5774, 7 / (1 + 1e-6)]), atol=1e-4)


# ---------------------------------------------------------------------------------------------- the environment
def test_quest_needs_two_searches_and_the_split_is_seeded():
    quest = t.make_quest(random.Random(3))
    asked = quest.prompt.split("Where does ")[1].split("'s")[0]
    first = quest.search(asked)
    friend = first.split("friend is ")[1].split(".")[0]
    assert quest.answer not in first  # no city to copy after one hop
    assert quest.search(friend.lower()) == f"Result: {friend} lives in {quest.answer}."
    assert quest.search("Nobody") == "Result: nothing found for Nobody."
    train, held_out = t.make_quest_split(0, 50, 10)
    assert t.make_quest_split(0, 50, 10)[1] == held_out and len(held_out) == 10
    keys = {(q.prompt, tuple(sorted(q.facts.items()))) for q in held_out}
    assert not [q for q in train if (q.prompt, tuple(sorted(q.facts.items()))) in keys]


def test_parse_action_docstring_examples():
    assert t.parse_action("I need Ben.\nsearch: Ben") == ("search", "Ben")
    assert t.parse_action("Oslo!") == (None, None)
    assert t.parse_action("search: Ava's friend\nANSWER : Oslo") == ("answer", "Oslo")


# ---------------------------------------------------------------------------------------------- the rollouts
@pytest.fixture
def quests():
    return t.make_quest_split(0, 4, 2)[0][:2]


def cfg_for(**overrides):
    return t.TreeConfig(**{"max_turns": 3, "max_turn_tokens": 6, "device": "cpu", "dtype": "fp32", **overrides})


@pytest.mark.parametrize("M, N, L, K", [(2, 2, 1, 3), (1, 3, 2, 4), (3, 1, 1, 2)])
def test_tree_construction(tiny_model, tiny_tokenizer, quests, M, N, L, K):
    torch.manual_seed(0)
    cfg = cfg_for(num_trees=M, nodes_per_expansion=N, expansion_rounds=L, leaves_per_tree=K)
    fmt = t.EpisodeFormat(tiny_tokenizer)
    rows, trees = t.grow_trees(tiny_model, fmt, quests, cfg, CPU, random.Random(0))
    assert len(trees) == len(quests) and all(len(per_prompt) == M for per_prompt in trees)
    for per_prompt in trees:
        for tree in per_prompt:
            assert len(tree) == 1 + N * L  # leaves: the trunk and one per expansion
            nodes = {n for leaf in tree for n in leaf.node_ids}  # a node is a turn; shared turns count once
            assert len(nodes) == sum(len(leaf.turns) - leaf.kept_turns for leaf in tree)
    assert len(rows) == len(quests) * M * K
    for leaf in rows:  # every row is a valid episode
        assert 1 <= len(leaf.turns) <= cfg.max_turns and leaf.finished
        assert len(leaf.observations) == len(leaf.turns) - 1  # an observation after every turn but the last
        assert len(leaf.node_ids) == len(set(leaf.node_ids)) == len(leaf.turns)
    # rows that share a node share every token up to and including it
    for a in rows:
        for b in rows:
            shared = 0
            while shared < min(len(a.node_ids), len(b.node_ids)) and a.node_ids[shared] == b.node_ids[shared]:
                shared += 1
            assert a.turns[:shared] == b.turns[:shared]
            assert a.observations[:min(shared, len(a.observations), len(b.observations))] == \
                b.observations[:min(shared, len(a.observations), len(b.observations))]


def test_expandable_nodes_are_root_and_non_leaf_turns_once_each(quests):
    trunk = t.Episode(quests[0], tree=0, turns=[[1], [2], [3]], observations=[[9], [9]], node_ids=[10, 11, 12])
    branch = trunk.branch(1)
    branch.turns += [[4]]
    branch.node_ids += [13]
    nodes = t.expandable_nodes([trunk, branch])
    assert [(id(e), keep) for e, keep in nodes] == [(id(trunk), 0), (id(trunk), 1), (id(trunk), 2)]


def test_observations_are_read_but_not_trained(tiny_model, tiny_tokenizer, quests):
    """The loss mask covers the model's turns only, the attention covers the observations too, and the gradient
    equals that of a plain forward over the full sequences with the log-probs summed over the model's tokens."""
    cfg = cfg_for(beta=0.0, loss_type="dapo", max_tokens_per_micro_batch=10**6)
    fmt = t.EpisodeFormat(tiny_tokenizer)
    quest = quests[0]
    asked = quest.prompt.split("Where does ")[1].split("'s")[0]
    turn0 = tiny_tokenizer(f"search: {asked}").input_ids + [tiny_tokenizer.eos_token_id]
    episode = t.Episode(quest, tree=0, turns=[turn0, tiny_tokenizer("answer: Oslo").input_ids], node_ids=[0, 1],
                        observations=[fmt.observation_ids(quest.search(asked), turn_ended_with_eos=True)])
    other = t.Episode(quest, tree=1, turns=[tiny_tokenizer("answer: Rome").input_ids], node_ids=[2])
    ro = t.episodes_to_rollout([episode, other], fmt, 2, CPU)
    n0, n_obs, n1 = len(turn0), len(episode.observations[0]), len(episode.turns[1])
    assert ro.completion_mask[0].tolist() == [1.0] * n0 + [0.0] * n_obs + [1.0] * n1
    assert ro.attention_mask[0].tolist() == [1.0] * (n0 + n_obs + n1)
    assert "Result:" in tiny_tokenizer.decode(ro.completion_ids[0, n0:n0 + n_obs])

    advantages = torch.tensor([1.0, -0.5])
    tiny_model.zero_grad(set_to_none=True)
    g.accumulate_gradients(tiny_model, ro, advantages, [0, 1], None, None, cfg, CPU)
    ours = [p.grad.clone() for p in tiny_model.parameters()]

    tiny_model.zero_grad(set_to_none=True)  # the textbook computation, one full sequence at a time
    total = 0.0
    for row in range(2):
        ids = torch.cat([ro.prompt_ids[row], ro.completion_ids[row]])
        attention = torch.cat([ro.prompt_mask[row].float(), ro.attention_mask[row]])
        keep = attention.bool()
        ids, T = ids[keep].unsqueeze(0), int(ro.attention_mask[row].sum())
        logits = tiny_model(input_ids=ids).logits[0, -T - 1:-1] / cfg.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, -T:].unsqueeze(-1)).squeeze(-1)
        total = total - advantages[row] * (logp * ro.completion_mask[row, :T]).sum()
    (total / ro.completion_mask.sum()).backward()  # dapo: divided by the model tokens of the batch
    for a, b in zip(ours, [p.grad for p in tiny_model.parameters()]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_tiny_run_via_grpo_mini_train_tree_and_chain(tiny_model, tiny_tokenizer, tmp_path):
    for tree in (True, False):
        cfg = cfg_for(tree=tree, max_steps=1, prompts_per_step=2, num_generations=3, num_train_problems=8,
                      num_eval_problems=2, eval_every=0, save_model=False, save_every=0, learning_rate=1e-3,
                      output_dir=str(tmp_path / f"run_{tree}"))
        summary = g.train(cfg, model=tiny_model, tokenizer=tiny_tokenizer, **t.TREE_HOOKS)
        record = [json.loads(x) for x in (tmp_path / f"run_{tree}" / "metrics.jsonl").read_text().splitlines()][1]
        assert record["tokens_sampled"] > 0 and 0 <= record["accuracy"] <= 1 and record["turns"] >= 1
        assert 0 <= summary["eval_after"]["accuracy"] <= 1


def test_bad_tree_flags_fail_before_any_model_loads():
    with pytest.raises(g.ConfigError, match="--leaves_per_tree must be <= 1 \\+ nodes_per_expansion"):
        t.TreeConfig(leaves_per_tree=4).validate()
    with pytest.raises(g.ConfigError, match="--num_trees must be >= 1"):
        t.TreeConfig(num_trees=0).validate()
    with pytest.raises(g.ConfigError, match="--dynamic_sampling is not supported"):
        t.TreeConfig(dynamic_sampling=True).validate()


@pytest.mark.parametrize("extra", [[], ["--no-tree"]])
def test_tree_grpo_smoke_two_steps(tiny_model_dir, tmp_path, extra):
    out = tmp_path / "run"
    result = run_script("tree_grpo.py", "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS,
                        "--max_turns", "3", "--max_turn_tokens", "6", "--num_eval_problems", "2", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("step ") for line in lines) == 2
    assert lines[-1].startswith("held-out accuracy: ")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
