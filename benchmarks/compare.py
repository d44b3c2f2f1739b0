"""benchmarks/compare.py: GRPO, SEED-GRPO, GFPO-shortest and GFPO-token-efficiency, same model, task, seeds and steps.

    python benchmarks/compare.py --seeds 0 1 2            # docs/RESULTS.md: CPU preset, 3 seeds
    python benchmarks/compare.py                          # one seed
    python benchmarks/compare.py --preset gpu --seeds 0 1 2
    python benchmarks/compare.py --set max_steps=2 num_eval_problems=4 --methods grpo gfpo_shortest   # quick look
    python benchmarks/compare.py --set baseline=leave_one_out           # any training flag, for every method

Each method runs through its own script (`python grpo_mini.py ...`, `python seed_grpo.py ...`,
`python gfpo.py ...`) in a subprocess. The training code is not re-implemented here. This file only reads
back each run's metrics.jsonl. It writes, under --output_dir:
    results.md    one row per method, mean ± std over seeds: held-out accuracy before -> after, held-out mean
                  completion length before -> after, ELR against the GRPO run of the same seed (reference length: the
                  untrained model's), mean semantic entropy (SEED-GRPO), completion tokens sampled vs trained,
                  wall time
    curves.png    training reward, training completion length, held-out accuracy and held-out length per step:
                  each method's mean over seeds, with a band of ± one std
    summary.json  the settings, and every number of the table per method AND per seed
matplotlib is optional: without it the table is written and a one-line hint is printed.

How the methods are made comparable, as the GFPO paper compares them (arXiv 2508.09726):
    - the same prompts per step and the same steps for every method;
    - GFPO samples G' = 2G completions per prompt and keeps k = G, so it learns from as many completions as GRPO
      but pays for twice the sampling: the table's "tokens sampled / trained" column shows that cost;
    - the reward is the signed one (+1 / -1), the papers' range, with which token efficiency separates wrong
      answers by length. The CPU preset's task is the one-step arithmetic task, on which GRPO learns at this size;
      the two-step task (`--set task=multistep`) is too hard for SmolLM2-135M (docs/RESULTS.md has the numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gfpo import excess_length_reduction  # noqa: E402

METHODS = {  # name -> (script, flags that make the method)
    "grpo": ("grpo_mini.py", []),
    "seed_grpo": ("seed_grpo.py", []),
    "gfpo_shortest": ("gfpo.py", ["--filter_metric", "shortest"]),
    "gfpo_token_efficiency": ("gfpo.py", ["--filter_metric", "token_efficiency"]),
    # the multi-turn tool-use task of tree_grpo.py: chains (the baseline) and trees, with the tree preset
    "chain_multiturn": ("tree_grpo.py", ["--no-tree"]),
    "tree_grpo": ("tree_grpo.py", []),
}
PRESETS = {  # flags shared by every method; GFPO then doubles num_generations and keeps the original G
    "cpu": {"task": "arithmetic", "reward": "signed", "max_steps": 20, "prompts_per_step": 4, "num_generations": 8,
            "max_completion_length": 64, "num_eval_problems": 64, "eval_every": 5},
    "tree": {},  # tree_grpo.py's own defaults (a 15-minute CPU run each); its methods ignore the task flags
    "gpu": {"task": "multistep", "reward": "signed", "max_steps": 200, "prompts_per_step": 16, "num_generations": 8,
            "max_completion_length": 256, "num_eval_problems": 256, "eval_every": 20,
            "max_tokens_per_micro_batch": 16384},
}


def method_flags(method: str, settings: dict) -> list:
    """The command-line flags for one method under the shared settings."""
    settings = dict(settings)
    if method.startswith("gfpo"):
        settings["num_remains_in_group"] = settings["num_generations"]  # keep k = G ...
        settings["num_generations"] = 2 * settings["num_generations"]  # ... of G' = 2G (16 and 8 by default)
    flags = []
    for key, value in settings.items():
        if isinstance(value, bool):  # boolean flags take no value: --dynamic_sampling / --no-dynamic_sampling
            flags.append(f"--{key}" if value else f"--no-{key}")
        else:
            flags += [f"--{key}", str(value)]
    return flags + METHODS[method][1]


def run_method(method: str, seed: int, settings: dict, out_dir: Path) -> dict:
    """Train one method with one seed in a subprocess; return its metrics records and wall time."""
    run_dir = out_dir / f"{method}_seed{seed}"
    command = [sys.executable, METHODS[method][0], *method_flags(method, settings), "--seed", str(seed),
               "--output_dir", str(run_dir), "--no-save_model", "--save_every", "0", "--overwrite"]
    print(f"[compare] {method} seed {seed}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    (out_dir / f"{method}_seed{seed}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"error: {method} seed {seed} failed (exit {result.returncode}); see its log: "
                         f"{out_dir / f'{method}_seed{seed}.log'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"[compare] {method} seed {seed}: {result.stdout.strip().splitlines()[-1]} ({wall:.0f} s)", flush=True)
    return {"records": records, "wall_s": wall}


def run_summary(run: dict) -> dict:
    """The per-run numbers of the table, from its metrics.jsonl records."""
    evals = [r for r in run["records"] if "eval_accuracy" in r]
    steps = [r for r in run["records"] if "reward" in r]
    entropies = [r["semantic_entropy"] for r in steps if r.get("semantic_entropy") is not None]
    return {
        "acc_before": evals[0]["eval_accuracy"], "acc_after": evals[-1]["eval_accuracy"],
        "len_before": evals[0]["eval_completion_len"], "len_after": evals[-1]["eval_completion_len"],
        "train_len_first": statistics.mean(r["completion_len"] for r in steps[:3]) if steps else None,
        "train_len_last": statistics.mean(r["completion_len"] for r in steps[-3:]) if steps else None,
        "grad_norm": statistics.mean(r["grad_norm"] for r in steps if r.get("grad_norm") is not None)
        if any(r.get("grad_norm") is not None for r in steps) else None,
        "mean_se": statistics.mean(entropies) if entropies else None,
        "tokens_sampled": sum(r["tokens_sampled"] for r in steps),
        "tokens_trained": sum(r["tokens_trained"] for r in steps),
        "wall_s": run["wall_s"],
    }


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def build_table(summaries: dict, seeds: list) -> str:
    """Markdown table, one row per method, mean +- std over seeds."""
    lines = ["| method | held-out acc before -> after | held-out length before -> after (tokens) | ELR vs GRPO | "
             "mean SE (nats) | mean grad norm | tokens sampled / trained | wall s |", "|" + "---|" * 8]
    for method, per_seed in summaries.items():
        elr = []
        for seed, s in zip(seeds, per_seed):
            grpo = summaries.get("grpo", [None] * len(seeds))[seeds.index(seed)]
            try:  # reference length: the untrained model's, measured before step 1 of the GRPO run
                elr.append(excess_length_reduction(grpo["len_after"], s["len_after"], grpo["len_before"])
                           if grpo and method != "grpo" else None)
            except ValueError:
                elr.append(None)
        col = lambda key: [s[key] for s in per_seed]  # noqa: E731
        lines.append(
            f"| {method} | {mean_std(col('acc_before'))} -> {mean_std(col('acc_after'))} | "
            f"{mean_std(col('len_before'))} -> {mean_std(col('len_after'))} | {mean_std(elr)} | "
            f"{mean_std(col('mean_se'))} | {mean_std(col('grad_norm'))} | {mean_std(col('tokens_sampled'))} / "
            f"{mean_std(col('tokens_trained'))} | {mean_std(col('wall_s'))} |")
    return "\n".join(lines)


def curve(per_seed: list, key: str) -> tuple:
    """(steps, mean, std) of one metric over seeds, at the steps where every seed logged it."""
    by_step: dict = {}
    for run in per_seed:
        for r in run["records"]:
            if r.get(key) is not None:
                by_step.setdefault(r["step"], []).append(r[key])
    steps = [s for s in sorted(by_step) if len(by_step[s]) == len(per_seed)]
    means = [statistics.mean(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, stds


COMPARE_PANELS = [("reward", "training reward (mean of the step's samples)"),
                  ("completion_len", "training completion length (tokens)"),
                  ("eval_accuracy", "held-out greedy accuracy"),
                  ("eval_completion_len", "held-out mean completion length (tokens)")]


def plot_curves(runs: dict, path: Path, panels: list = COMPARE_PANELS) -> bool:
    """One panel per (metrics key, title): per-step curves, each method's mean over seeds with a ± one std band.
    runs: {label: [{"records": metrics.jsonl records}, ...one per seed]}. False when matplotlib is missing.
    benchmarks/plot_run.py draws a single run with it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for axis, (key, title) in zip(axes, panels):
        for method, per_seed in runs.items():
            steps, means, stds = curve(per_seed, key)
            line, = axis.plot(steps, means, marker="o" if key.startswith("eval") else None, label=method)
            axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.15)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def parse_overrides(pairs: list) -> dict:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set expects KEY=VALUE pairs (got {pair!r})")
        if value.lower() in ("true", "false"):  # "true" -> True: a boolean flag
            settings[key] = value.lower() == "true"
            continue
        for kind in (int, float, str):  # "2" -> 2, "3e-5" -> 3e-05, "DIR" -> "DIR"
            try:
                settings[key] = kind(value)
                break
            except ValueError:
                continue
    return settings


def check_before_running(methods: list, settings: dict, out_dir: Path, overwrite: bool) -> None:
    """One line, before any run starts: a --set key that is not a flag of a chosen method's script, or earlier
    results in --output_dir that this run would replace (without --overwrite)."""
    import gfpo
    import grpo_mini
    import seed_grpo
    import tree_grpo

    configs = {"grpo_mini.py": grpo_mini.Config, "seed_grpo.py": seed_grpo.SeedConfig, "gfpo.py": gfpo.GFPOConfig,
               "tree_grpo.py": tree_grpo.TreeConfig}
    for method in methods:
        script = METHODS[method][0]
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(configs[script])})
        if unknown:
            raise SystemExit(f"error: --set {unknown[0]}: not a flag of {script} (method {method}); "
                             f"`python {script} --help` lists them")
    earlier = [name for name in ("results.md", "summary.json") if (out_dir / name).exists()]
    if earlier and not overwrite:
        raise SystemExit(f"error: --output_dir {out_dir} already holds results ({', '.join(earlier)}): pass "
                         f"--overwrite to replace them, or choose another --output_dir")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS)[:4])  # not the tree's
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a setting for every method, e.g. max_steps=2 model=DIR")
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --output_dir")
    args = parser.parse_args()
    settings = {**PRESETS[args.preset], **parse_overrides(args.set)}
    out_dir = Path(args.output_dir)
    check_before_running(args.methods, settings, out_dir, args.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {m: [run_method(m, seed, settings, out_dir) for seed in args.seeds] for m in args.methods}
    summaries = {m: [run_summary(r) for r in per_seed] for m, per_seed in runs.items()}
    table = build_table(summaries, args.seeds)
    header = (f"preset {args.preset}, seeds {args.seeds}, settings {settings}\n"
              f"(mean ± std over seeds where there are several)\n\n")
    (out_dir / "results.md").write_text(header + table + "\n")
    (out_dir / "summary.json").write_text(json.dumps({
        "settings": settings, "seeds": args.seeds, "method_flags": {m: method_flags(m, settings) for m in runs},
        "per_seed": {m: dict(zip(map(str, args.seeds), per_seed)) for m, per_seed in summaries.items()}}, indent=2))
    print("\n" + table)
    if plot_curves(runs, out_dir / "curves.png"):
        print(f"\nwrote {out_dir / 'results.md'} and {out_dir / 'curves.png'}")
    else:
        print(f"\nwrote {out_dir / 'results.md'}; for the plot, pip install matplotlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
