"""benchmarks/length_probe.py: which way will GRPO push the completion length on a task? Measured before training.

    python benchmarks/length_probe.py                      # every setting below: docs/RESULTS.md's table (~18 min, CPU)
    python benchmarks/length_probe.py --settings arithmetic multistep
    python benchmarks/length_probe.py --model runs/grpo/model --settings arithmetic    # a trained model
    python benchmarks/length_probe.py --settings two_digit_product --write_jsonl product.jsonl --seed 1234
        # 1200 distinct problems of one setting as a JSONL file, to train on: python grpo_mini.py --data product.jsonl

Why this exists. GFPO (gfpo.py) is made for the regime in which GRPO's answers grow longer during training, and
removes that growth. To show it doing so we need a task on which GRPO does lengthen. Training runs to find one are
slow; this probe answers the question from the untrained model's samples in about a minute per setting.

The idea, in one formula. A GRPO step raises the log-probability of each completion in proportion to its advantage
A_i (grpo_mini.group_advantages). Completions with A > 0 become more likely, those with A < 0 less likely. So the
length drifts up when, inside a group, the right answers are LONGER than the wrong ones, and down when they are
shorter. The number that says which is the within-group covariance of advantage and length:

    length_push = mean_i  A_i * |o_i|        (A sums to zero in each group, so this IS that covariance)

It is > 0 when the first steps will lengthen answers and < 0 when they will shorten them. It is 0 for groups that are
all right or all wrong (A = 0), so a task that is far too hard or too easy gives no push either way; the table also
shows the fraction of groups that are mixed, and the mean length gap (right minus wrong) inside them.

What you should see (measured; the table is in docs/RESULTS.md and benchmarks/results/length_probe_cpu.md): with
SmolLM2-135M-Instruct, the settings where the model gets a useful share right (arithmetic: 19% of samples) have the
right answers SHORTER than the wrong ones and length_push clearly negative (-4.0 ± 1.1). The harder settings give
small positive pushes, each within about one standard error of zero, from 2-7% right. Long answers at this size are
mostly rambling that ends on a wrong number, so where GRPO learns, it shortens them.

The settings: the two built-in tasks (grpo_mini --task), five more word-problem families written for this search,
and two changes of instruction: "brief" asks for the number alone (so that writing out the working would be a
lengthening), "example" shows one worked example first (so that the working is a form the model can copy). The
candidate families live here, not in tasks.py, because none of them gave the lengthening regime. What did give it is
a supervised cold start (benchmarks/cold_start.py); its task is the family sum_of_four, and probing its checkpoint
with it is the gate before the GFPO comparison: `--model runs/cold_start/model --settings sum_of_four
--max_completion_length 160` measured length_push +8.27 ± 1.78 with 69% mixed groups (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import grpo_mini as gm  # noqa: E402
from benchmarks.cli import at_least, run_main  # noqa: E402
from benchmarks.cold_start import make_sum_of_four, style_report  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------------
# 1. The statistic
# ----------------------------------------------------------------------------------------------------------------------


def length_advantage_stats(rewards: torch.Tensor, lengths: torch.Tensor, num_generations: int) -> dict:
    """Which way GRPO's advantages push the length, from one batch of grouped samples (G contiguous rows per prompt).

        A = group_advantages(rewards, G)               (GRPO's (r - mean) / (std + eps), per group)
        length_push = mean over all rows of A_i * |o_i|
        length_push_stderr = std over groups of each group's mean of A_i * |o_i|, / sqrt(number of groups)
        mixed_fraction = fraction of groups with both right and wrong samples (the only ones with A != 0)
        right_minus_wrong = mean over mixed groups of (mean |o| of the right ones - mean |o| of the wrong ones)

    Example, G = 2: rewards [1, 0, 1, 1], lengths [10, 30, 5, 7]
        A = [0.7070, -0.7070, 0, 0]
        length_push = (0.7070 * 10 - 0.7070 * 30 + 0 + 0) / 4 = -3.535    (the right answer is the shorter one)
        per group: [-7.07, 0] -> std 5.0 -> length_push_stderr = 5.0 / sqrt(2) = 3.535
        mixed_fraction = 0.5,  right_minus_wrong = 10 - 30 = -20
    right_minus_wrong is NaN when no group is mixed. A "right" sample is one with the group's higher reward, so the
    binary (0/1) and signed (+1/-1) rewards give the same numbers."""
    rewards, lengths = rewards.float(), lengths.float()
    advantages = gm.group_advantages(rewards, num_generations)  # [N]
    grouped_r, grouped_len = rewards.view(-1, num_generations), lengths.view(-1, num_generations)  # [B, G]
    mixed = grouped_r.amax(dim=1) > grouped_r.amin(dim=1)  # [B]
    gaps = [(grouped_len[b][grouped_r[b] == grouped_r[b].max()].mean()
             - grouped_len[b][grouped_r[b] < grouped_r[b].max()].mean()).item() for b in mixed.nonzero().view(-1)]
    per_group = (advantages * lengths).view(-1, num_generations).mean(dim=1)  # [B]; their mean is length_push
    stderr = (per_group.std() / len(per_group) ** 0.5).item() if len(per_group) > 1 else float("nan")
    return {"length_push": per_group.mean().item(), "length_push_stderr": stderr,
            "mixed_fraction": mixed.float().mean().item(),
            "right_minus_wrong": statistics.mean(gaps) if gaps else float("nan")}


# ----------------------------------------------------------------------------------------------------------------------
# 2. The settings probed: task families and instruction variants
# ----------------------------------------------------------------------------------------------------------------------


def make_sum_of_three(rng: random.Random) -> gm.Problem:
    """Three people's amounts, added: "Ava has 4 coins, Ben has 12 coins and Emma has 7 coins. How many ...?" """
    item = rng.choice(gm.ITEMS)
    a, b, c = rng.sample(gm.NAMES, 3)
    x, y, z = (rng.randint(2, 20) for _ in range(3))
    return gm.Problem(f"{a} has {x} {item}, {b} has {y} {item} and {c} has {z} {item}. How many {item} do they have "
                      f"together?", float(x + y + z))


def make_two_digit_product(rng: random.Random) -> gm.Problem:
    """A one-digit times a two-digit number (3..9 x 11..30): too big to recall, easy to split (4 x 23 = 80 + 12)."""
    name, item = rng.choice(gm.NAMES), rng.choice(gm.ITEMS)
    a, b = rng.randint(3, 9), rng.randint(11, 30)
    return gm.Problem(f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?",
                      float(a * b))


def make_change(rng: random.Random) -> gm.Problem:
    """A price times a count, taken from a bill: two steps (cost, then change)."""
    name, item = rng.choice(gm.NAMES), rng.choice(gm.ITEMS)
    price, count = rng.randint(2, 9), rng.randint(2, 5)
    bill = 50 if price * count > 20 else 20
    return gm.Problem(f"{item.capitalize()} cost {price} dollars each. {name} buys {count} {item} and pays with a "
                      f"{bill} dollar bill. How much change does {name} get?", float(bill - price * count))


def make_gain_then_loss(rng: random.Random) -> gm.Problem:
    """One sentence, two steps: a + b - c (never negative)."""
    name, item = rng.choice(gm.NAMES), rng.choice(gm.ITEMS)
    a, b, c = rng.randint(5, 20), rng.randint(2, 9), rng.randint(2, 9)
    return gm.Problem(f"{name} has {a} {item}. {name} gets {b} more, then gives away {c}. How many {item} does {name} "
                      f"have now?", float(a + b - c))


def make_boxes_plus_loose(rng: random.Random) -> gm.Problem:
    """A product plus a sum: a x b + c."""
    name, item = rng.choice(gm.NAMES), rng.choice(gm.ITEMS)
    a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 9)
    return gm.Problem(f"{name} buys {a} boxes with {b} {item} in each box, and {c} loose {item}. How many {item} is "
                      f"that in total?", float(a * b + c))


FAMILIES: dict[str, Callable[[random.Random], gm.Problem]] = {
    **gm.TASK_GENERATORS,  # the built-in tasks: arithmetic, multistep
    "sum_of_three": make_sum_of_three,
    "two_digit_product": make_two_digit_product,
    "change": make_change,
    "gain_then_loss": make_gain_then_loss,
    "boxes_plus_loose": make_boxes_plus_loose,
    "sum_of_four": make_sum_of_four,  # the cold start's task (benchmarks/cold_start.py): probe its checkpoint with it
}
# Text added after the question (grpo_mini's own instruction still follows it).
VARIANTS = {
    "brief": "Answer with just the number.",
    "example": ("Work it out step by step, like this example.\nExample: Ava has 12 coins. Ava gets 5 more, then gives "
                "away 3. How many coins does Ava have now?\nWorking: 12 + 5 = 17. 17 - 3 = 14.\nThe answer is 14."),
    "example_product": ("Work it out step by step, like this example.\nExample: Ava buys 4 boxes with 23 coins in each "
                        "box. How many coins is that in total?\nWorking: 4 x 20 = 80. 4 x 3 = 12. 80 + 12 = 92.\n"
                        "The answer is 92."),
}
SETTINGS = ["arithmetic", "multistep", "sum_of_three", "two_digit_product", "change", "gain_then_loss",
            "boxes_plus_loose", "arithmetic+brief", "gain_then_loss+brief", "two_digit_product+brief",
            "arithmetic+example", "gain_then_loss+example", "two_digit_product+example_product"]


def make_setting(name: str) -> Callable[[random.Random], gm.Problem]:
    """'family' or 'family+variant' -> a problem generator; the variant's text goes after the question."""
    family, _, variant = name.partition("+")
    if family not in FAMILIES or (variant and variant not in VARIANTS):
        raise gm.ConfigError(f"--settings {name}: use FAMILY or FAMILY+VARIANT with FAMILY in {', '.join(FAMILIES)} "
                             f"and VARIANT in {', '.join(VARIANTS)}")
    if not variant:
        return FAMILIES[family]

    def make(rng: random.Random) -> gm.Problem:
        problem = FAMILIES[family](rng)
        return gm.Problem(f"{problem.prompt}\n{VARIANTS[variant]}", problem.answer)
    return make


# ----------------------------------------------------------------------------------------------------------------------
# 3. Sampling and the table
# ----------------------------------------------------------------------------------------------------------------------


def probe(model, sampler, tokenizer, make_problem, cfg: gm.Config, num_prompts: int, device) -> dict:
    """Sample cfg.num_generations completions for num_prompts problems, as a training step would, and measure."""
    gm.set_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    problems = [make_problem(rng) for _ in range(num_prompts)]
    ro = gm.rollout(model, tokenizer, problems, cfg, device, sampler=sampler)
    rewards = torch.tensor(gm.correctness_reward(ro.completions, ro.answers))
    stats = length_advantage_stats(rewards, ro.lengths.cpu(), cfg.num_generations)
    return {"accuracy": rewards.mean().item(), "mean_length": ro.lengths.float().mean().item(),
            "truncated": ro.truncated.float().mean().item(), **stats,
            "styles": style_report(ro.completions, rewards.tolist()),  # the cold start's answer styles
            "examples": [{"reward": rewards[row].item(), "length": int(ro.lengths[row]), "text": ro.completions[row]}
                         for row in range(0, len(ro.completions), cfg.num_generations)][:4]}  # 1st sample, 4 prompts


def signed_or_dash(value, digits: int) -> str:
    """+1.5 / -0.3, or "-" where there is no value (NaN or None: no mixed group)."""
    return "-" if value is None or value != value else f"{value:+.{digits}f}"


def table(results: dict, cfg: gm.Config, num_prompts: int, model: str) -> str:
    lines = [f"Samples: {num_prompts} prompts x G = {cfg.num_generations}, temperature "
             f"{cfg.temperature}, at most {cfg.max_completion_length} new tokens, seed {cfg.seed}, model {model}.",
             "length_push = mean of A_i x |o_i| (> 0: GRPO's first steps lengthen answers; < 0: they shorten them).",
             "",
             "| setting | accuracy | mean length | truncated | mixed groups | right - wrong length"
             " | length_push ± stderr |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['mean_length']:.1f} | {r['truncated']:.2f} | "
                     f"{r['mixed_fraction']:.2f} | {signed_or_dash(r['right_minus_wrong'], 1)} | "
                     f"{r['length_push']:+.2f} ± {r['length_push_stderr']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS, metavar="FAMILY[+VARIANT]",
                        help=f"families: {', '.join(FAMILIES)}; variants: {', '.join(VARIANTS)} (default: all "
                             f"{len(SETTINGS)} of docs/RESULTS.md's table)")
    parser.add_argument("--model", default=gm.DEFAULT_MODEL, help="as grpo_mini.py --model (default: SmolLM2-135M)")
    parser.add_argument("--prompts", type=at_least(1), default=32, help="problems per setting")
    parser.add_argument("--num_generations", type=at_least(2), default=8, help="completions per prompt, the group size G")
    parser.add_argument("--max_completion_length", type=at_least(1), default=128, help="maximum new tokens per completion")
    parser.add_argument("--temperature", type=at_least(0.01, float), default=0.7, help="sampling temperature, as in training")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed for the problems and the sampling")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda[:N]")
    parser.add_argument("--output_dir", default="runs/length_probe", help="where results.md and summary.json go")
    parser.add_argument("--write_jsonl", metavar="FILE", help="write --num_problems distinct problems of the one "
                        "setting in --settings to FILE, as grpo_mini.py --data reads them, and stop (no model)")
    parser.add_argument("--num_problems", type=at_least(1), default=1200, help="rows for --write_jsonl")
    args = parser.parse_args(argv)
    try:  # every bad flag fails here, before the model loads
        makers = {name: make_setting(name) for name in args.settings}
        if args.write_jsonl:
            if len(makers) != 1:
                raise gm.ConfigError(f"--write_jsonl: give exactly one --settings (got {len(makers)})")
            rows = gm.distinct_problems(next(iter(makers.values())), args.num_problems, random.Random(args.seed),
                                        flag="--num_problems")
            with open(args.write_jsonl, "w") as handle:
                handle.writelines(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in rows)
            print(f"wrote {len(rows)} problems of {args.settings[0]} to {args.write_jsonl}")
            return 0
        cfg = gm.Config(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                        temperature=args.temperature, seed=args.seed, device=args.device)
        cfg.validate()
        if args.prompts < 1:
            raise gm.ConfigError(f"--prompts {args.prompts}: must be >= 1")
    except gm.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = gm.pick_device(cfg.device)
    dtype = gm.pick_dtype(cfg.dtype, device)
    model, tokenizer = gm.load_model_and_tokenizer(args.model)
    model.to(device).eval()
    sampler = gm.make_sampling_model(model, dtype)  # what train() samples from: the bf16 copy where bf16 is fast
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, make_problem in makers.items():
        start = time.time()
        results[name] = probe(model, sampler, tokenizer, make_problem, cfg, args.prompts, device)
        r = results[name]
        print(f"{name}: accuracy {r['accuracy']:.3f}, length {r['mean_length']:.1f}, truncated {r['truncated']:.2f}, "
              f"mixed {r['mixed_fraction']:.2f}, right-wrong {signed_or_dash(r['right_minus_wrong'], 1)}, "
              f"length_push {r['length_push']:+.2f} ± {r['length_push_stderr']:.2f} ({time.time() - start:.0f} s)",
              flush=True)
        styles = {k: v for k, v in r["styles"].items() if v["share"] and k != "other"}
        if styles:  # a cold-started model: each answer style's share and sampled accuracy
            print("  styles: " + ", ".join(f"{k} {v['share']:.2f} (accuracy {v['accuracy']:.3f})"
                                          for k, v in styles.items()), flush=True)
    text = table(results, cfg, args.prompts, args.model)
    (out / "results.md").write_text(text)
    no_nan = {name: {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
              for name, r in results.items()}  # NaN (no mixed group) -> null: strict JSON
    (out / "summary.json").write_text(json.dumps({"settings": vars(args), "results": no_nan}, indent=1))
    print("\n" + text + f"\nwrote {out / 'results.md'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
