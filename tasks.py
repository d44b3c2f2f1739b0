"""tasks.py: the built-in tasks of grpo_mini.py. A verifiable reward needs problems with known answers.

    arithmetic   one +, -, x or / step in a word problem (the default)
    multistep    two + or - steps, to be worked out in writing
    --data FILE  any JSONL file of {"prompt": ..., "answer": ...} rows, read strictly (errors name file:line)
The problems are generated from a seed, so nothing is downloaded and the train / held-out split is reproducible,
with no prompt in both. extract_final_number reads the answer a completion commits to: grpo_mini.py's rewards are
built on it. PromptOrder draws the training problems, reshuffled every epoch. checked_rewards runs a reward
function and turns any misuse into a one-line error.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import traceback
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from scaling import ConfigError, say_on_rank_zero

if TYPE_CHECKING:  # annotations only: the task code itself needs no torch
    import torch

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards"]
INSTRUCTION = "Give the final answer as a single number at the end."


@dataclass
class Problem:
    prompt: str
    """the question shown to the model (before the chat template)"""
    answer: float
    """the correct final number"""
    source: str = ""
    """where a --data row came from, "file:line" (empty for generated problems), for one-line errors"""


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


def load_jsonl_problems(path: str, prompt_column: str = "prompt", answer_column: str = "answer",
                        flag: str = "--data") -> list[Problem]:
    """Read {"prompt": str, "answer": number-or-text} rows (e.g. GSM8K, whose answers end in "#### 72"): a text
    answer is read by read_answer. Every line is checked; errors name the file and the line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    rows = []
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
            if not isinstance(row, dict):
                raise ConfigError(f'{where}: expected an object with a string "{prompt_column}" and an '
                                  f'"{answer_column}"')
            rows.append(problem_from_row(row, prompt_column, answer_column, where))
    if len(rows) < 2:
        raise ConfigError(f"{flag} {path}: needs at least 2 rows (found {len(rows)})")
    return rows


def problem_from_row(row: dict, prompt_column: str, answer_column: str, where: str) -> Problem:
    """One Problem from a row of --data, or one line naming `where` (file:line, or name[row]) and what is wrong."""
    if not isinstance(row.get(prompt_column), str) or answer_column not in row:
        raise ConfigError(f'{where}: expected a string "{prompt_column}" and an "{answer_column}" (--prompt_column '
                          f'and --answer_column choose the columns)')
    answer = read_answer(row[answer_column], where)
    if answer is None:
        raise ConfigError(f'{where}: "{answer_column}" has no number in it ({row[answer_column]!r})')
    return Problem(prompt=row[prompt_column], answer=answer, source=where)


def read_answer(raw, where: str) -> Optional[float]:
    """A --data row's answer: a JSON number as it is; a string that is one number, scientific notation included, as
    float() reads it; other text by its last number (extract_final_number: GSM8K's "... #### 72" -> 72). Text with
    scientific notation inside it is refused in one line naming `where`, since the last-number rule would read the
    exponent ("about 2.5e3" -> 3). None: no number.
        7 -> 7.0;  "2.5e3" -> 2500.0;  "1.5e-2" -> 0.015;  "3 + 4 = 7 apples. #### 7" -> 7.0;  "about 1e3" -> ConfigError
    GSM8K's answers end in "#### <number>": only what follows the last "####" is read."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):  # a JSON number (str(1e-05) would read as -5)
        return float(raw) if math.isfinite(raw) else None
    text = str(raw).rsplit("####", 1)[-1].strip().replace(",", "")  # GSM8K: the worked answer, then "#### 72"
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        value = float(text)
        return value if math.isfinite(value) else None
    if re.search(r"\d[eE][-+]?\d", text):
        raise ConfigError(f'{where}: "answer" {raw!r} has a number in scientific notation inside text; write the '
                          f"number alone (\"2.5e3\") or in full (2500)")
    return extract_final_number(text)


# --data and --eval_data through the `datasets` package: a hub name, a save_to_disk directory, or a parquet / JSON /
# CSV file. A .jsonl file is read by load_jsonl_problems above, which needs nothing and names file:line in its errors.
DATASET_FILES = {".parquet": "parquet", ".json": "json", ".csv": "csv"}


@dataclass
class DataConfig:
    """your own data (tasks.py): prompts and answers instead of a built-in --task"""
    support_flags = True  # not a field: flags.build_parser lists this group after the algorithm's
    data: Optional[str] = None
    """training problems instead of the built-in --task: a .jsonl file of {"prompt": str, "answer": number or text}
    rows (GSM8K's "... #### 72" answers included), or through `datasets` (pip install datasets) a hub name
    (openai/gsm8k), a directory saved with save_to_disk, or a .parquet, .json or .csv file"""
    data_config: Optional[str] = None
    """the dataset's configuration name, for a hub dataset that has several (openai/gsm8k: main)"""
    data_split: str = "train"
    """the split of --data to train on (a hub name or a saved DatasetDict)"""
    prompt_column: str = "prompt"
    """the column (JSON key) that holds the question; GSM8K: question"""
    answer_column: str = "answer"
    """the column that holds the answer: a number, or text whose last number is the answer, or what follows GSM8K's '####'"""
    eval_data: Optional[str] = None
    """a held-out set separate from the training data, in --data's forms (then nothing is held out of --data):
    --num_eval_problems of its rows, drawn with --seed; default: --num_eval_problems rows held out of --data"""
    eval_data_split: str = "test"
    """the split of --eval_data (a hub name or a saved DatasetDict)"""

    def validate(self) -> None:
        if self.eval_data is not None and self.eval_data == self.data and self.eval_data_split == self.data_split:
            raise ConfigError(f"--eval_data {self.eval_data}: the same split ({self.data_split}) as --data; a "
                              f"held-out set must be separate (or leave --eval_data out to hold rows out of --data)")
        super().validate()


def load_problems(source: str, split: str, prompt_column: str, answer_column: str, data_config: Optional[str] = None,
                  flag: str = "--data") -> list[Problem]:
    """Problems from any form --data takes (see DataConfig.data); every failure is one line naming `flag` and the
    source. A row's errors name it as SOURCE[row index]."""
    if source.endswith(".jsonl"):
        return load_jsonl_problems(source, prompt_column, answer_column, flag)
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{flag} {source}: reading it needs the datasets package (pip install datasets); a .jsonl "
                          f"file needs nothing") from None
    path = Path(source)
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise ConfigError(f"{flag} {source}: no split {split!r} (it has {', '.join(table)}); choose one "
                                      f"with {flag}_split")
                table = table[split]
        elif path.suffix in DATASET_FILES:
            if not path.is_file():
                raise ConfigError(f"{flag} {source}: no such file")
            table = datasets.load_dataset(DATASET_FILES[path.suffix], data_files=str(path), split="train")
        elif path.suffix or path.exists() or source.count("/") > 1:
            raise ConfigError(f"{flag} {source}: not a .jsonl, .parquet, .json or .csv file, a save_to_disk "
                              f"directory, or a hub name")
        else:
            table = datasets.load_dataset(source, data_config, split=split)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - offline, a wrong name or split, a damaged file: one line, the cause
        text = str(err).strip().splitlines()
        raise ConfigError(f"{flag} {source}: could not load it ({type(err).__name__}: "
                          f"{(text[0] if text else '')[:200]})") from None
    missing = [c for c in (prompt_column, answer_column) if c not in table.column_names]
    if missing:
        raise ConfigError(f"{flag} {source}: no column {missing[0]!r} (it has {', '.join(table.column_names)}); "
                          f"choose with --prompt_column / --answer_column")
    rows = [problem_from_row(row, prompt_column, answer_column, f"{source}[{i}]") for i, row in enumerate(table)]
    if len(rows) < 2:
        raise ConfigError(f"{flag} {source}: needs at least 2 rows (found {len(rows)})")
    return rows


def build_task(cfg) -> tuple[list, list]:
    """(train, held-out) problems, before any model loads: the training set from --data or the built-in --task (cfg
    has grpo_mini.Config's fields); the held-out set from --eval_data, or held out of --data, or generated."""
    columns = dict(prompt_column=cfg.prompt_column, answer_column=cfg.answer_column, data_config=cfg.data_config)
    held_out = None
    if cfg.eval_data:
        held_out = load_problems(cfg.eval_data, cfg.eval_data_split, flag="--eval_data", **columns)
        held_out = random.Random(cfg.seed).sample(held_out, min(cfg.num_eval_problems, len(held_out)))
        warn_fewer_held_out(cfg, len(held_out), f"--eval_data {cfg.eval_data} has only {len(held_out)} rows")
    if cfg.data:
        problems = load_problems(cfg.data, cfg.data_split, **columns)
        if held_out is not None:  # a prompt in both sets would leak: it trains only where it is not held out
            seen = {p.prompt for p in held_out}
            train = [p for p in problems if p.prompt not in seen]
            if not train:
                raise ConfigError(f"--data {cfg.data}: every prompt is also in --eval_data {cfg.eval_data}")
            return train, held_out
        train, held_out = split_problems(problems, cfg.num_eval_problems, cfg.seed)
        warn_fewer_held_out(cfg, len(held_out), f"at most a fifth of --data's {len({p.prompt for p in problems})} "
                                                f"distinct prompts are held out")
        return train, held_out
    train, generated = make_arithmetic_split(cfg.seed, cfg.num_train_problems, cfg.num_eval_problems,
                                             TASK_GENERATORS[cfg.task])
    return train, generated if held_out is None else held_out


def warn_fewer_held_out(cfg, count: int, why: str) -> None:
    """One line on stderr (rank 0) when the held-out set is smaller than --num_eval_problems asked, so that a result
    is never read as measured on more problems than it was."""
    if count < cfg.num_eval_problems:
        say_on_rank_zero(f"warning: --num_eval_problems {cfg.num_eval_problems}: evaluating on {count} held-out "
                         f"problems ({why})", file=sys.stderr)


def split_problems(problems: list[Problem], num_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Seeded shuffle, then hold out the first num_eval distinct prompts (at most a fifth of them, at least one) for
    evaluation. A prompt that appears more than once stays on one side: its repeats never leak into training.
        rows q1 q2 q2 q3 q4 (shuffled), num_eval 1  ->  held out [q1], train [q2, q2, q3, q4]"""
    shuffled = problems[:]
    random.Random(seed).shuffle(shuffled)
    first_row: dict[str, Problem] = {}  # each distinct prompt's first row, in shuffled order
    for p in shuffled:
        first_row.setdefault(p.prompt, p)
    evaluation = list(first_row.values())[:max(1, min(num_eval, len(first_row) // 5))]
    held_out = {p.prompt for p in evaluation}
    train = [p for p in shuffled if p.prompt not in held_out]
    if not train:
        raise ConfigError(f"--data: {len(first_row)} distinct prompt(s); after holding one out for evaluation, none is "
                          f"left to train on")
    return train, evaluation


def check_prompt_lengths(problems: list, count_tokens: Callable[[str], int], context: int,
                         completion_length: int) -> None:
    """One line, instead of an allocation or an index error at step 1, when a prompt and --max_completion_length
    (`completion_length`) do not fit in the model's `context`: naming file:line for a --data row. Generated prompts
    are short (under 200 tokens): they are checked only when the room left is tight."""
    limit = context - completion_length
    if limit < 1:
        raise ConfigError(f"--max_completion_length {completion_length}: the model's context is {context} tokens, "
                          f"which leaves no room for the prompt")
    for p in problems:
        if (getattr(p, "source", "") or limit < 1024) and count_tokens(p.prompt) > limit:
            raise ConfigError(f"{p.source or 'a generated prompt'}: the prompt has {count_tokens(p.prompt)} tokens, "
                              f"more than the {limit} the model's context ({context}) leaves beside "
                              f"--max_completion_length {completion_length}; shorten it, or lower that flag")


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
    """Unicode minus (U+2212) -> "-", and LaTeX \\frac{a}{b} / \\dfrac{a}{b} -> "a/b": forms the number regex reads."""
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


class RewardError(ConfigError):
    """A reward function that raised or returned something unusable. It can only show up mid-run, so train() saves
    first; the CLI then prints it as one line, like any other bad input."""


def checked_rewards(reward_fn: Callable, completions: list, answers: list) -> list:
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


class PromptOrder:
    """The training problems in a seeded order, reshuffled every epoch. Its state goes into checkpoints."""

    def __init__(self, problems: list, seed: int):
        self.problems, self.rng, self.queue = problems, random.Random(seed), []  # the queue is drawn from its end

    def draw(self, n: int) -> list:
        """The next n training problems."""
        while len(self.queue) < n:
            self.queue[:0] = self.rng.sample(range(len(self.problems)), len(self.problems))
        return [self.problems[self.queue.pop()] for _ in range(n)]

    def state_dict(self) -> dict:
        return {"order": list(self.queue), "order_rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.queue[:] = state["order"]
        self.rng.setstate(state["order_rng"])


def format_prompt(tokenizer, question: str) -> str:
    """The question as the model sees it: through the chat template when the tokenizer has one."""
    content = f"{question}\n{INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {content}\nAnswer:"


def encode_prompts(tokenizer, problems: list, device: torch.device):
    """The problems' prompts through the chat template, tokenized and left-padded: (ids, mask), each [B, P]."""
    enc = tokenizer([format_prompt(tokenizer, p.prompt) for p in problems], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(device)
    return enc.input_ids, enc.attention_mask
