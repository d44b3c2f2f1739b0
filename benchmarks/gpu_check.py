"""benchmarks/gpu_check.py: everything a first GPU session should check, in one command (under 8 minutes on one GPU).

    python benchmarks/gpu_check.py                       # on a CUDA GPU; writes runs/gpu_check/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick  # the same code path on the CPU (what the test suite runs)

1. The fast paths against the plain forms, on the device: on a tiny random model of each of the eight families of
   benchmarks/architectures.py (Llama, Qwen2, Qwen3, Gemma 3, Mistral, Phi-3, GPT-2, OLMo 2), the fast
   sampler's greedy tokens must equal model.generate's, and the shared-prompt log-probs the full forward's, within
   bf16 tolerance under bf16 autocast (fp32: 1e-4); and --gradient_checkpointing's gradient the plain backward's
   (within 1e-3 of the largest entry).
2. A short training run of SmolLM2-135M (grpo_mini.train, --dtype auto: bf16 on CUDA) at the README's GPU settings,
   reporting its generated tokens per second, its phase times (synchronised on CUDA) and peak GPU memory
   (torch.cuda.max_memory_allocated).
3. benchmarks/step_time.py against TRL's GRPOTrainer, when TRL is installed (else the JSON says it was skipped).
Everything goes to one JSON file; the console shows each part's verdict. Nothing here is a number until it has run
on a GPU: docs/PERFORMANCE.md says which GPU numbers exist.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402
import grpo_mini as gm  # noqa: E402
from benchmarks.architectures import ARCHITECTURES, tiny_model  # noqa: E402
from benchmarks.cli import at_least, run_main  # noqa: E402

GPU_SETTINGS = dict(prompts_per_step=16, num_generations=8, max_completion_length=256, max_tokens_per_micro_batch=16384)


def check_fast_paths(tokenizer, device) -> dict:
    """Part 1: per family, greedy tokens equal and the largest log-prob difference, fp32 and bf16 autocast."""
    problems = gm.make_arithmetic_split(0, 4, 1)[0]
    ids, mask = gm.encode_prompts(tokenizer, problems, device)
    eos = gm.eos_token_ids(tiny_model("llama", tokenizer, device), tokenizer)
    results = {}
    for family in ARCHITECTURES:
        model = tiny_model(family, tokenizer, device)
        fast, _ = engine.sample_completions(model, ids, mask, repeats=1, max_new_tokens=16, eos_ids=eos,
                                            pad_id=tokenizer.pad_token_id, greedy=True)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)[:, ids.size(1):]
        torch.manual_seed(1)
        sampled, _ = engine.sample_completions(model, ids, mask, repeats=2, max_new_tokens=16, eos_ids=eos,
                                               pad_id=tokenizer.pad_token_id, temperature=1.0)
        completion_mask = gm.completion_mask(sampled, eos)[0]
        index = torch.arange(ids.size(0), device=device).repeat_interleave(2)
        gaps = {}
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad(), engine.autocast(device, dtype):
                shared = engine.shared_prompt_logps(model, ids, mask, sampled, completion_mask, 0.7, index)
                full = gm.completion_logps(model, ids, mask, sampled, completion_mask, 0.7, index)
            gaps[str(dtype).split(".")[-1]] = ((shared - full).abs() * completion_mask).max().item()
        tolerance = {"float32": 1e-4, "bfloat16": 0.1}
        grads = []  # --gradient_checkpointing: the same gradient (bit for bit on the CPU; CUDA's atomics may reorder)
        for checkpointing in (False, True):
            model.zero_grad()
            with engine.autocast(device, torch.bfloat16), engine.checkpointed_layers(model, checkpointing):
                logps = engine.shared_prompt_logps(model, ids, mask, sampled, completion_mask, 0.7, index)
            (logps * completion_mask).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        checkpointing_gap = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
        results[family] = {"greedy_tokens_equal": bool(torch.equal(fast, plain)), "max_logp_gap": gaps,
                           "checkpointing_relative_grad_gap": checkpointing_gap,
                           "ok": bool(torch.equal(fast, plain)) and all(gaps[k] <= tolerance[k] for k in gaps)
                           and checkpointing_gap <= 1e-3}
    return results


def short_training(device, steps: int, quick: bool, model: str) -> dict:
    """Part 2: grpo_mini.train on SmolLM2-135M at the GPU settings (--quick: a handful of tiny steps)."""
    settings = dict(prompts_per_step=2, num_generations=4, max_completion_length=16, max_tokens_per_micro_batch=4096) \
        if quick else GPU_SETTINGS
    phases = {}
    real_step = gm.grpo_step

    def timed_step(*args, **kwargs):  # grpo_step's own phase seconds (synchronised on CUDA), summed over the steps
        out = real_step(*args, **kwargs)
        for name, seconds in out[3].items():
            phases[name] = phases.get(name, 0.0) + seconds
        return out

    gm.grpo_step = timed_step
    with tempfile.TemporaryDirectory() as out:
        cfg = gm.Config(max_steps=steps, eval_every=0, num_eval_problems=8 if quick else 64, save_every=0,
                        save_model=False, device=str(device), output_dir=str(Path(out) / "run"), model=model,
                        **settings)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.time()
        summary = gm.train(cfg)
        wall = time.time() - start
        records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    gm.grpo_step = real_step
    steps_done = [r for r in records if "tokens_sampled" in r]
    return {"settings": settings, "steps": len(steps_done), "wall_s": wall,
            "tokens_per_s": sum(r["tokens_sampled"] for r in steps_done) / sum(r["step_s"] for r in steps_done),
            "phase_seconds": phases, "held_out_accuracy": [summary["eval_before"]["accuracy"],
                                                          summary["eval_after"]["accuracy"]],
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "dtype": str(engine.pick_dtype(cfg.dtype, device)).split(".")[-1]}


def against_trl(device) -> dict:
    """Part 3: benchmarks/step_time.py on SmolLM2 against TRL, when TRL is installed."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "TRL is not installed (pip install trl)"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--models", "smollm2",
                             "--betas", "0", "--rounds", "1", "--steps", "3", "--device", str(device)],
                            capture_output=True, text=True, timeout=420)
    return {"exit_code": result.returncode, "output": result.stdout[-6000:] or result.stderr[-3000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu (its own test)")
    parser.add_argument("--steps", type=at_least(1), default=10, help="training steps of part 2")
    parser.add_argument("--quick", action="store_true", help="tiny settings for part 2, and no TRL (the CPU test)")
    parser.add_argument("--output", default="runs/gpu_check/gpu_check.json")
    parser.add_argument("--model", default=engine.DEFAULT_MODEL, help="part 2's model, and part 1's tokenizer")
    args = parser.parse_args()
    device = gm.pick_device(args.device)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _, tokenizer = engine.load_model_and_tokenizer(args.model)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
              platform.machine(), "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["fast_paths"] = check_fast_paths(tokenizer, device)
    print(f"1. fast paths = plain forms: {all(r['ok'] for r in report['fast_paths'].values())} "
          f"{ {k: v['max_logp_gap'] for k, v in report['fast_paths'].items()} }", flush=True)
    report["training"] = short_training(device, args.steps, args.quick, args.model)
    print(f"2. training: {report['training']['tokens_per_s']:.0f} generated tokens/s, peak GPU memory "
          f"{report['training']['peak_gpu_memory_gib']} GiB, phases {report['training']['phase_seconds']}", flush=True)
    report["trl"] = {"skipped": "--quick"} if args.quick else against_trl(device)
    print(f"3. against TRL: {report['trl'].get('skipped') or report['trl']['output'][-1500:]}", flush=True)
    output.write_text(json.dumps(report, indent=1))
    print(f"wrote {output}")
    return 0 if all(r["ok"] for r in report["fast_paths"].values()) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
