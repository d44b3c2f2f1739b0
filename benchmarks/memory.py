"""benchmarks/memory.py: where a training run's memory goes, phase by phase (docs/PERFORMANCE.md's breakdown).

    python benchmarks/memory.py                          # the Quickstart's settings, 3 steps
    python benchmarks/memory.py --steps 8 -- --max_tokens_per_micro_batch 1024 --no-keep_freed_memory
    python benchmarks/memory.py --steps 8 --trim                # glibc's malloc_trim(0) after every step
    python benchmarks/memory.py --steps 50 --heap               # glibc's heap after every step: in use, free, pieces
    python benchmarks/memory.py --steps 1 --json out.json -- --model DIR   # the numbers as JSON too (benchmarks/fit.py)

It runs grpo_mini.train() in this process with every flag after `--` passed on, samples the process's resident memory
(RSS) every 10 ms, and names the phase each sample falls in: loading the model, the sampling copy, evaluation,
generation, the log-prob forward and backward, the optimiser step. For each phase it prints the RSS when the phase
was first entered and the highest RSS seen in it, and at the end the run's peak (ru_maxrss, what `/usr/bin/time -v`
reports as "Maximum resident set size"), and grpo_step's phase seconds summed over the steps after the first. The
sizes it can compute exactly are printed beside: the fp32 weights, their gradients, AdamW's two moments, and the bf16
sampling copy. --trim returns the freed memory to the OS after every step (an experiment: docs/PERFORMANCE.md).
--heap prints glibc's own account after every step (mallinfo2): the bytes in use, the free bytes it keeps, and in
how many pieces. Bytes in use that grow from step to step are something kept; free bytes in ever more pieces are
fragmentation (how the kernel caches were found: docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402
import grpo_mini as gm  # noqa: E402
from benchmarks.cli import at_least, run_main, short_run_argv  # noqa: E402

GIB = 2**30


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (<malloc.h>, glibc >= 2.33)
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def glibc_heap() -> Optional[dict]:
    """glibc's heap now: bytes in use, free bytes kept, free pieces; None where malloc is not glibc's."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "free_pieces": info.ordblks}


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PhaseMemory:
    """RSS sampled every 10 ms; each sample is charged to the phase that is running (the innermost one)."""

    def __init__(self):
        self.stack, self.entered, self.peak, self._stop = ["setup"], {}, {}, threading.Event()
        self.calls = []  # [phase, RSS on entry, highest RSS during] per call, in order

    def __enter__(self):
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def _sample(self):
        while not self._stop.is_set():
            phase, now = self.stack[-1], rss()
            self.peak[phase] = max(self.peak.get(phase, 0), now)
            if self.calls and self.calls[-1][0] == phase:
                self.calls[-1][2] = max(self.calls[-1][2], now)
            time.sleep(0.01)

    def wrap(self, module, name: str, phase: str) -> None:
        """Charge the memory of module.name's calls to `phase`."""
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            self.entered.setdefault(phase, rss())
            self.calls.append([phase, rss(), rss()])
            self.stack.append(phase)
            try:
                return original(*args, **kwargs)
            finally:
                self.peak[phase] = max(self.peak.get(phase, 0), rss())
                self.calls[-1][2] = max(self.calls[-1][2], rss()) if self.calls[-1][0] == phase else self.calls[-1][2]
                self.stack.pop()
        setattr(module, name, wrapped)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=at_least(1), default=3, help="training steps")
    parser.add_argument("--trim", action="store_true", help="call glibc's malloc_trim(0) after every step")
    parser.add_argument("--heap", action="store_true",
                        help="print glibc's heap (in use, free, pieces) after every step")
    parser.add_argument("--json", type=Path, help="also write every number printed here to this JSON file")
    parser.add_argument("flags", nargs="*", help="grpo_mini.py flags, after --")
    args = parser.parse_args()
    phases, rollouts, heaps, real_step = [], [], [], gm.grpo_step

    def step(*step_args, **kwargs):  # grpo_step, its phase seconds and rollout shape kept (heap trimmed with --trim)
        out = real_step(*step_args, **kwargs)
        ro = out[0]
        phases.append(out[3])
        rollouts.append({"rows": ro.completion_ids.size(0), "prompt_tokens": ro.prompt_ids.size(1),
                         "completion_tokens": ro.completion_ids.size(1)})  # padded widths
        if args.trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        heap = glibc_heap() if args.heap else None
        if heap:
            heaps.append({"step": len(phases), "rss": rss(), **heap})
            print(f"heap after step {len(phases)}: RSS {heaps[-1]['rss'] / GIB:.2f} GiB; glibc: in use "
                  f"{heap['in_use'] / GIB:.2f}, free {heap['free'] / GIB:.2f} GiB in {heap['free_pieces']} pieces",
                  flush=True)
        return out
    gm.grpo_step = step
    with tempfile.TemporaryDirectory() as out:
        cfg = gm.parse_config(argv=short_run_argv(args.steps, Path(out) / "run", args.flags))
        memory = PhaseMemory()
        for module, name, phase in [(engine, "load_model_and_tokenizer", "1 load the model"),
                                    (engine, "make_sampling_model", "2 the bf16 sampling copy"),
                                    (gm, "evaluate", "3 evaluation (greedy, held-out)"),
                                    (gm, "rollout", "4 generation"),
                                    (gm, "accumulate_gradients", "5 log-probs, loss and backward"),
                                    (gm, "optimizer_step", "6 optimiser step")]:
            memory.wrap(module, name, phase)
        start = rss()
        with memory:
            summary = gm.train(cfg)
        model = summary["model"]
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\n{Path(sys.argv[0]).name}: {args.steps} steps of the Quickstart's settings"
          f"{' with ' + ' '.join(args.flags) if args.flags else ''}; RSS in GiB (process start: {start / GIB:.2f})\n")
    print("| phase | RSS when first entered | highest RSS in it |\n|---|---|---|")
    for phase in sorted(memory.peak):
        entered = memory.entered.get(phase)
        print(f"| {phase} | {'-' if entered is None else f'{entered / GIB:.2f}'} | {memory.peak[phase] / GIB:.2f} |")
    print("\nEvery call, in order (RSS on entry -> highest RSS during, GiB):")
    print("\n".join(f"  {phase}: {entry / GIB:.2f} -> {high / GIB:.2f}" for phase, entry, high in memory.calls))
    later = phases[1:] or phases
    print("grpo_step's seconds, summed over steps 2-" + str(len(phases)) + ": "
          + ", ".join(f"{name} {sum(p.get(name, 0.0) for p in later):.1f}" for name in later[0]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\npeak RSS of the run (ru_maxrss): {peak / GIB:.2f} GiB")
    print(f"computed: {params / 1e6:.1f}M parameters: fp32 weights {4 * params / GIB:.2f} GiB, gradients "
          f"{4 * params / GIB:.2f}, AdamW moments {8 * params / GIB:.2f}, bf16 sampling copy {2 * params / GIB:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "flags": args.flags, "steps": args.steps, "process_start_rss": start, "peak_rss": peak,
            "parameters": params, "trainable_parameters": trainable,
            "phases": {phase: {"entered": memory.entered.get(phase), "peak": memory.peak[phase]}
                       for phase in sorted(memory.peak)},
            "calls": [{"phase": phase, "entered": entry, "peak": high} for phase, entry, high in memory.calls],
            "rollouts": rollouts, "phase_seconds": phases, "heap": heaps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
