"""benchmarks/cold_start.py: a short supervised "cold start" that makes SmolLM2-135M verbose, so that GFPO has
something to trim.

    python benchmarks/cold_start.py                        # the fine-tune docs/RESULTS.md uses (minutes, CPU)
    python benchmarks/length_probe.py --model runs/cold_start/model --settings sum_of_four    # the gate before RL
    python benchmarks/compare.py --preset cold_start --seeds 0 1 2                            # GRPO vs GFPO from it

Why this exists. GFPO (gfpo.py) removes the length inflation that GRPO causes in a model that already writes long
reasoning (the paper starts from Phi-4-reasoning, supervised on long traces). The raw SmolLM2-135M answers tersely,
and GRPO only ever shortens it (docs/RESULTS.md, the length probe). DeepSeek-R1 and Phi-4-reasoning both put a
supervised cold start before RL; this is that step at laptop size. It fine-tunes on generated, correct solutions
to a task on which writing out the working helps a small model: the sum of four amounts. Each solution is in one of
three answer styles:

    direct   The answer is 45.
    worked   12 + 7 = 19. 19 + 9 = 28. 28 + 17 = 45. The answer is 45.
    filler   We need the total of Ava's 12, Ben's 7, Chloe's 9 and Dan's 17 coins. 12 + 7 = 19. 19 + 9 = 28.
             28 + 17 = 45. Let me double-check: 12 + 7 = 19, 19 + 9 = 28, 28 + 17 = 45. The answer is 45.

The mix (MIX) and the number of steps were fixed before any RL run and are not tuned on RL results. classify_style
tells the styles apart with a regex, so training and evaluation can report each style's share. Writes, under
--output_dir: model/ (what --model takes), problems.jsonl (the RL problems, none of them seen in the fine-tune),
eval_problems.jsonl (held-out problems in neither),
sft_log.jsonl (loss and each style's share per logged step) and styles.json (the sampled accuracy and share of each
style after the fine-tune). The loop is ours, over grpo_mini.completion_logps: the loss is minus the mean log-prob
of the solution tokens (engine.shared_prompt_logps: each prompt forwarded once, as in a GRPO step).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import grpo_mini as gm  # noqa: E402
from benchmarks.cli import at_least, run_main  # noqa: E402

STYLES = ("direct", "worked", "filler")
MIX = {"direct": 0.4, "worked": 0.3, "filler": 0.3}  # fixed before any RL run (docs/RESULTS.md)
_STEP = re.compile(r"\d+ \+ \d+ = \d+")


def make_sum_of_four(rng: random.Random) -> gm.Problem:
    """Four people's amounts (2..29 each), added: too long to add in one's head, easy to add in three steps."""
    item = rng.choice(gm.ITEMS)
    names = rng.sample(gm.NAMES, 4)
    values = [rng.randint(2, 29) for _ in names]
    parts = [f"{n} has {v} {item}" for n, v in zip(names, values)]
    return gm.Problem(f"{', '.join(parts[:3])} and {parts[3]}. How many {item} do they have together?",
                      float(sum(values)))


def parse_sum_of_four(prompt: str) -> tuple:
    """(names, values, item) back from make_sum_of_four's prompt."""
    pairs = re.findall(r"(\w+) has (\d+) (\w+)", prompt)
    return [p[0] for p in pairs], [int(p[1]) for p in pairs], pairs[0][2]


def solution(problem: gm.Problem, style: str) -> str:
    """A correct solution in one style (the module docstring shows all three for one problem)."""
    names, values, item = parse_sum_of_four(problem.prompt)
    total, steps = values[0], []
    for v in values[1:]:
        steps.append(f"{total} + {v} = {total + v}")
        total += v
    answer = f"The answer is {total}."
    if style == "direct":
        return answer
    if style == "worked":
        return ". ".join(steps) + ". " + answer
    owners = ", ".join(f"{n}'s {v}" for n, v in zip(names[:3], values[:3])) + f" and {names[3]}'s {values[3]}"
    return (f"We need the total of {owners} {item}. " + ". ".join(steps) + ". Let me double-check: "
            + ", ".join(steps) + ". " + answer)


def classify_style(text: str) -> str:
    """direct / worked / filler / other, from the text alone:
        classify_style("The answer is 45.") == "direct"
        classify_style("12 + 7 = 19. 19 + 26 = 45. The answer is 45.") == "worked"
        classify_style("We need ... 12 + 7 = 19 ... Let me double-check: 12 + 7 = 19 ... The answer is 45.") == "filler"
    A completion with the double-check is filler; one with a sum written out, worked; one that is only the answer
    sentence, direct; anything else (rambling, no answer sentence), other."""
    if "double-check" in text:
        return "filler"
    if _STEP.search(text):
        return "worked"
    if re.fullmatch(r"\s*The answer is -?[\d.,]+\.?\s*", text):
        return "direct"
    return "other"


def style_report(completions: list, rewards: list) -> dict:
    """Each style's share of the completions and its accuracy (reward > 0 counts as right; None where absent)."""
    styles = [classify_style(text) for text in completions]
    report = {}
    for style in STYLES + ("other",):
        rows = [r for s, r in zip(styles, rewards) if s == style]
        report[style] = {"share": len(rows) / max(1, len(styles)),
                         "accuracy": sum(r > 0 for r in rows) / len(rows) if rows else None}
    return report


def split_problems(seed: int, num_sft: int, num_rl: int, num_eval: int = 0) -> tuple:
    """Distinct fine-tune, RL and held-out problems, with no prompt in two of them. They are drawn in that order, so
    asking for more held-out problems leaves the fine-tune's and the RL's as they were."""
    problems = gm.distinct_problems(make_sum_of_four, num_sft + num_rl + num_eval, random.Random(seed),
                                    flag="--num_sft_problems + --num_rl_problems + --num_eval_problems =")
    return problems[:num_sft], problems[num_sft:num_sft + num_rl], problems[num_sft + num_rl:]


def sft_batch(problems: list, tokenizer, rng: random.Random, batch_size: int, device) -> tuple:
    """batch_size problems, each with a style drawn from MIX: (prompt ids, prompt mask, solution ids, solution mask,
    styles), the prompts left-padded as in a rollout, the solutions right-padded and ending in EOS."""
    chosen = [rng.choice(problems) for _ in range(batch_size)]
    styles = rng.choices(list(MIX), weights=list(MIX.values()), k=batch_size)
    prompt_ids, prompt_mask = gm.encode_prompts(tokenizer, chosen, device)
    answers = [tokenizer(solution(p, s), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
               for p, s in zip(chosen, styles)]
    width = max(map(len, answers))
    ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers], device=device)
    mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=device)
    return prompt_ids, prompt_mask, ids, mask, styles


def sampled_styles(model, tokenizer, problems: list, device, dtype, max_new_tokens: int, seed: int,
                   attn_implementation=None) -> dict:
    """Sample 8 completions per problem at temperature 0.7, as RL will: each style's share and accuracy."""
    cfg = gm.Config(num_generations=8, max_completion_length=max_new_tokens, temperature=0.7, seed=seed)
    gm.set_seed(seed)
    sampler = gm.make_sampling_model(model, dtype, attn_implementation)
    ro = gm.rollout(model, tokenizer, problems, cfg, device, sampler=sampler)
    rewards = gm.correctness_reward(ro.completions, ro.answers)
    return {"accuracy": sum(rewards) / len(rewards), "mean_length": ro.lengths.float().mean().item(),
            "styles": style_report(ro.completions, rewards), "examples": ro.completions[::8][:6]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=gm.DEFAULT_MODEL, help="the model to fine-tune (default: SmolLM2-135M)")
    parser.add_argument("--output_dir", default="runs/cold_start", help="where model/, problems.jsonl and logs go")
    parser.add_argument("--steps", type=at_least(1), default=60, help="fine-tune steps")
    parser.add_argument("--batch_size", type=at_least(1), default=8, help="solutions per step")
    parser.add_argument("--learning_rate", type=at_least(1e-12, float), default=5e-5,
                        help="AdamW learning rate (constant)")
    parser.add_argument("--num_sft_problems", type=at_least(1), default=2000, help="distinct problems to fine-tune on")
    parser.add_argument("--num_rl_problems", type=at_least(2), default=1200, help="distinct problems written for RL")
    parser.add_argument("--num_eval_problems", type=at_least(2), default=256, help="distinct held-out problems written "
                        "to eval_problems.jsonl (compare.py's paired_cold_start_256 preset evaluates on them)")
    parser.add_argument("--probe_prompts", type=at_least(1), default=32, help="problems sampled after the fine-tune")
    parser.add_argument("--max_new_tokens", type=at_least(1), default=160, help="completion length of that sampling "
                        "(compare.py's cold_start preset trains with the same)")
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier cold start in --output_dir")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if (out / "model").exists() and not args.overwrite:
        print(f"error: --output_dir {out} already holds a cold start (model/): pass --overwrite to replace it, or "
              f"choose another --output_dir", file=sys.stderr)
        return 2
    try:  # a bad --model or too many problems asked for: one line, not a traceback
        sft_problems, rl_problems, eval_problems = split_problems(args.seed, args.num_sft_problems,
                                                                  args.num_rl_problems, args.num_eval_problems)
        model, tokenizer = gm.load_model_and_tokenizer(args.model)
    except gm.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gm.set_seed(args.seed)
    device = gm.pick_device("auto")
    dtype = gm.pick_dtype("auto", device)
    model.to(device).train()
    sampler_kernel = gm.engine.use_training_attention(model, "auto", device, dtype)  # eager: fast CPU bf16 backward
    out.mkdir(parents=True, exist_ok=True)
    for name, problems in (("problems.jsonl", rl_problems), ("eval_problems.jsonl", eval_problems)):
        with open(out / name, "w") as handle:
            handle.writelines(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    probe_set = rl_problems[:args.probe_prompts]
    before = sampled_styles(model, tokenizer, probe_set, device, dtype, args.max_new_tokens, args.seed, sampler_kernel)
    print(f"before: sampled accuracy {before['accuracy']:.3f}, length {before['mean_length']:.1f}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    rng, start, window = random.Random(args.seed), time.time(), []
    with open(out / "sft_log.jsonl", "w") as log:
        for step in range(1, args.steps + 1):
            prompt_ids, prompt_mask, ids, mask, styles = sft_batch(sft_problems, tokenizer, rng, args.batch_size,
                                                                   device)
            with gm.autocast(device, dtype):
                logps = gm.engine.shared_prompt_logps(model, prompt_ids, prompt_mask, ids, mask, 1.0)  # [B, T]
            loss = -(logps * mask).sum() / mask.sum()  # minus the mean log-prob of the solution tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            record = {"step": step, "loss": loss.item(), **{f"share_{s}": styles.count(s) / len(styles)
                                                          for s in STYLES}}
            log.write(json.dumps(record) + "\n")
            window += styles
            if step % 10 == 0 or step == args.steps:  # the styles trained on since the last line
                print(f"sft step {step:>4} | loss {loss.item():.3f} | styles " + " ".join(
                    f"{s} {window.count(s) / len(window):.2f}" for s in STYLES) + f" | {time.time() - start:.0f} s",
                      flush=True)
                window = []
    model.eval()
    after = sampled_styles(model, tokenizer, probe_set, device, dtype, args.max_new_tokens, args.seed, sampler_kernel)
    gm.save_model(model, tokenizer, out / "model")
    (out / "styles.json").write_text(json.dumps({"settings": vars(args), "mix": MIX, "before": before,
                                                 "after": after, "sft_seconds": time.time() - start}, indent=1))
    print(f"after: sampled accuracy {after['accuracy']:.3f}, length {after['mean_length']:.1f}")
    for style, r in after["styles"].items():
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"  {style:>6}: share {r['share']:.2f}, accuracy {accuracy}")
    print(f"e.g. {after['examples'][0]!r}\nwrote {out / 'model'}, {out / 'problems.jsonl'}, "
          f"{out / 'eval_problems.jsonl'} and {out / 'styles.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
