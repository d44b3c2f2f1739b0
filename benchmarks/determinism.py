"""benchmarks/determinism.py: is a training run reproducible? The same short run, several times in one process.

    python benchmarks/determinism.py                     # 2 runs of 2 steps at the Quickstart's settings
    python benchmarks/determinism.py --runs 3 -- --max_tokens_per_micro_batch 1024

Each run starts from the same weights with the same seed, trains --steps steps with every flag after `--` passed on
to grpo_mini.train(), and ends with a digest (SHA-256 of every trained weight's bytes) printed. Equal digests: the runs
computed the same numbers, bit for bit. Exit 0 when all are equal, 1 when not. The runs share one process, so each
finds the allocator in another state; a kernel whose result depends on where its inputs lie, or on thread timing,
shows here. What it found on the AMD CPU (docs/PERFORMANCE.md): the default 4096-token micro-batches reproduced, and
1024-token ones did not (after 2 steps, one of two sets of weights), until torch's deterministic kernels were on
(`-- --max_tokens_per_micro_batch 1024 --full_determinism`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import grpo_mini as gm  # noqa: E402
from benchmarks.cli import at_least, run_main, short_run_argv  # noqa: E402


def weights_digest(model) -> str:
    """The first 12 hex digits of SHA-256 over every trained weight (name order), as fp32 bytes."""
    digest = hashlib.sha256()
    for name, weight in sorted(model.named_parameters()):
        if weight.requires_grad:
            digest.update(name.encode())
            digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=at_least(2), default=2, help="how many times to train the same run")
    parser.add_argument("--steps", type=at_least(1), default=2, help="training steps in each run")
    parser.add_argument("flags", nargs="*", help="grpo_mini.py flags, after --")
    args = parser.parse_args()
    digests = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as out:
            cfg = gm.parse_config(argv=short_run_argv(args.steps, Path(out) / "run",
                                                      ["--num_eval_problems", "1", *args.flags]))
            digests.append(weights_digest(gm.train(cfg)["model"]))
        print(f"[determinism] run {run + 1} of {args.runs}: weights after {args.steps} steps {digests[-1]}", flush=True)
    same = len(set(digests)) == 1
    print(f"[determinism] {' '.join(args.flags) or 'the default flags'}: "
          f"{'reproducible: every run computed the same weights' if same else 'NOT reproducible: ' + ' '.join(digests)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
