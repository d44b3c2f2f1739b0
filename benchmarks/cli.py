"""benchmarks/cli.py: what every benchmark's command line shares (and its plots: pyplot, save_figure). Bad values are argparse's usage line; a bad model,
a file that cannot be read or a path that cannot be written is one line and exit 2, never a traceback.

    parser.add_argument("--steps", type=at_least(1), default=60)
    if __name__ == "__main__":
        sys.exit(run_main(main))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from scaling import ConfigError, say


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: `kind(text)`, refused unless >= low (argparse then prints one usage line naming the flag).
        at_least(1)("3") == 3;  at_least(1)("0") -> ArgumentTypeError("must be >= 1 (got 0)")"""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {text})")
        return value
    parse.__name__ = kind.__name__
    return parse


def short_run_argv(steps: int, output_dir, flags: list) -> list:
    """grpo_mini flags for a measured run of `steps` steps that saves and evaluates nothing it need not (memory.py,
    determinism.py), the user's flags last, so that they win."""
    return ["--max_steps", str(steps), "--eval_every", "0", "--save_every", "0", "--no-save_model", "--output_dir",
            str(output_dir), *flags]


def run_main(main: Callable[[], int]) -> int:
    """main()'s exit code; a ConfigError (bad input: a --model that does not load, a bad --data row) or an OSError (a
    path that cannot be read or written) becomes one line on stderr and exit 2, Ctrl-C exit 130."""
    try:
        return main()
    except ConfigError as err:
        say(f"error: {err}", file=sys.stderr)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        say(f"error: {where}{err.strerror or err}", file=sys.stderr)
    except KeyboardInterrupt:
        say("interrupted", file=sys.stderr)
        return 130
    return 2


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, figure, path: Path) -> bool:
    """Lay out, write and close a figure; True (the plot functions' "drawn")."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
