"""tree_grpo.py: Tree-GRPO (arXiv 2509.21240) for a multi-turn tool-use agent, against chain-based GRPO.

An agent episode is a sequence of turns. In each turn the model writes a thought and a tool call; the environment
answers with an observation; the episode ends with an answer, or after --max_turns turns. The reward is on the
outcome (the final answer), so plain GRPO gives every turn of an episode the same advantage.

Tree-GRPO changes the rollout, and with it the advantage. A tree node is one whole turn:
    1. per prompt, M chains start M trees (--num_trees);
    2. for L rounds (--expansion_rounds), each tree picks N nodes (--nodes_per_expansion) uniformly, with
       replacement, among its root and its non-leaf nodes, and generates the rest of an episode from each: a branch;
    3. K leaves per tree (--leaves_per_tree) are sampled; each is one training row: the prompt plus all its turns;
    4. A = A_inter + A_intra: the leaf's reward standardised over all leaves of its prompt, plus over the leaves of
       its own tree (tree_advantages).
Rows that share a prefix each carry their own advantage, so a shared turn is pushed by every leaf below it: a turn
after which most branches succeed is pushed up more than one after which most fail. That is the step-level
signal, got from outcome rewards alone. Branching also saves tokens: a branch re-uses its prefix instead of
generating it again, so M = 2 trees of 3 leaves (6 rows) cost between 4 and 5 chains here (measured: docs/RESULTS.md).

Tokens the environment wrote (the observations) are in every row, so that the model reads them, but are masked out
of the loss: the policy is not trained to predict what the tool says.

The task is a small procedurally generated world that a 135M model can learn on a CPU. A question needs two
searches and an answer:
    Question: Where does Ava's friend live?
    search: Ava      ->  Result: Ava's friend is Ben.
    search: Ben      ->  Result: Ben lives in Oslo.
    answer: Oslo     ->  reward 1 (0 for any other answer, or none within --max_turns)

Run it (the first command is the one the README quotes; `--no-tree` is the chain baseline, everything else equal):

    python tree_grpo.py                      # Tree-GRPO, M=2 N=2 L=1 K=3 (the authors' setting)
    python tree_grpo.py --no-tree            # chain-based multi-turn GRPO, 5 chains per prompt
    python benchmarks/compare.py --preset tree --methods chain_multiturn tree_grpo   # both; table and plot
    python tree_grpo.py --hops 3 --people_per_world 6 --hinted_share 0.25 --max_turns 5   # the harder setting
    python benchmarks/tree_compare.py --seeds 0 1 2   # on it: trees, chains at the trees' token budget
        # (--no-tree --tokens_per_step), and trees with the chains' advantage (--tree_advantage inter)

What you will see: held-out success at step 0, one line per step (success, turns, generated tokens), evaluations,
and `held-out accuracy: BEFORE -> AFTER` (here accuracy means success rate). Everything else (the loss, the
optimiser step, checkpoints, logging, the CLI) is grpo_mini.py's: this file holds only what differs.
"""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from grpo_mini import (Config, ConfigError, Rollout, completion_mask, eos_token_ids, group_advantages, main,
                       sample_fn)

# ======================================================================================================================
# 1. Config: Tree-GRPO's four numbers, the episode limits, and defaults that fit a 15-minute CPU run
# ======================================================================================================================


@dataclass
class TreeConfig(Config):
    """Tree-GRPO (tree_grpo.py): the trees, the tool task and its episodes"""
    output_dir: str = "runs/tree_grpo"
    """where metrics.jsonl, config.json and the trained model go"""
    tree: bool = True
    """--tree: Tree-GRPO. --no-tree: chain-based multi-turn GRPO with --num_generations independent chains per prompt (the baseline: the same file, the same everything but the rollout and the advantage)"""
    num_trees: int = 2
    """M: independent chains per prompt, each the trunk of a tree (authors: 2)"""
    nodes_per_expansion: int = 2
    """N: nodes each tree picks per expansion round, uniformly with replacement among its root and non-leaf nodes; each gets a new branch (authors: 2)"""
    expansion_rounds: int = 1
    """L: expansion rounds (authors: 1). A tree ends with 1 + N x L leaves"""
    leaves_per_tree: int = 3
    """K: leaves sampled per tree as training rows (authors: 3); at most 1 + N x L"""
    num_generations: int = 5
    """chains per prompt with --no-tree. Measured, four chains generate 0.80x the tokens of the M=2, N=2, L=1 trees and five chains 1.16x (docs/RESULTS.md); 5 is the nearer. Ignored by the tree, whose rows per prompt are M x K"""
    hops: int = 2
    """searches a question needs: 2 asks "Where does Ava's friend live?", 3 "Where does the friend of Ava's friend live?" (a chain of friends, then a city); the answer takes one more turn"""
    people_per_world: int = 4
    """people in each question's world: the chain of --hops friends, and the rest, who only live somewhere (distractors)"""
    hinted_share: float = 0.5
    """share of questions whose entries say whom to search next (the curriculum: see HINTED_SHARE)"""
    tokens_per_step: int = 0
    """--no-tree only: a budget of generated tokens per step. Chains are sampled one per prompt at a time, after the first --num_generations, until the step has spent the budget (to the nearest half chain); 0: always --num_generations. benchmarks/tree_compare.py sets it to the trees' mean, so both spend the same tokens"""
    tree_advantage: str = "inter_intra"
    """inter_intra: Tree-GRPO's A_inter + A_intra. inter: only A_inter, the leaf's reward standardised over its prompt's leaves, i.e. the chains' advantage on tree rollouts (the ablation that separates the rollout from the credit)"""
    max_turns: int = 4
    """turns per episode at most; an episode without an answer by then gets reward 0. At least --hops + 1"""
    max_turn_tokens: int = 24
    """new tokens per turn at most (a thought and a tool call)"""
    max_completion_length: int = 96
    """dr_grpo's constant normaliser; set to max_turns x max_turn_tokens (the most tokens the model can write)"""
    prompts_per_step: int = 4
    """prompts (questions) per step"""
    max_steps: int = 24
    """training steps"""
    num_eval_problems: int = 32
    """held-out questions, answered greedily (one chain each) before, during and after training"""
    eval_every: int = 8
    """evaluate every N steps (0: only before and after training)"""

    def validate(self) -> None:
        super().validate()
        for flag in ("num_trees", "nodes_per_expansion", "expansion_rounds", "leaves_per_tree", "max_turns",
                     "max_turn_tokens"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be >= 1 (got {getattr(self, flag)})")
        leaves = 1 + self.nodes_per_expansion * self.expansion_rounds
        if self.leaves_per_tree > leaves:
            raise ConfigError(f"--leaves_per_tree must be <= 1 + nodes_per_expansion x expansion_rounds = {leaves}, "
                              f"the leaves a tree has (got {self.leaves_per_tree})")
        if self.max_turns < self.hops + 1:
            raise ConfigError(f"--max_turns must be >= --hops + 1 = {self.hops + 1}: {self.hops} searches and the "
                              f"answer (got {self.max_turns})")
        if not 2 <= self.hops < self.people_per_world <= min(len(PEOPLE), self.hops + len(CITIES) - 1):
            raise ConfigError(f"--hops and --people_per_world need 2 <= hops < people_per_world <= {len(PEOPLE)}, "
                              f"with a city for each person outside the chain (got {self.hops} and "
                              f"{self.people_per_world})")
        if not 0.0 <= self.hinted_share <= 1.0:
            raise ConfigError(f"--hinted_share must be in [0, 1] (got {self.hinted_share})")
        if self.tree_advantage not in TREE_ADVANTAGES:
            raise ConfigError(f"--tree_advantage must be one of {', '.join(TREE_ADVANTAGES)} "
                              f"(got {self.tree_advantage!r})")
        if self.tokens_per_step < 0 or (self.tokens_per_step and self.tree):
            raise ConfigError("--tokens_per_step must be >= 0, and is for the chains (--no-tree) only: the trees' "
                              "cost is set by --num_trees, --nodes_per_expansion and --expansion_rounds")
        if self.tree and self.num_trees * self.leaves_per_tree < 2:
            raise ConfigError("--num_trees x --leaves_per_tree must be >= 2: a prompt needs two rows to compare")
        if self.data is not None or self.eval_data is not None:
            raise ConfigError("--data, --eval_data: tree_grpo.py has its own multi-turn task; they are not used here")
        if self.dynamic_sampling:
            raise ConfigError("--dynamic_sampling is not supported by tree_grpo.py (its rollout replaces GRPO's)")
        if self.importance_sampling_correction:
            raise ConfigError("--importance_sampling_correction is not supported by tree_grpo.py (its episodes keep "
                              "no sampler log-probs)")

    @property
    def rows_per_prompt(self) -> int:
        return self.num_trees * self.leaves_per_tree if self.tree else self.num_generations


TREE_ADVANTAGES = ("inter_intra", "inter")


# ======================================================================================================================
# 2. The environment: a small world of people, friends and cities, and a search tool
# ======================================================================================================================
# Every question is generated from a seed, so there is nothing to download and the train/eval split is reproducible.
# A world is --people_per_world people. The asked person's entry names their friend, whose entry names the next
# friend, --hops people in all; the last of them lives in the city asked for, and every other person in some other
# city. So no search but the last gives the answer: the task needs every hop (a distractor city sits in the entries of
# the other people, for a model that searches the wrong name). The default, 2 hops among 4 people:
#     Where does Ava's friend live?   Ava: "Ava's friend is Ben."   Ben: "Ben lives in Oslo."
# The harder setting (benchmarks/tree_compare.py), 3 hops among 6 people, a quarter of them hinted:
#     Where does the friend of Ava's friend live?   Ava -> Ben -> Chloe: "Chloe lives in Oslo."   (four turns)

PEOPLE = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar", "Nina",
          "Paul", "Rosa", "Sam"]
CITIES = ["Oslo", "Rome", "Lima", "Seoul", "Dublin", "Quito", "Vienna", "Lagos", "Perth", "Riga", "Tunis", "Zurich"]
# The curriculum. Without help, SmolLM2-135M answers after ONE search (1% of sampled episodes succeed: too few for
# RL to learn from in minutes); when the first result says whom to search next, it succeeds every time (greedy
# 48/48). So by default half of the worlds' entries carry that hint and half do not (--hinted_share): the hinted
# half gives the early reward, and the un-hinted half is what there is to learn.
HINTED_SHARE = 0.5
TOOL_INSTRUCTIONS = ("Find the answer with the search tool. In each turn, write one line: search: NAME (to look a "
                     "person up), or answer: CITY (your final answer).")
# One solved example, given as a real earlier conversation in the chat format: a 135M model copies a format from
# its own past turns far more readily than from a description. With the same example as plain text inside one
# message, SmolLM2-135M (greedy) wrote a made-up answer at once in almost every episode (1.04 turns on average) and
# solved none of 48 held-out questions.
EXAMPLE_DIALOGUE = [
    ("user", f"{TOOL_INSTRUCTIONS}\nQuestion: Where does Kim's friend live?"),
    ("assistant", "search: Kim"),
    ("user", "Result: Kim's friend is Leo. Search Leo to find where Leo lives."),
    ("assistant", "search: Leo"),
    ("user", "Result: Leo lives in Cairo."),
    ("assistant", "answer: Cairo"),
]


@dataclass
class Quest:
    """One question, its world and its answer. `prompt` is the question (grpo_mini's Problem has one too)."""

    prompt: str
    answer: str
    facts: dict  # name -> what a search for that name returns

    def search(self, name: str) -> str:
        """The tool: the entry for `name` (any capitalisation), or a miss."""
        for person, fact in self.facts.items():
            if person.lower() == name.lower():
                return f"Result: {fact}"
        return f"Result: nothing found for {name}."


def make_quest(rng: random.Random, hops: int = 2, people: int = 4, hinted_share: float = HINTED_SHARE) -> Quest:
    """One question: `hops` people in a chain of friends, the last of whom lives in the answer city, among `people`.
    (The random draws are made in the same order for every setting, so the default's questions never changed.)"""
    names = rng.sample(PEOPLE, people)
    chain, others = names[:hops], names[hops:]
    cities = rng.sample(CITIES, 1 + len(others))
    hinted = rng.random() < hinted_share
    facts = {}
    for person, friend in zip(chain, chain[1:]):
        goal = f"where {friend} lives" if friend == chain[-1] else f"{friend}'s friend"
        facts[person] = f"{person}'s friend is {friend}." + (f" Search {friend} to find {goal}." if hinted else "")
    facts[chain[-1]] = f"{chain[-1]} lives in {cities[0]}."
    for person, city in zip(others, cities[1:]):
        facts[person] = f"{person} lives in {city}."
    return Quest(prompt=f"Where does {'the friend of ' * (hops - 2)}{chain[0]}'s friend live?", answer=cities[0],
                 facts=facts)


def make_quest_split(seed: int, num_train: int, num_eval: int, **setting) -> tuple:
    """Seeded train/eval split; no held-out question (with its world) appears in training. setting: make_quest's
    hops, people and hinted_share."""
    rng = random.Random(seed)
    make = lambda rng: make_quest(rng, **setting)  # noqa: E731
    key = lambda q: (q.prompt, tuple(sorted(q.facts.items())))  # noqa: E731
    eval_set = {}
    while len(eval_set) < num_eval:
        q = make(rng)
        eval_set.setdefault(key(q), q)
    train = []
    while len(train) < num_train:
        q = make(rng)
        if key(q) not in eval_set:
            train.append(q)
    return train, list(eval_set.values())


ACTION = re.compile(r"\b(search|answer)\s*:\s*([A-Za-z]+)", re.IGNORECASE)


def parse_action(turn: str) -> tuple:
    """The turn's tool call: (kind, argument) from its LAST `search: X` / `answer: X`, or (None, None).
        parse_action("I need Ben.\\nsearch: Ben") == ("search", "Ben");  parse_action("Oslo!") == (None, None)"""
    calls = ACTION.findall(turn)
    return (calls[-1][0].lower(), calls[-1][1]) if calls else (None, None)


def outcome_reward(quest: Quest, answer: Optional[str]) -> float:
    """1 for the right city (any capitalisation), else 0. No format credit: the untrained model already answers
    in the format often enough (see docs/RESULTS.md), so none is needed."""
    return float(answer is not None and answer.lower() == quest.answer.lower())


# ======================================================================================================================
# 3. Episodes: turns by the model, observations by the environment
# ======================================================================================================================


@dataclass
class Episode:
    """One root-to-leaf path: the quest, then alternating model turns and observations (token ids).

    node_ids[i] names the tree node that turn i is. A branch copies its parent's first turns, node ids included,
    so two episodes share a prefix exactly when they share node ids."""

    quest: Quest
    tree: int  # which tree of its prompt this leaf belongs to (a chain is a tree with one leaf)
    turns: list = field(default_factory=list)  # [turn ids]: what the model wrote, EOS included
    observations: list = field(default_factory=list)  # [obs ids] after each turn but the last
    node_ids: list = field(default_factory=list)
    finished: bool = False
    answer: Optional[str] = None
    generated_tokens: int = 0  # tokens this episode generated itself (not those copied from its parent)
    kept_turns: int = 0  # turns copied from the parent when this episode branched off (0: a trunk, or from the root)

    def branch(self, keep: int) -> "Episode":
        """A new episode that shares this one's first `keep` turns and observations (keep = 0: from the root)."""
        return Episode(self.quest, self.tree, self.turns[:keep], self.observations[:keep], self.node_ids[:keep],
                       kept_turns=keep)

    def segments(self) -> list:
        """[(ids, written_by_model)] in order: turn, observation, turn, ..."""
        out = []
        for i, turn in enumerate(self.turns):
            out.append((turn, True))
            if i < len(self.observations):
                out.append((self.observations[i], False))
        return out

    @property
    def reward(self) -> float:
        return outcome_reward(self.quest, self.answer)


class EpisodeFormat:
    """Token ids of a quest's prompt and of an observation, in the model's chat format.

    The observation is a user message between two assistant turns. Its framing is read off the chat template, so
    any chat model works: we render [user Q, assistant A, user O] and keep what surrounds O after A."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._prompts: dict = {}  # question -> prompt token ids
        self.eos_text = tokenizer.decode([tokenizer.eos_token_id])
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "@@A@@"},
                 {"role": "user", "content": "@@O@@"}], tokenize=False, add_generation_prompt=True)
            self.before, self.after = text.split("@@A@@", 1)[1].split("@@O@@", 1)
        else:
            self.before, self.after = f"{self.eos_text}\n", "\n"

    def prompt_ids(self, quest: Quest) -> list:
        """The example dialogue, then the question, ready for the model's first turn (tokenized once per question:
        every turn of every episode starts from it)."""
        if quest.prompt not in self._prompts:
            self._prompts[quest.prompt] = self._tokenize_prompt(quest)
        return self._prompts[quest.prompt]

    def _tokenize_prompt(self, quest: Quest) -> list:
        messages = [*EXAMPLE_DIALOGUE, ("user", f"{TOOL_INSTRUCTIONS}\nQuestion: {quest.prompt}")]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                      tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{c}\n" for _, c in messages)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def observation_ids(self, text: str, turn_ended_with_eos: bool) -> list:
        before = self.before
        if turn_ended_with_eos and before.startswith(self.eos_text):  # the model wrote the end of its turn itself
            before = before[len(self.eos_text):]
        return self.tokenizer(f"{before}{text}{self.after}", add_special_tokens=False).input_ids


def left_pad(rows: list, pad_id: int, device: torch.device) -> tuple:
    """Token-id lists -> (ids [n, P], mask [n, P]), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def run_episodes(sampler, fmt: EpisodeFormat, episodes: list, cfg: TreeConfig, device: torch.device,
                 next_node: list, greedy: bool = False) -> None:
    """Play every unfinished episode to its end, one turn of all of them per generate call.

    A turn is sampled from the whole history (prompt, turns, observations) and parsed: `search: X` appends the
    tool's observation; `answer: X`, no tool call, or the last allowed turn ends the episode. next_node is a
    one-item counter that numbers new nodes."""
    tokenizer = fmt.tokenizer
    eos = eos_token_ids(sampler, tokenizer)
    while True:
        active = [e for e in episodes if not e.finished]
        if not active:
            return
        contexts = [fmt.prompt_ids(e.quest) + [t for ids, _ in e.segments() for t in ids] for e in active]
        prompt_ids, prompt_mask = left_pad(contexts, tokenizer.pad_token_id, device)
        ids, _ = sample_fn(cfg)(sampler, prompt_ids, prompt_mask, repeats=1, max_new_tokens=cfg.max_turn_tokens,
                                eos_ids=eos, pad_id=tokenizer.pad_token_id, temperature=cfg.temperature,
                                greedy=greedy)  # [n, T]
        mask, truncated = completion_mask(ids, eos)
        for e, row, row_mask, cut in zip(active, ids.tolist(), mask, truncated.tolist()):
            turn = row[:int(row_mask.sum())]
            e.turns.append(turn)
            e.node_ids.append(next_node[0])
            next_node[0] += 1
            e.generated_tokens += len(turn)
            kind, argument = parse_action(tokenizer.decode(turn, skip_special_tokens=True))
            if kind == "search" and len(e.turns) < cfg.max_turns:
                e.observations.append(fmt.observation_ids(e.quest.search(argument), turn_ended_with_eos=not cut))
            else:
                e.finished, e.answer = True, (argument if kind == "answer" else None)


# ======================================================================================================================
# 4. The rollouts: M trees grown by branching (Tree-GRPO), or G independent chains (the baseline)
# ======================================================================================================================


def expandable_nodes(tree: list) -> list:
    """The distinct nodes a tree may branch from, as (episode, turns kept): the root (0 turns kept) and every
    non-leaf turn node, i.e. every turn that is not the last turn of a path. Each node once, however many paths
    share it, so that the uniform pick is over nodes, not over paths."""
    nodes, seen = [(tree[0], 0)], set()
    for episode in tree:
        for depth, node in enumerate(episode.node_ids[:-1], start=1):
            if node not in seen:
                seen.add(node)
                nodes.append((episode, depth))
    return nodes


def grow_trees(sampler, fmt: EpisodeFormat, quests: list, cfg: TreeConfig, device: torch.device,
               rng: random.Random) -> tuple:
    """Tree-GRPO's rollout. Returns (rows, trees): rows are the K sampled leaves of every tree, prompt by prompt
    and tree by tree; trees[p][m] lists all leaves of tree m of prompt p."""
    next_node = [0]
    trees = [[[Episode(q, tree=m)] for m in range(cfg.num_trees)] for q in quests]  # [prompt][tree] -> leaves
    run_episodes(sampler, fmt, [t[0] for per_prompt in trees for t in per_prompt], cfg, device, next_node)
    for _ in range(cfg.expansion_rounds):
        branches = []
        for per_prompt in trees:
            for tree in per_prompt:
                nodes = expandable_nodes(tree)
                for _ in range(cfg.nodes_per_expansion):
                    parent, keep = rng.choice(nodes)  # uniform, with replacement
                    branches.append((tree, parent.branch(keep)))
        run_episodes(sampler, fmt, [b for _, b in branches], cfg, device, next_node)
        for tree, branch in branches:
            tree.append(branch)
    rows = [leaf for per_prompt in trees for tree in per_prompt
            for leaf in rng.sample(tree, cfg.leaves_per_tree)]  # K leaves per tree, uniformly
    return rows, trees


def run_chains(sampler, fmt: EpisodeFormat, quests: list, cfg: TreeConfig, device: torch.device) -> list:
    """The baseline's rollout: G independent episodes per prompt, each its own one-leaf tree, prompt by prompt.

    With --tokens_per_step B, G is set by the budget: after the first --num_generations chains per prompt, one more
    chain per prompt is sampled while the step's generated tokens t, plus half a chain per prompt at the mean cost
    so far, stay below B: stop once t + (t / G) / 2 >= B. So on average the step spends B, neither always over it
    (stopping only after reaching it) nor always under it. Every prompt gets the same G."""
    per_prompt = [[] for _ in quests]  # [prompt] -> its chains

    def play(count: int) -> None:  # `count` more chains for every prompt, in one batch of episodes
        wave = [[Episode(q, tree=len(chains) + i) for i in range(count)] for q, chains in zip(quests, per_prompt)]
        run_episodes(sampler, fmt, [e for chains in wave for e in chains], cfg, device, next_node=[0])
        for chains, new in zip(per_prompt, wave):
            chains += new

    play(cfg.num_generations)
    G = cfg.num_generations
    spent = lambda: sum(e.generated_tokens for chains in per_prompt for e in chains)  # noqa: E731
    while cfg.tokens_per_step and G < MAX_CHAINS and spent() + spent() / G / 2 < cfg.tokens_per_step:
        play(1)
        G += 1
    return [e for chains in per_prompt for e in chains]  # the rows of a prompt contiguous


MAX_CHAINS = 32  # chains per prompt at most under --tokens_per_step, so that one step's memory stays bounded


@dataclass
class TreeRollout(Rollout):
    """grpo_mini's Rollout, plus which tree of its prompt each row is a leaf of. The completion is the whole
    episode after the prompt; completion_mask marks the model's tokens (trained), attention_mask every real token."""

    tree_index: Optional[torch.Tensor] = None  # [N]


def episodes_to_rollout(episodes: list, fmt: EpisodeFormat, rows_per_prompt: int, device: torch.device):
    """Training rows: prompt ids (left-padded) and the episode after it (right-padded), with the loss mask on the
    model's tokens only. Rows of a prompt are contiguous, rows_per_prompt of them."""
    pad = fmt.tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([fmt.prompt_ids(e.quest) for e in episodes], pad, device)
    segments = [e.segments() for e in episodes]
    width = max(sum(len(ids) for ids, _ in s) for s in segments)
    completion = torch.full((len(episodes), width), pad, dtype=torch.long)
    loss_mask = torch.zeros(len(episodes), width)
    attention = torch.zeros(len(episodes), width)
    for row, parts in enumerate(segments):
        col = 0
        for ids, by_model in parts:
            completion[row, col:col + len(ids)] = torch.tensor(ids, dtype=torch.long)
            loss_mask[row, col:col + len(ids)] = float(by_model)  # observations: 0, not trained
            attention[row, col:col + len(ids)] = 1.0  # ... but read
            col += len(ids)
    texts = [fmt.tokenizer.decode([t for ids, _ in s for t in ids], skip_special_tokens=True) for s in segments]
    return TreeRollout(
        prompt_ids, prompt_mask, completion.to(device), loss_mask.to(device),
        truncated=torch.tensor([e.answer is None for e in episodes], device=device), completions=texts,
        answers=[e.quest.answer for e in episodes], questions=[e.quest.prompt for e in episodes],
        num_generations=rows_per_prompt, rewards=torch.tensor([e.reward for e in episodes], device=device),
        attention_mask=attention.to(device), tree_index=torch.tensor([e.tree for e in episodes], device=device))


def multi_turn_rollout(model, tokenizer, batch: list, cfg: TreeConfig, device: torch.device, sampler=None) -> tuple:
    """grpo_mini's rollout hook: sample and score one step's episodes. Returns (TreeRollout, metrics)."""
    fmt = EpisodeFormat(tokenizer)
    sampler = sampler if sampler is not None else model
    if cfg.tree:
        rows, trees = grow_trees(sampler, fmt, batch, cfg, device, random.Random(random.getrandbits(64)))
        every_leaf = [leaf for per_prompt in trees for tree in per_prompt for leaf in tree]
    else:
        rows = every_leaf = run_chains(sampler, fmt, batch, cfg, device)
    ro = episodes_to_rollout(rows, fmt, len(rows) // len(batch), device)
    return ro, {
        "accuracy": sum(e.reward for e in rows) / len(rows),  # success rate of the trained rows
        "turns": sum(len(e.turns) for e in rows) / len(rows),
        # every token the model generated this step, in leaves that were not sampled too: the rollout's cost
        "tokens_sampled": sum(e.generated_tokens for e in every_leaf),
        "rows_per_prompt": len(rows) // len(batch),  # M x K trees' leaves, or G chains (set by --tokens_per_step)
    }


# ======================================================================================================================
# 5. The advantage: A_inter + A_intra
# ======================================================================================================================


def standardise_within(values: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) within each group g, with the Bessel-corrected std (n - 1). A group of one has
    mean 0 and std 1 by definition (the authors' convention), so its value passes through as x / (1 + eps).
        values [1, 0, 1, 7], group [0, 0, 0, 1] -> group 0: mean 2/3, std 0.5774 -> [0.5774, -1.1547, 0.5774];
        group 1 (one value) -> 7 / (1 + 1e-6)"""
    out = torch.empty_like(values)
    for g in torch.unique(group):
        members = group == g
        x = values[members]
        if x.numel() == 1:
            mean, std = torch.zeros(()), torch.ones(())
        else:
            mean, std = x.mean(), x.std(unbiased=True)
        out[members] = (x - mean) / (std + eps)
    return out


def tree_advantages(rewards: torch.Tensor, prompt_index: torch.Tensor, tree_index: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """Tree-GRPO's advantage of each leaf: A = A_inter + A_intra.

        A_inter = (R - mean over the prompt's leaves) / (std over them + eps)      (every tree of the prompt)
        A_intra = (R - mean over the leaves of the same tree) / (std over them + eps)
    rewards [N] float; prompt_index, tree_index [N] integer ids (tree ids may repeat across prompts: a tree is a
    (prompt, tree) pair). The std is Bessel-corrected; a group of one has mean 0 and std 1; eps = 1e-6 as in the
    authors' code. Returns [N].

    Worked example: one prompt, two trees of three leaves, rewards tree 0 [1, 1, 0], tree 1 [0, 0, 0]:
        inter: mean 1/3, std sqrt(4/15) = 0.5164 -> [1.2910, 1.2910, -0.6455, -0.6455, -0.6455, -0.6455]
        intra: tree 0 mean 2/3, std 0.5774 -> [0.5774, 0.5774, -1.1547]; tree 1 all equal -> [0, 0, 0]
        A = [1.8684, 1.8684, -1.8002, -0.6455, -0.6455, -0.6455]
    """
    rewards = rewards.float()
    inter = standardise_within(rewards, prompt_index, eps)
    intra = standardise_within(rewards, tree_ids(prompt_index, tree_index), eps)
    return inter + intra


def tree_ids(prompt_index: torch.Tensor, tree_index: torch.Tensor) -> torch.Tensor:
    """A unique id per (prompt, tree) pair: tree ids repeat across prompts."""
    return prompt_index.long() * (int(tree_index.max()) + 1) + tree_index.long()


def tree_advantage_fn(cfg: TreeConfig):
    """grpo_mini's advantage hook: tree_advantages with --tree, GRPO's group advantage with --no-tree. With
    --tree_advantage inter, the trees' rows get A_inter alone: each leaf's reward standardised over its prompt's
    leaves, as a chain's is over its prompt's chains (with the trees' Bessel std and eps = 1e-6). Comparing it with
    the full tree run shows what the tree's own credit (A_intra) adds; comparing it with the chains shows what the
    tree rollout adds."""
    def advantages(ro: TreeRollout):
        if not cfg.tree:
            return group_advantages(ro.rewards, ro.num_generations, cfg.scale_rewards, baseline=cfg.baseline), {}
        prompt_index = torch.arange(ro.rewards.numel(), device=ro.rewards.device) // ro.num_generations
        mixed = {"mixed_trees": mixed_tree_share(ro.rewards, prompt_index, ro.tree_index)}
        if cfg.tree_advantage == "inter":
            return standardise_within(ro.rewards.float(), prompt_index), mixed
        return tree_advantages(ro.rewards, prompt_index, ro.tree_index), mixed
    return advantages


def mixed_tree_share(rewards: torch.Tensor, prompt_index: torch.Tensor, tree_index: torch.Tensor) -> float:
    """The share of trees whose leaves disagree (some right, some wrong): only there is A_intra non-zero. With 3
    leaves a tree and a low success rate it is mostly 0, and then the tree's own credit cannot matter.
        rewards tree 0 [1, 1, 0], tree 1 [0, 0, 0] (one prompt) -> 1 of 2 trees mixed -> 0.5"""
    trees = tree_ids(prompt_index, tree_index)
    ids = torch.unique(trees)
    return sum(bool(rewards[trees == t].max() != rewards[trees == t].min()) for t in ids) / ids.numel()


# ======================================================================================================================
# 6. Evaluation: one greedy episode per held-out question
# ======================================================================================================================


def evaluate_episodes(model, tokenizer, quests: list, cfg: TreeConfig, device: torch.device) -> dict:
    """Greedy success rate and mean generated tokens per episode, in grpo_mini.evaluate's format."""
    model.eval()
    fmt = EpisodeFormat(tokenizer)
    episodes = []
    for start in range(0, len(quests), cfg.eval_batch_size):
        chunk = [Episode(q, tree=0) for q in quests[start:start + cfg.eval_batch_size]]
        run_episodes(model, fmt, chunk, cfg, device, next_node=[0], greedy=True)
        episodes += chunk
    sample = " | ".join(tokenizer.decode(t, skip_special_tokens=True).strip() for t in episodes[0].turns)
    return {"accuracy": sum(e.reward for e in episodes) / len(episodes),
            "mean_length": sum(e.generated_tokens for e in episodes) / len(episodes), "sample": sample}


def build_quests(cfg: TreeConfig) -> tuple:
    return make_quest_split(cfg.seed, cfg.num_train_problems, cfg.num_eval_problems, hops=cfg.hops,
                            people=cfg.people_per_world, hinted_share=cfg.hinted_share)


TREE_LOG_KEYS = [("turns", "turns", "{:.2f}"), ("rows_per_prompt", "rows", "{:g}"), ("mixed_trees", "mixed", "{:.2f}")]
TREE_HOOKS = dict(advantage_fn=tree_advantage_fn, rollout_fn=multi_turn_rollout, evaluate_fn=evaluate_episodes,
                  task_fn=build_quests, extra_log_keys=TREE_LOG_KEYS)

if __name__ == "__main__":
    sys.exit(main(TreeConfig, **TREE_HOOKS))
