"""benchmarks/plot_run.py: one run's metrics.jsonl as a PNG, for people who would rather look than read.

    python benchmarks/plot_run.py runs/grpo              # writes runs/grpo/metrics.png
    python benchmarks/plot_run.py runs/grpo --out a.png

Panels, per step: training reward, training accuracy (the share of right answers among the step's samples),
training completion length, the share of groups with no reward spread (zero_std: they teach nothing), and the
held-out greedy accuracy at each evaluation. The drawing is compare.py's plot_curves (one run = one "seed").
Needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.cli import run_main  # noqa: E402
from benchmarks.compare import plot_curves  # noqa: E402

RUN_PANELS = [("reward", "training reward"), ("accuracy", "training accuracy (samples right)"),
              ("completion_len", "training completion length (tokens)"),
              ("zero_std_frac", "groups with no reward spread"), ("eval_accuracy", "held-out greedy accuracy")]


def read_records(run_dir: Path) -> list:
    """metrics.jsonl as a list of dicts; a clear one-line error for a missing or broken file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (is {run_dir} a run's --output_dir?)")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise SystemExit(f'error: {path}:{line_no}: not a metrics record (no "step")')
            records.append(record)
    if not any("reward" in r for r in records):
        raise SystemExit(f"error: {path}: no training step logged yet, so there is nothing to plot")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's --output_dir (it holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    records = read_records(args.run_dir)
    out = args.out or args.run_dir / "metrics.png"
    if not plot_curves({args.run_dir.name: [{"records": records}]}, out, RUN_PANELS):
        print("error: the plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
