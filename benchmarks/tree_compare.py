"""benchmarks/tree_compare.py: Tree-GRPO against chains at an equal token budget, with the tree's credit isolated.

    python benchmarks/tree_compare.py probe              # the untrained model on candidate settings (about 10 min)
    python benchmarks/tree_compare.py --seeds 0 1 2 3 4 5 --reuse   # the paired comparison (resumable)
    python benchmarks/tree_compare.py --seeds 0 1 2 3 4 5 --methods tree_grpo chains_equal_tokens --reuse  # no ablation
    python benchmarks/tree_compare.py --set max_steps=2 num_eval_problems=4 --output_dir runs/tree_quick   # a look

Why. Tree-GRPO's paper (arXiv 2509.21240) claims two things: at the same number of generated tokens, sharing turn
prefixes gives more trajectories; and the rows that share a turn give that turn step-level credit from outcome
rewards alone. On tree_grpo.py's default task every method reaches 1.000 held-out success within 16 steps, and the
budgets of that comparison were never equal, so neither claim could show (docs/RESULTS.md). This script runs, on a
harder setting of the same tool task (HARD: three hops among six people, a quarter of the worlds hinted):
    tree_grpo            Tree-GRPO as tree_grpo.py defines it (M = 2, N = 2, L = 1, K = 3; A = A_inter + A_intra);
    chains_equal_tokens  chain GRPO at a token budget per step fixed before any run (--budget, BUDGET: what the
                         untrained model's tree rollouts cost a step): chains are sampled one per prompt at a time
                         until the step has spent it (tree_grpo.py --tokens_per_step);
    tree_inter           the ablation: tree rollouts with the chains' advantage (A_inter alone, over the prompt's
                         leaves). tree_inter vs chains: what the rollout adds; tree_grpo vs tree_inter: what the
                         tree's own credit, A_intra, adds.
It writes, under --output_dir: results.md (held-out success before -> after, the area under success against
generated tokens, tokens per step, rows per prompt, per seed too; with several seeds, each pair's paired difference
with its 95% interval and Wilcoxon p, benchmarks/paired.py), summary.json (every number), curves.png (held-out
success against cumulative generated tokens and against steps, mean over seeds with a ± one std band), and
paired.png (one line per seed). Tree-GRPO's runs also log the share of trees whose leaves disagree (`mixed`): where
no tree is mixed, A_intra is 0 and the tree's own credit cannot matter.

What was seen before the fixed budget (docs/RESULTS.md, 3 seeds): each run either finds the third search and solves
nearly every held-out question within 8-16 steps, or stays at the hinted questions (0.06-0.28); the chains won seed
0, the trees seed 1, neither seed 2, and the A_inter-only trees ended where Tree-GRPO did in every seed. With the fixed
budget, 6 seeds and 256 held-out questions (benchmarks/results/paired_trees_256): no pair significantly different; the
trees and the chains each found the third search in three seeds, never the same three.

`probe` measures the untrained model on each candidate setting before any training: the success of sampled episodes
(4 chains per question, at the training temperature), the share of mixed groups (some right, some wrong: the only
groups GRPO learns from), greedy success, and what a tree rollout costs in chains' tokens. The issue's rule: pick a
setting whose sampled success is low but not zero, about 5-25%.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tree_grpo  # noqa: E402
from benchmarks.cli import at_least, pyplot, run_main, save_figure  # noqa: E402
from benchmarks.compare import mean_std, parse_overrides, plan_run, run_method  # noqa: E402

# The harder setting, fixed from `probe` before any training run (docs/RESULTS.md has the probe's table). One slack turn
# as in the default (4 turns for 2 hops); max_completion_length = max_turns x max_turn_tokens, dr_grpo's normaliser.
# 256 held-out questions (issue 35's protocol); the first comparison, benchmarks/results/paired_trees, had 32 (reproduce
# it with --set num_eval_problems=32).
HARD = {"hops": 3, "people_per_world": 6, "hinted_share": 0.25, "max_turns": 5, "max_completion_length": 120,
        "max_steps": 24, "prompts_per_step": 4, "num_eval_problems": 256, "eval_every": 8}
CHAINS_START = 3  # the chains' first wave per prompt under the budget; a tree costs more than 3 chains (probe)
# The chains' token budget per step, fixed before any run (issue 35): what a step of Tree-GRPO's rollouts costs on HARD
# with the untrained model, from the probe (4 prompts x a tree of 4.74 chains x 19.1 tokens a chain = 362). Until
# 2026-12-05 each seed's chains got that seed's tree run's mean instead, so their budget moved with what the trees
# learned (363-879 tokens a step). The trees keep their fixed shape; results.md shows what they actually spent.
BUDGET = 360
METHODS = ["tree_grpo", "chains_equal_tokens", "tree_inter"]
PAIRS = [("tree_grpo", "chains_equal_tokens"), ("tree_grpo", "tree_inter"), ("tree_inter", "chains_equal_tokens")]
PAIRED_METRICS = [("success_after", "final held-out success"), ("auc", "success over the first B tokens (AUC)")]
PROBE_SETTINGS = {  # name -> make_quest's setting; "2h4p50" is the default: 2 hops, 4 people, 50% hinted
    "2h4p50": dict(hops=2, people=4, hinted_share=0.5),
    "2h6p25": dict(hops=2, people=6, hinted_share=0.25),
    "3h4p50": dict(hops=3, people=4, hinted_share=0.5),
    "3h6p50": dict(hops=3, people=6, hinted_share=0.5),
    "3h6p25": dict(hops=3, people=6, hinted_share=0.25),
    "3h6p0": dict(hops=3, people=6, hinted_share=0.0),
    "4h6p25": dict(hops=4, people=6, hinted_share=0.25),
}


# ----------------------------------------------------------------------------------------------------------------------
# 1. The numbers of a run: success against generated tokens
# ----------------------------------------------------------------------------------------------------------------------


def success_vs_tokens(records: list) -> list:
    """[(cumulative generated tokens, held-out success)] at each eval of a run's metrics.jsonl records. Tokens are
    those of the training rollouts up to and including the eval's step (every leaf, trained or not); the greedy
    evaluation's own tokens are not counted, being the same for every method.
    Example: step records with 100 and 150 tokens, evals at steps 0 and 2 -> [(0, acc0), (250, acc2)]."""
    points, spent = [], 0
    for record in records:  # step records come before the eval of the same step
        if "reward" in record:
            spent += record["tokens_sampled"]
        if record.get("eval_accuracy") is not None:
            points.append((spent, record["eval_accuracy"]))
    return points


def success_token_auc(points: list, budget: float) -> float:
    """The mean held-out success over the first `budget` generated tokens: the area under the success-vs-tokens
    curve (linear between evals) from 0 to budget, divided by budget. Comparing runs at one budget (the smallest total
    of the runs compared) rewards learning early in tokens, not just ending high.
        points [(0, 0.2), (100, 0.6), (200, 1.0)], budget 150:
        area = (0.2 + 0.6) / 2 * 100 + (0.6 + 0.8) / 2 * 50 = 40 + 35 = 75 -> 75 / 150 = 0.5"""
    if budget <= 0 or not points or points[0][0] != 0:
        raise ValueError("need points starting at 0 tokens and a budget > 0")
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= budget:
            break
        end = min(x1, budget)
        y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0) if x1 > x0 else y1
        area += (y0 + y_end) / 2 * (end - x0)
    if points[-1][0] < budget:  # the run stopped before the budget: its last success held
        area += points[-1][1] * (budget - points[-1][0])
    return area / budget


def run_numbers(run: dict) -> dict:
    steps = [r for r in run["records"] if "reward" in r]
    points = success_vs_tokens(run["records"])
    return {"success_before": points[0][1], "success_after": points[-1][1], "points": points,
            "tokens_total": points[-1][0], "tokens_per_step": statistics.mean(r["tokens_sampled"] for r in steps),
            "rows_per_prompt": statistics.mean(r["rows_per_prompt"] for r in steps),
            "train_success": statistics.mean(r["accuracy"] for r in steps[-4:]), "wall_s": run["wall_s"]}


# ----------------------------------------------------------------------------------------------------------------------
# 2. The comparison
# ----------------------------------------------------------------------------------------------------------------------


def method_settings(method: str, settings: dict, budget: int) -> dict:
    """The chains get the fixed budget; the trees their own shape."""
    if method == "chains_equal_tokens":
        return {**settings, "num_generations": CHAINS_START, "tokens_per_step": budget}
    return settings


def compare(seeds: list, settings: dict, out_dir: Path, reuse: bool, budget: int = BUDGET,
            methods: list = METHODS) -> dict:
    """Train the methods for every seed; return {method: [run, ...one per seed]} with each run's records and
    numbers (main has checked with plan_run that nothing it was not asked to replace is in the way)."""
    runs = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            runs[m].append(run_method(m, seed, method_settings(m, settings, budget), out_dir, reuse))
    for per_seed in runs.values():
        for run in per_seed:
            run["numbers"] = run_numbers(run)
    for i in range(len(seeds)):  # the AUC of every method at one budget per seed: the smallest total of its methods
        budget = min(runs[m][i]["numbers"]["tokens_total"] for m in methods)
        for m in methods:
            runs[m][i]["numbers"]["auc"] = success_token_auc(runs[m][i]["numbers"]["points"], budget)
            runs[m][i]["numbers"]["auc_budget"] = budget
    return runs


def results_table(runs: dict, seeds: list, settings: dict, budget: int) -> str:
    col = lambda m, key: [r["numbers"][key] for r in runs[m]]  # noqa: E731
    mixed = [r.get("mixed_trees") for run in runs.get("tree_grpo", []) for r in run["records"] if "reward" in r]
    lines = [f"settings {settings}, seeds {seeds}; the chains' budget {budget} tokens a step, fixed before the runs; "
             f"mean ± std over seeds; trees whose leaves disagree (A_intra != 0): "
             f"{mean_std([m for m in mixed if m is not None])} of Tree-GRPO's trees a step", "",
             "| method | held-out success before -> after | mean success over the first B tokens (AUC) | tokens per "
             "step | rows per prompt | training success, last 4 steps | wall s |", "|" + "---|" * 7]
    for m in runs:
        lines.append(f"| {m} | {mean_std(col(m, 'success_before'))} -> {mean_std(col(m, 'success_after'))} | "
                     f"{mean_std(col(m, 'auc'))} | {mean_std(col(m, 'tokens_per_step'))} | "
                     f"{mean_std(col(m, 'rows_per_prompt'))} | {mean_std(col(m, 'train_success'))} | "
                     f"{mean_std(col(m, 'wall_s'))} |")
    lines += ["", "B: per seed, the smallest total of generated tokens among the runs of that seed.", "",
              "| seed | method | held-out success at each eval (cumulative tokens) | AUC | tokens per step |",
              "|---|---|---|---|---|"]
    for i, seed in enumerate(seeds):
        for m in runs:
            n = runs[m][i]["numbers"]
            evals = " -> ".join(f"{acc:.3f} ({tokens / 1000:.1f}k)" for tokens, acc in n["points"])
            lines.append(f"| {seed} | {m} | {evals} | {n['auc']:.3f} (B = {n['auc_budget'] / 1000:.1f}k) | "
                         f"{n['tokens_per_step']:.0f} |")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> bool:
    """Held-out success against cumulative generated tokens and against steps: each method's mean over seeds (the x
    of the tokens panel is the seeds' mean at each eval), with a ± one std band of success."""
    plt = pyplot()
    if plt is None:
        return False
    figure, (by_tokens, by_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, per_seed in runs.items():
        curves = [r["numbers"]["points"] for r in per_seed]
        evals = min(len(c) for c in curves)
        xs = [statistics.mean(c[j][0] for c in curves) for j in range(evals)]
        ys = [statistics.mean(c[j][1] for c in curves) for j in range(evals)]
        sd = [statistics.stdev(c[j][1] for c in curves) if len(curves) > 1 else 0.0 for j in range(evals)]
        steps = [r["step"] for r in per_seed[0]["records"] if r.get("eval_accuracy") is not None][:evals]
        for axis, x in ((by_tokens, xs), (by_steps, steps)):
            line, = axis.plot(x, ys, marker="o", label=m)
            axis.fill_between(x, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                              color=line.get_color(), alpha=0.15)
    by_tokens.set_xlabel("generated tokens, cumulative (training rollouts)")
    by_steps.set_xlabel("step")
    for axis in (by_tokens, by_steps):
        axis.set_ylabel("held-out success (greedy)")
        axis.grid(alpha=0.3)
    by_tokens.legend()
    return save_figure(plt, figure, path)


# ----------------------------------------------------------------------------------------------------------------------
# 3. The probe: the untrained model on each candidate setting
# ----------------------------------------------------------------------------------------------------------------------


def probe(model_name: str, questions: int, seed: int, names: list) -> dict:
    import grpo_mini as gm

    cfg = tree_grpo.TreeConfig(tree=False, num_generations=4, max_turns=6, max_completion_length=144, seed=seed)
    device = gm.pick_device(cfg.device)
    model, tokenizer = gm.load_model_and_tokenizer(model_name)
    model.to(device).eval()
    sampler = gm.make_sampling_model(model, gm.pick_dtype(cfg.dtype, device))  # what train() samples from
    results = {}
    for name in names:
        setting, start = PROBE_SETTINGS[name], time.time()
        random.seed(seed)
        torch.manual_seed(seed)
        quests = tree_grpo.make_quest_split(seed, questions, 0, **setting)[0]
        turns = dict(max_turns=setting["hops"] + 2)  # one slack turn, as HARD and the default have
        chain_cfg = tree_grpo.TreeConfig(**{**vars(cfg), **turns})
        tree_cfg = tree_grpo.TreeConfig(**{**vars(cfg), **turns, "tree": True})
        with torch.no_grad():
            chains, chain_info = tree_grpo.multi_turn_rollout(model, tokenizer, quests, chain_cfg, device, sampler)
            trees, tree_info = tree_grpo.multi_turn_rollout(model, tokenizer, quests, tree_cfg, device, sampler)
            greedy = tree_grpo.evaluate_episodes(sampler, tokenizer, quests, chain_cfg, device)
        grouped = chains.rewards.view(-1, chain_cfg.num_generations)
        mixed = ((grouped.max(dim=1).values > 0) & (grouped.min(dim=1).values == 0)).float().mean().item()
        results[name] = {
            "setting": setting, "sampled_success": chain_info["accuracy"], "mixed_groups": mixed,
            "greedy_success": greedy["accuracy"], "turns": chain_info["turns"],
            "tokens_per_chain": chain_info["tokens_sampled"] / chains.rewards.numel(),
            "tree_cost_in_chains": tree_info["tokens_sampled"] / len(quests) / (
                chain_info["tokens_sampled"] / chains.rewards.numel()),
            "tree_sampled_success": tree_info["accuracy"], "seconds": time.time() - start}
        r = results[name]
        print(f"{name}: sampled success {r['sampled_success']:.3f}, mixed groups {r['mixed_groups']:.2f}, greedy "
              f"{r['greedy_success']:.3f}, turns {r['turns']:.2f}, tokens per chain {r['tokens_per_chain']:.1f}, a "
              f"tree costs {r['tree_cost_in_chains']:.2f} chains ({r['seconds']:.0f} s)", flush=True)
    return results


def probe_table(results: dict, questions: int, seed: int) -> str:
    lines = [f"{questions} training questions of each setting, seed {seed}; 4 chains per question at temperature 0.7 "
             "and one tree (M = 2, N = 2, L = 1) per question; greedy: one episode per question", "",
             "| setting (hops, people, hinted %) | sampled success | mixed groups | greedy success | turns | "
             "tokens per chain | a tree costs (chains) |", "|" + "---|" * 7]
    for name, r in results.items():
        lines.append(f"| {name} | {r['sampled_success']:.3f} | {r['mixed_groups']:.2f} | {r['greedy_success']:.3f} | "
                     f"{r['turns']:.2f} | {r['tokens_per_chain']:.1f} | {r['tree_cost_in_chains']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=["compare", "probe"], default="compare")
    parser.add_argument("--seeds", nargs="+", type=at_least(0), default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a setting of every run (tree_grpo.py's flags), e.g. max_steps=2")
    parser.add_argument("--output_dir", default=None, help="default: runs/tree_compare (probe: runs/tree_probe)")
    parser.add_argument("--reuse", action="store_true", help="keep each run --output_dir already holds finished with "
                        "the same flags, and train only the others")
    parser.add_argument("--budget", type=at_least(1), default=BUDGET, help="the chains' generated tokens per step, "
                        "fixed before the runs (the default: the untrained trees' cost on HARD, from the probe)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="the methods to run (the "
                        "issue's comparison is tree_grpo against chains_equal_tokens; tree_inter is the ablation)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results and runs already in "
                        "--output_dir (with --reuse: only the runs that did not finish with the same flags)")
    parser.add_argument("--model", default=tree_grpo.TreeConfig.model, help="probe: the model to measure")
    parser.add_argument("--questions", type=at_least(1), default=32, help="probe: questions per setting")
    parser.add_argument("--settings", nargs="+", choices=list(PROBE_SETTINGS), default=list(PROBE_SETTINGS),
                        help="probe: the settings to measure (2h4p50: 2 hops, 4 people, 50%% hinted; the default)")
    args = parser.parse_args()
    out_dir = Path(args.output_dir or ("runs/tree_probe" if args.mode == "probe" else "runs/tree_compare"))
    earlier = [name for name in ("results.md", "summary.json") if (out_dir / name).exists()]
    if earlier and not args.overwrite:
        raise SystemExit(f"error: --output_dir {out_dir} already holds results ({', '.join(earlier)}): pass "
                         f"--overwrite to replace them (with --reuse to keep its finished runs), or choose another "
                         f"--output_dir")
    if args.mode == "probe":
        results = probe(args.model, args.questions, args.seeds[0], args.settings)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = probe_table(results, args.questions, args.seeds[0])
        (out_dir / "results.md").write_text(text + "\n")
        (out_dir / "summary.json").write_text(json.dumps(results, indent=1))
        print("\n" + text + f"\n\nwrote {out_dir / 'results.md'}")
        return 0
    settings = {**HARD, **parse_overrides(args.set)}
    try:
        tree_grpo.TreeConfig(**settings).validate()
    except (tree_grpo.ConfigError, TypeError) as err:
        raise SystemExit(f"error: --set: {err}")
    for seed in args.seeds:  # before any run: nothing of an earlier comparison is replaced unless asked
        for method in args.methods:
            plan_run(method, seed, method_settings(method, settings, args.budget), out_dir, args.overwrite, args.reuse)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = compare(args.seeds, settings, out_dir, args.reuse, args.budget, args.methods)
    text = results_table(runs, args.seeds, settings, args.budget)
    paired_numbers = {}
    if len(args.seeds) > 1:
        from benchmarks.paired import paired_tables, plot_paired

        values = {m: {key: [r["numbers"][key] for r in runs[m]] for key, _ in PAIRED_METRICS} for m in runs}
        pairs = [pair for pair in PAIRS if set(pair) <= set(runs)]
        paired_text, paired_numbers = paired_tables(values, pairs, PAIRED_METRICS)
        drawn = plot_paired(values, pairs, "success_after", "final held-out success", out_dir / "paired.png")
        text += (f"\n\nPaired over seeds {args.seeds} (method - baseline at the same seed; 95% t intervals; two-sided "
                 f"Wilcoxon signed-rank p){'; paired.png draws it' if drawn else ''}:\n\n{paired_text}")
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "summary.json").write_text(json.dumps(
        {"settings": settings, "seeds": args.seeds, "chains_start": CHAINS_START, "budget": args.budget,
         "paired": paired_numbers,
         "per_seed": {m: {str(s): r["numbers"] for s, r in zip(args.seeds, per_seed)} for m, per_seed in runs.items()}},
        indent=1))
    drawn = plot(runs, out_dir / "curves.png")
    print("\n" + text + f"\n\nwrote {out_dir / 'results.md'}" + (f" and {out_dir / 'curves.png'}" if drawn else
                                                                 "; for the plot, pip install matplotlib"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
