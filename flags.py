"""flags.py: the command line, built from the config dataclasses. Every field is a --flag, and the string literal on
the line after the field is its --help, so the documentation cannot drift from the flags (grpo_mini.Config,
harness.RunConfig, tasks.DataConfig and each variant's config). run_cli runs train() as the command line does: bad
input is one line and exit 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
from typing import Callable, Optional

from scaling import ConfigError, say, say_on_rank_zero


class NothingToDo(ConfigError):
    """The run asked for is already complete: the CLI says so in one line and exits 0."""



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
                docs[node.target.id] = " ".join(following.value.value.split())  # wrapped lines joined
    return docs


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser(config_cls, description: str = "") -> argparse.ArgumentParser:
    """--flags generated from the dataclass fields, grouped by the class that introduced them (the algorithm's
    first, the run's last); both --num_generations (TRL's spelling) and --num-generations."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs = field_docs(config_cls)
    classes = [k for k in reversed(config_cls.__mro__) if dataclasses.is_dataclass(k)]  # the base first
    owner = {f.name: next(k for k in classes if f.name in k.__dict__.get("__annotations__", {}))
             for f in dataclasses.fields(config_cls)}
    support = [k for k in reversed(classes) if k.__dict__.get("support_flags")]  # the data's, then the run's
    for klass in [k for k in classes if k not in support] + support:
        doc = klass.__doc__ or ""  # a dataclass without a docstring gets its signature as __doc__
        group = parser.add_argument_group(doc.split("\n")[0] if not doc.startswith(klass.__name__ + "(") else
                                          klass.__name__)
        for f in [f for f in dataclasses.fields(config_cls) if owner[f.name] is klass]:
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            kwargs = dict(default=f.default, help=docs.get(f.name, ""), dest=f.name)
            if f.type == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                base = {"int": int, "float": float, "str": str}[f.type.replace("Optional[", "").rstrip("]")]
                kwargs["type"] = _parse_optional(base) if f.type.startswith("Optional") else base
                kwargs["metavar"] = base.__name__.upper()
            group.add_argument(*names, **kwargs)
    return parser


def parse_config(config_cls, argv: Optional[list] = None, description: str = ""):
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def run_cli(train: Callable, cfg, **train_kwargs) -> int:
    """train(cfg) as the command line runs it; train() validates the flags before any model loads."""
    try:
        summary = train(cfg, **train_kwargs)
    except NothingToDo as done:  # --resume of a finished run: say so, write nothing
        say(str(done))
        return 0
    except (ConfigError, MemoryError, RuntimeError) as err:  # bad input; a reward function's bad output; or memory
        out_of_memory = isinstance(err, MemoryError) or re.search(r"out of memory|allocate memory", str(err))
        if not isinstance(err, ConfigError) and not out_of_memory:
            raise
        if out_of_memory:  # train() saved the last finished step first
            err = (f"out of memory ({str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}"
                   f"): lower --prompts_per_step, --num_generations, --max_completion_length or "
                   f"--max_tokens_per_micro_batch")
        say_on_rank_zero(f"error: {err}", file=sys.stderr)
        return 2
    return summary["exit_code"]  # 0, or 130 after Ctrl-C / 143 after SIGTERM, once everything is saved
