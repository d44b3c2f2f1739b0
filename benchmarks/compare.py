"""benchmarks/compare.py: GRPO, SEED-GRPO, GFPO-shortest and GFPO-token-efficiency, same model, task, seeds and steps.

    python benchmarks/compare.py --seeds 0 1 2            # docs/RESULTS.md: CPU preset, 3 seeds
    python benchmarks/compare.py                          # one seed
    python benchmarks/compare.py --preset gpu --seeds 0 1 2
    python benchmarks/compare.py --set max_steps=2 num_eval_problems=4 --methods grpo gfpo_shortest   # quick look
    python benchmarks/compare.py --set baseline=leave_one_out           # any training flag, for every method
    python benchmarks/cold_start.py && python benchmarks/compare.py --preset cold_start --seeds 0 1 2
        # GFPO's regime: GRPO and the three GFPO variants from a verbose fine-tuned checkpoint (docs/RESULTS.md)
    python benchmarks/compare.py --seeds 0 1 2 --methods grpo grpo_2g gfpo_shortest gfpo_token_efficiency
        # with the control that samples G' = 2G and trains on all: is it GFPO's filter or its larger sample?
    python benchmarks/compare.py --preset paired --seeds 0 1 2 3 4 5 6 7 --reuse --output_dir DIR
        # the paired comparison of docs/RESULTS.md (issue 35): 8 methods, controls included, 256 held-out problems

Each method runs through its own script (`python grpo_mini.py ...`, `python seed_grpo.py ...`,
`python gfpo.py ...`) in a subprocess. The training code is not re-implemented here. This file only reads
back each run's metrics.jsonl. It writes, under --output_dir:
    results.md    one row per method, mean ± std over seeds: held-out accuracy before -> after, held-out mean
                  completion length before -> after, ELR against the GRPO run of the same seed (reference length:
                  the model's at step 0), mean semantic entropy (SEED-GRPO), completion tokens sampled vs trained,
                  wall time, the length of the right and of the wrong held-out answers; with --preset
                  cold_start, each answer style's share (benchmarks/cold_start.py) at the first and last eval; and
                  the length at matched accuracy: for each method and accuracy level, the held-out length at the
                  first eval that reaches it, and the completion tokens sampled until then
    curves.png    training reward, training completion length, held-out accuracy and held-out length per step:
                  each method's mean over seeds, with a band of ± one std (cold_start: the style shares too)
    accuracy_vs_length.png   held-out accuracy against held-out length, one curve per method through its evals
    summary.json  the settings, and every number of the table per method AND per seed
    paired.png    with several seeds: each method against GRPO and against its control, a line per seed
                  (benchmarks/paired.py; the paired differences, intervals and p-values are in results.md too), and
                  paired_METHOD.png for each method that has a control
--reuse keeps each finished run made with the same flags and, where --model is a local directory (the cold start's),
from the same weights: each run's cost.json records their SHA-256 beside its wall and CPU seconds.
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
import functools
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.cli import at_least, pyplot, run_main, save_figure  # noqa: E402
from benchmarks.cold_start import STYLES, classify_style  # noqa: E402
from gfpo import excess_length_reduction  # noqa: E402

METHODS = {  # name -> (script, flags that make the method)
    "grpo": ("grpo_mini.py", []),
    "seed_grpo": ("seed_grpo.py", []),
    "gfpo_shortest": ("gfpo.py", ["--filter_metric", "shortest"]),
    "gfpo_token_efficiency": ("gfpo.py", ["--filter_metric", "token_efficiency"]),
    "gfpo_adaptive": ("gfpo.py", ["--adaptive"]),  # k per prompt from its difficulty, shortest kept (the paper's)
    # GRPO at GFPO's sampling budget: G' = 2G completions per prompt, all of them trained on. It tells whether GFPO's
    # filter, or only its larger sample, shortens the answers.
    "grpo_2g": ("grpo_mini.py", []),
    # SEED-GRPO's controls: its factors permuted at random among the step's prompts (same step sizes, no link to
    # uncertainty), and the strength the authors' released code is reported to use (alpha_eff = 0.0417 / log G)
    "seed_shuffled": ("seed_grpo.py", ["--shuffle_factors"]),
    "seed_grpo_released": ("seed_grpo.py", ["--alpha", "0.0417"]),
    # DAPO's dynamic sampling (RIPT-VLA's "dynamic rejection"): zero-spread groups dropped and refilled
    "dynamic_sampling": ("grpo_mini.py", ["--dynamic_sampling"]),
    # the multi-turn tool-use task of tree_grpo.py: chains (the baseline) and trees, with the tree preset
    "chain_multiturn": ("tree_grpo.py", ["--no-tree"]),
    "tree_grpo": ("tree_grpo.py", []),
    # benchmarks/tree_compare.py's: chains at the trees' token budget (it adds --tokens_per_step), and the ablation
    "chains_equal_tokens": ("tree_grpo.py", ["--no-tree"]),
    "tree_inter": ("tree_grpo.py", ["--tree_advantage", "inter"]),
}
PRESETS = {  # flags shared by every method; GFPO then doubles num_generations and keeps the original G
    "cpu": {"task": "arithmetic", "reward": "signed", "max_steps": 20, "prompts_per_step": 4, "num_generations": 8,
            "max_completion_length": 64, "num_eval_problems": 64, "eval_every": 5},
    "tree": {},  # tree_grpo.py's own defaults (a 15-minute CPU run each); its methods ignore the task flags
    # from benchmarks/cold_start.py's verbose checkpoint, on its own task (sums of four amounts); run that first.
    # G = 4 (GFPO: G' = 8, k = 4) and 2 prompts per step keep the 12 runs of 3 seeds near 90 minutes on 2 CPU cores
    "cold_start": {"model": "runs/cold_start/model", "data": "runs/cold_start/problems.jsonl", "reward": "signed",
                   "max_steps": 30, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 160,
                   "num_eval_problems": 64, "eval_every": 10},
    "gpu": {"task": "multistep", "reward": "signed", "max_steps": 200, "prompts_per_step": 16, "num_generations": 8,
            "max_completion_length": 256, "num_eval_problems": 256, "eval_every": 20,
            "max_tokens_per_micro_batch": 16384},
}
for _preset in PRESETS.values():  # the constant learning rate their results in RESULTS.md were measured with; the
    _preset["lr_scheduler_type"] = "constant"  # scripts' default is linear decay since 2026-12-04
# The paired protocol (../shared/EXPERIMENTS.md, issue 35): today's defaults (linear decay), 256 held-out problems,
# evaluated at steps 0, 10 and 20; each method against its baseline over paired seeds (benchmarks/paired.py).
PRESETS["paired"] = {**PRESETS["cpu"], "lr_scheduler_type": "linear", "num_eval_problems": 256, "eval_every": 10}
PRESETS["paired_cold_start"] = {**PRESETS["cold_start"], "lr_scheduler_type": "linear", "num_eval_problems": 256,
                                "eval_every": 10}  # held out of the 1200 RL problems: at most a fifth, so 240
# The same, evaluated on cold_start.py's separate 256 held-out problems (all 1200 RL problems train).
PRESETS["paired_cold_start_256"] = {**PRESETS["paired_cold_start"], "eval_data": "runs/cold_start/eval_problems.jsonl"}
DEFAULT_METHODS = ["grpo", "seed_grpo", "gfpo_shortest", "gfpo_token_efficiency"]
PRESET_METHODS = {"cold_start": ["grpo", "gfpo_shortest", "gfpo_token_efficiency", "gfpo_adaptive"],
                  "tree": ["chain_multiturn", "tree_grpo"],
                  "paired": ["grpo", "grpo_2g", "seed_grpo", "seed_shuffled", "seed_grpo_released",
                             "gfpo_token_efficiency", "gfpo_shortest", "dynamic_sampling"],
                  "paired_cold_start": ["grpo", "grpo_2g", "gfpo_shortest", "gfpo_adaptive"]}
PRESET_METHODS["paired_cold_start_256"] = PRESET_METHODS["paired_cold_start"]
# Each comparison (method, its baseline): every method against GRPO, and the controls that could explain it away.
CONTROL_PAIRS = [("seed_grpo", "seed_shuffled"), ("seed_grpo", "seed_grpo_released"),
                 ("gfpo_token_efficiency", "grpo_2g"), ("gfpo_shortest", "grpo_2g"), ("gfpo_adaptive", "grpo_2g")]
PAIRED_METRICS = [("acc_after", "final held-out accuracy"), ("len_after", "final held-out length (tokens)")]


def method_flags(method: str, settings: dict) -> list:
    """The command-line flags for one method under the shared settings."""
    settings = dict(settings)
    if method.startswith("gfpo"):
        settings["num_remains_in_group"] = settings["num_generations"]  # keep k = G ...
    if method == "gfpo_adaptive":  # the paper's 8 / 8 / 6 / 4 of G' = 16, scaled to G
        G = settings["num_generations"]
        settings.update(k_very_hard=G, k_hard=G, k_medium=max(2, 3 * G // 4), k_easy=max(2, G // 2))
    if method.startswith("gfpo") or method == "grpo_2g":
        settings["num_generations"] = 2 * settings["num_generations"]  # ... of G' = 2G (16 and 8 by default)
    flags = []
    for key, value in settings.items():
        if isinstance(value, bool):  # boolean flags take no value: --dynamic_sampling / --no-dynamic_sampling
            flags.append(f"--{key}" if value else f"--no-{key}")
        else:
            flags += [f"--{key}", str(value)]
    return flags + METHODS[method][1]


def config_classes() -> dict:
    """Each training script's config class, by script name."""
    import gfpo
    import grpo_mini
    import seed_grpo
    import tree_grpo

    return {"grpo_mini.py": grpo_mini.Config, "seed_grpo.py": seed_grpo.SeedConfig, "gfpo.py": gfpo.GFPOConfig,
            "tree_grpo.py": tree_grpo.TreeConfig}


def stored_and_wanted(method: str, flags: list, run_dir: Path) -> tuple:
    """(run_dir's config.json, or None where there is none, and the config these flags give), both as JSON values.
    A flag added since the run was made is read at its default, which is what the run had (as --resume reads it).
    output_dir is left out of both: where a run's folder lies changes none of its numbers, so a results folder
    copied or moved elsewhere is reused, not trained again."""
    import grpo_mini
    import harness

    config_class = config_classes()[METHODS[method][0]]
    cfg = grpo_mini.parse_config(config_class, argv=flags)
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict):
        stored = json.loads(json.dumps(harness.with_defaults(stored, config_class)))
        stored.pop("output_dir", None)
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    wanted.pop("output_dir", None)
    return stored, wanted


def finished_run(method: str, flags: list, run_dir: Path) -> bool:
    """--reuse: whether run_dir already holds a finished run made with exactly these flags (its config.json equals
    the config the flags give, and its metrics.jsonl ends with the eval after the last step)."""
    return ended(run_dir, *stored_and_wanted(method, flags, run_dir))


def ended(run_dir: Path, stored, wanted) -> bool:
    """finished_run, given stored_and_wanted's pair; a run trained from a local --model directory whose weights have
    changed since, or on a --data file whose problems have (benchmarks/cold_start.py run again), did not end as this
    run would, and is trained again."""
    try:
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return False
    try:  # written by run_method beside each run; None for a hub model, and in runs made before 2026-12-06
        cost = json.loads((run_dir / "cost.json").read_text())
    except (OSError, ValueError):
        cost = {}
    same_data = "data_sha256" not in cost or cost["data_sha256"] == file_digest(wanted.get("data"))  # since 12-06
    return (stored == wanted and "eval_accuracy" in last and last["step"] == wanted["max_steps"]
            and cost.get("model_sha256") == model_digest(wanted["model"]) and same_data)


@functools.lru_cache(maxsize=None)
def model_digest(model: str):
    """SHA-256 over the weight files of a local --model directory (None for a hub id or a file), so that --reuse
    keeps a run only when it was trained from the same weights, not merely from the same path."""
    directory = ROOT / model
    if not directory.is_dir():
        return None
    return sha256_of(sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")))


@functools.lru_cache(maxsize=None)
def file_digest(path):
    """SHA-256 of a local --data file (None for none, or a hub name): a run trained on other problems at the same
    path (benchmarks/cold_start.py --num_rl_problems changed) is not reused. Runs made before this was recorded
    (before 2026-12-06, session 11) are judged by their flags and model alone."""
    if not path or not (ROOT / path).is_file():
        return None
    return sha256_of([ROOT / path])


def sha256_of(paths: list) -> str:
    """One SHA-256 over these files' bytes, in order, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def run_flags(method: str, seed: int, settings: dict, run_dir: Path) -> list:
    return [*method_flags(method, settings), "--seed", str(seed), "--output_dir", str(run_dir), "--no-save_model",
            "--save_every", "0", "--overwrite"]


def plan_run(method: str, seed: int, settings: dict, out_dir: Path, overwrite: bool, reuse: bool) -> str:
    """What this command does with one run's directory, decided before any run starts: "train" (empty, or allowed to
    be replaced) or "reuse". A directory that holds an earlier run is replaced only with --overwrite, or with --reuse
    when that run has exactly this run's flags and did not finish (this comparison, interrupted): else one line."""
    run_dir = out_dir / f"{method}_seed{seed}"
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "train"
    stored, wanted = stored_and_wanted(method, run_flags(method, seed, settings, run_dir), run_dir)
    if reuse and ended(run_dir, stored, wanted):
        return "reuse"
    if overwrite or (reuse and stored == wanted):
        return "train"
    raise SystemExit(f"error: {run_dir} holds an earlier run {'with other flags ' if reuse else ''}(nothing was "
                     f"changed): pass --reuse to keep finished runs made with the same flags, --overwrite to replace "
                     f"it, or choose another --output_dir")


def run_method(method: str, seed: int, settings: dict, out_dir: Path, reuse: bool = False) -> dict:
    """Train one method with one seed in a subprocess; return its metrics records and wall time (None for a run
    that --reuse found finished already). plan_run has checked, before the first run, that this may replace
    whatever its directory holds."""
    run_dir = out_dir / f"{method}_seed{seed}"
    flags = run_flags(method, seed, settings, run_dir)
    wall, cost = None, run_dir / "cost.json"  # the wall and CPU seconds of the run, kept beside it for --reuse
    if reuse and finished_run(method, flags, run_dir):
        print(f"[compare] {method} seed {seed}: reusing the finished run in {run_dir}", flush=True)
        wall = json.loads(cost.read_text())["wall_s"] if cost.is_file() else None
    else:
        print(f"[compare] {method} seed {seed}: {METHODS[method][0]} {' '.join(flags)}", flush=True)
        start, cpu_start = time.time(), children_cpu_seconds()
        result = subprocess.run([sys.executable, METHODS[method][0], *flags], cwd=ROOT, capture_output=True,
                                text=True)
        wall = time.time() - start
        cost.write_text(json.dumps({"wall_s": wall, "cpu_s": children_cpu_seconds() - cpu_start,  # and the allocator
                                    "ld_preload": os.environ.get("LD_PRELOAD"),  # (tcmalloc: the same numbers, faster)
                                    "model_sha256": model_digest(settings["model"]) if "model" in settings else None,
                                    "data_sha256": file_digest(settings.get("data"))}))
        (out_dir / f"{method}_seed{seed}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise SystemExit(f"error: {method} seed {seed} failed (exit {result.returncode}); see its log: "
                             f"{out_dir / f'{method}_seed{seed}.log'}")
        print(f"[compare] {method} seed {seed}: {result.stdout.strip().splitlines()[-1]} ({wall:.0f} s)", flush=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # each eval's cold-start answer styles, as keys that curve() can draw
        if "eval_completions" in record:
            record.update({f"style_{style}": share for style, share in style_shares(record).items()})
    return {"records": records, "wall_s": wall,
            "cpu_s": json.loads(cost.read_text())["cpu_s"] if cost.is_file() else None}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children (the training subprocesses)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def style_shares(record: dict) -> dict:
    """Each cold-start answer style's share of one eval's held-out completions (benchmarks/cold_start.py)."""
    styles = [classify_style(text) for text in record.get("eval_completions") or []]
    return {style: styles.count(style) / len(styles) if styles else None for style in STYLES}


def matched_accuracy(records: list, level: float) -> dict:
    """The first eval whose held-out accuracy reaches `level`: its eval length and the completion tokens sampled up
    to it (None where the run never gets there). Example: evals (step 0: 0.3, 40 tokens), (step 10: 0.55, 60),
    (step 20: 0.6, 80) with 1000 tokens sampled per step -> level 0.5: {"step": 10, "length": 60, "tokens": 10000}."""
    sampled = 0
    for record in records:  # in step order: step records add their tokens before the eval of the same step
        sampled += record.get("tokens_sampled") or 0
        if record.get("eval_accuracy") is not None and record["eval_accuracy"] >= level - 1e-9:
            return {"step": record["step"], "length": record["eval_completion_len"], "tokens": sampled}
    return {"step": None, "length": None, "tokens": None}


def run_summary(run: dict) -> dict:
    """The per-run numbers of the table, from its metrics.jsonl records."""
    evals = [r for r in run["records"] if "eval_accuracy" in r]
    steps = [r for r in run["records"] if "reward" in r]
    entropies = [r["semantic_entropy"] for r in steps if r.get("semantic_entropy") is not None]
    return {
        "acc_before": evals[0]["eval_accuracy"], "acc_after": evals[-1]["eval_accuracy"],
        "len_before": evals[0]["eval_completion_len"], "len_after": evals[-1]["eval_completion_len"],
        "right_len_after": evals[-1].get("eval_right_length"), "wrong_len_after": evals[-1].get("eval_wrong_length"),
        "styles": {r["step"]: {style: r.get(f"style_{style}") for style in STYLES} for r in evals},  # run_method's
        "evals": [(r["step"], r["eval_accuracy"], r["eval_completion_len"]) for r in evals],
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


def paired_section(summaries: dict, methods: list, seeds: list, out_dir: Path) -> tuple:
    """The paired comparisons (benchmarks/paired.py) as markdown, their numbers, and paired.png: every method
    against GRPO and against its control (CONTROL_PAIRS), on the final held-out accuracy and length; and
    paired_METHOD.png for each method with a control (SEED-GRPO: against GRPO, seed_shuffled and the released
    strength), the picture its README headline shows."""
    if len(seeds) < 2:
        return "", {}
    try:
        import scipy  # noqa: F401
    except ImportError:
        return "\n\nThe paired comparison needs scipy: pip install scipy", {}
    from benchmarks.paired import paired_tables, plot_paired

    values = {m: {key: [s[key] for s in summaries[m]] for key, _ in PAIRED_METRICS} for m in methods}
    pairs = [(m, "grpo") for m in methods if m != "grpo" and "grpo" in methods]
    pairs += [(m, b) for m, b in CONTROL_PAIRS if m in methods and b in methods]
    text, numbers = paired_tables(values, pairs, PAIRED_METRICS)
    drawn = plot_paired(values, pairs, "acc_after", "final held-out accuracy", out_dir / "paired.png")
    for method in dict.fromkeys(m for m, _ in CONTROL_PAIRS):  # and a picture per method that has a control:
        own = [(m, b) for m, b in pairs if m == method]        # against GRPO and against each control, side by side
        if drawn and len(own) > 1:
            plot_paired(values, own, "acc_after", "final held-out accuracy", out_dir / f"paired_{method}.png")
    drawn_note = "; paired.png draws it, and paired_METHOD.png each method with a control" if drawn else ""
    return (f"\n\nPaired over seeds {seeds} (each difference is method - baseline at the same seed; 95% t intervals; "
            f"two-sided Wilcoxon signed-rank p){drawn_note}:\n\n{text}"), numbers


def build_table(summaries: dict, seeds: list, styles: bool = False) -> str:
    """Markdown table, one row per method, mean +- std over seeds. With styles (the cold-start presets), a second
    table gives each answer style's share (benchmarks/cold_start.py) at the first and the last eval."""
    lines = ["| method | held-out acc before -> after | held-out length before -> after (tokens) | length of right / "
             "wrong answers after | ELR vs GRPO | mean SE (nats) | mean grad norm | tokens sampled / trained | "
             "wall s |",
             "|" + "---|" * 9]
    for method, per_seed in summaries.items():
        elr = []
        for seed, s in zip(seeds, per_seed):
            grpo = summaries.get("grpo", [None] * len(seeds))[seeds.index(seed)]
            try:  # reference length: the untrained model's, measured before step 1 of the GRPO run
                elr.append(excess_length_reduction(grpo["len_after"], s["len_after"], grpo["len_before"])
                           if grpo and method != "grpo" else None)
            except ValueError:
                elr.append(None)
        col = lambda key: [s.get(key) for s in per_seed]  # noqa: E731
        lines.append(
            f"| {method} | {mean_std(col('acc_before'))} -> {mean_std(col('acc_after'))} | "
            f"{mean_std(col('len_before'))} -> {mean_std(col('len_after'))} | {mean_std(col('right_len_after'))} / "
            f"{mean_std(col('wrong_len_after'))} | {mean_std(elr)} | "
            f"{mean_std(col('mean_se'))} | {mean_std(col('grad_norm'))} | {mean_std(col('tokens_sampled'))} / "
            f"{mean_std(col('tokens_trained'))} | {mean_std(col('wall_s'))} |")
    if styles:
        lines += ["", "Answer styles of the held-out completions (share, first eval -> last eval):", "",
                  "| method | " + " | ".join(STYLES) + " |", "|" + "---|" * (len(STYLES) + 1)]
        first = lambda s, style: s["styles"][min(s["styles"])][style]  # noqa: E731
        last = lambda s, style: s["styles"][max(s["styles"])][style]  # noqa: E731
        for method, per_seed in summaries.items():
            lines.append(f"| {method} | " + " | ".join(
                f"{mean_std([first(s, st) for s in per_seed])} -> {mean_std([last(s, st) for s in per_seed])}"
                for st in STYLES) + " |")
    return "\n".join(lines)


def matched_accuracy_table(runs: dict, levels: list) -> str:
    """Length at matched accuracy: for each method and accuracy level, the held-out length at the first eval that
    reaches it and the tokens sampled until then, mean ± std over the seeds that got there (n/N of them)."""
    lines = ["| method | " + " | ".join(f"acc >= {level:.3f}: length; tokens sampled (seeds)" for level in levels)
             + " |", "|" + "---|" * (len(levels) + 1)]
    for method, per_seed in runs.items():
        cells = []
        for level in levels:
            hits = [matched_accuracy(run["records"], level) for run in per_seed]
            reached = [h for h in hits if h["step"] is not None]
            cells.append(f"{mean_std([h['length'] for h in reached])}; {mean_std([h['tokens'] for h in reached])} "
                         f"({len(reached)}/{len(hits)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
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
    plt = pyplot()
    if plt is None:
        return False
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for unused in axes.flat[len(panels):]:
        unused.set_visible(False)
    axes = list(axes.flat)
    for axis, (key, title) in zip(axes, panels):
        for method, per_seed in runs.items():
            steps, means, stds = curve(per_seed, key)
            line, = axis.plot(steps, means, marker="o" if key.startswith(("eval", "style")) else None, label=method)
            axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.15)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    return save_figure(plt, figure, path)


def plot_accuracy_vs_length(runs: dict, path: Path) -> bool:
    """Held-out accuracy against held-out length, one curve per method through its evals (mean over seeds, from the
    shared start), with ± one std bars on both. Upper left is better: more accurate, in fewer tokens."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method, per_seed in runs.items():
        _, lengths, length_stds = curve(per_seed, "eval_completion_len")
        _, accuracies, accuracy_stds = curve(per_seed, "eval_accuracy")
        line, = axis.plot(lengths, accuracies, marker="o", label=method)
        axis.errorbar(lengths, accuracies, xerr=length_stds, yerr=accuracy_stds, fmt="none", color=line.get_color(),
                      alpha=0.35, capsize=2)  # the path is not monotone in length, so bars rather than a band
        axis.annotate(f"{method}: end", (lengths[-1], accuracies[-1]), fontsize=7, color=line.get_color())
    axis.set_xlabel("held-out mean completion length (tokens)")
    axis.set_ylabel("held-out greedy accuracy")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(plt, figure, path)


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


def check_before_running(methods: list, settings: dict, out_dir: Path, overwrite: bool, seeds: list = (),
                         reuse: bool = False) -> None:
    """One line, before any run starts: a --set key that is not a flag of a chosen method's script, earlier
    results in --output_dir that this run would replace (without --overwrite), or a run directory that this command
    may not replace (plan_run)."""
    configs = config_classes()
    for method in methods:
        script = METHODS[method][0]
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(configs[script])})
        if unknown:
            raise SystemExit(f"error: --set {unknown[0]}: not a flag of {script} (method {method}); "
                             f"`python {script} --help` lists them")
    earlier = [name for name in ("results.md", "summary.json") if (out_dir / name).exists()]
    if earlier and not overwrite:
        raise SystemExit(f"error: --output_dir {out_dir} already holds results ({', '.join(earlier)}): pass "
                         f"--overwrite to replace them (with --reuse to keep its finished runs), or choose another "
                         f"--output_dir")
    for method in methods:
        for seed in seeds:
            plan_run(method, seed, settings, out_dir, overwrite, reuse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", nargs="+", type=at_least(0), default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="default: grpo, seed_grpo and the two GFPO metrics; with --preset cold_start, grpo and "
                             "the three GFPO variants")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a setting for every method, e.g. max_steps=2 model=DIR")
    parser.add_argument("--levels", nargs="*", type=float, default=None, metavar="ACCURACY",
                        help="accuracy levels of the length-at-matched-accuracy table (default: GRPO's mean final "
                             "accuracy and its mean first eval)")
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --output_dir")
    parser.add_argument("--reuse", action="store_true", help="keep each run that --output_dir already holds finished "
                        "with the same flags, and train only the others: an interrupted comparison goes on (its "
                        "unfinished run starts again), or a method or seed is added (with --overwrite, when the "
                        "results are written already)")
    args = parser.parse_args()
    methods = args.methods or PRESET_METHODS.get(args.preset, DEFAULT_METHODS)
    settings = {**PRESETS[args.preset], **parse_overrides(args.set)}
    out_dir = Path(args.output_dir)
    check_before_running(methods, settings, out_dir, args.overwrite, args.seeds, args.reuse)
    missing = [settings[key] for key in ("model", "data", "eval_data")
               if "cold_start" in args.preset and key in settings and not (ROOT / settings[key]).exists()]
    if missing:
        raise SystemExit(f"error: --preset {args.preset} needs {missing[0]}, which is not there yet: make it first "
                         f"with `python benchmarks/cold_start.py` (--overwrite remakes an older cold start)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # seed by seed, every method of a seed before the next seed: stopped early, the paired comparison has whole seeds
    done = {(m, seed): run_method(m, seed, settings, out_dir, args.reuse) for seed in args.seeds for m in methods}
    runs = {m: [done[m, seed] for seed in args.seeds] for m in methods}
    summaries = {m: [run_summary(r) for r in per_seed] for m, per_seed in runs.items()}
    table = build_table(summaries, args.seeds, styles="cold_start" in args.preset)
    reference = summaries.get("grpo") or next(iter(summaries.values()))
    levels = args.levels or sorted({round(statistics.mean(s["acc_before"] for s in reference), 3),
                                    round(statistics.mean(s["acc_after"] for s in reference), 3)})
    table += ("\n\nLength at matched accuracy (the first eval at or above each level; levels: "
              + ("--levels" if args.levels else f"{'grpo' if 'grpo' in summaries else methods[0]}'s mean first and "
                 f"last eval") + "):\n\n" + matched_accuracy_table(runs, levels))
    paired_text, paired_numbers = paired_section(summaries, methods, args.seeds, out_dir)
    every_run = [r for per_seed in runs.values() for r in per_seed]
    cost = (f"cost: {sum(r['wall_s'] or 0 for r in every_run) / 60:.1f} min of wall time and "
            f"{sum(r['cpu_s'] or 0 for r in every_run) / 60:.1f} min of CPU time over the {len(every_run)} runs "
            f"(each run's cost.json keeps its own, for --reuse)")
    header = (f"preset {args.preset}, seeds {args.seeds}, settings {settings}\n"
              f"(mean ± std over seeds where there are several)\n{cost}\n\n")
    (out_dir / "results.md").write_text(header + table + paired_text + "\n")
    (out_dir / "summary.json").write_text(json.dumps({
        "settings": settings, "seeds": args.seeds, "method_flags": {m: method_flags(m, settings) for m in runs},
        "levels": levels, "paired": paired_numbers, "cost": cost,
        "per_seed": {m: dict(zip(map(str, args.seeds), per_seed)) for m, per_seed in summaries.items()}},
        indent=2))
    print("\n" + table + paired_text + "\n\n" + cost)
    panels = COMPARE_PANELS + ([(f"style_{style}", f"held-out share of the {style} style") for style in STYLES]
                               if "cold_start" in args.preset else [])
    if (plot_curves(runs, out_dir / "curves.png", panels)
            and plot_accuracy_vs_length(runs, out_dir / "accuracy_vs_length.png")):
        print(f"\nwrote {out_dir / 'results.md'}, {out_dir / 'curves.png'} and {out_dir / 'accuracy_vs_length.png'}")
    else:
        print(f"\nwrote {out_dir / 'results.md'}; for the plots, pip install matplotlib")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
