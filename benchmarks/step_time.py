"""benchmarks/step_time.py: one GRPO step, phase by phase, for grpo_mini and (when installed) TRL's GRPOTrainer.

    python benchmarks/step_time.py                            # tiny random model and SmolLM2-135M, beta 0 and 0.04
    python benchmarks/step_time.py --models smollm2 --betas 0 --rounds 2 --steps 2    # docs/PERFORMANCE.md's table
    python benchmarks/step_time.py --models qwen2.5-0.5b-random --device cuda    # on a GPU
    python benchmarks/step_time.py --models smollm2 --betas 0 --no-trl --compile train   # torch.compile's effect

Both sides get the same model weights, prompts, num_generations (8), prompts per step (4), completion length
(64 tokens, forced with min_new_tokens = max_new_tokens so that both generate exactly as many tokens),
temperature, top_k/top_p, loss_type (dapo) and beta. On the CPU the process first calls
engine.keep_freed_memory and engine.bound_kernel_caches, as train() does; both settings are process-wide, so TRL's
blocks get them too (--no-keep-freed-memory turns the first off). The reward is dense (the completion's length in
characters), so groups almost never have zero spread. grpo_mini's skip of zero-advantage rows therefore does not help
here, and the numbers measure raw step efficiency. The implementations run in alternating blocks in this one process:
round r runs grpo_mini for `--steps` steps, then TRL for `--steps`. The first step of every block is a warm-up and is
not counted.

TRL runs twice: `trl_default` is GRPOConfig's own defaults (gradient checkpointing on, bf16 on), and `trl_best` is
what a user after speed would set on this device: gradient checkpointing off (memory allows it at these sizes) and
bf16 only where the device computes it fast (CUDA, or a CPU with AMX / AVX512-BF16), else fp32. grpo_mini runs
with --dtype auto, which picks by the same rule.

Utilisation. The FLOPs are the USEFUL matmul work of a step, the same numerator for every implementation:
    generation        2 x params x (distinct prompt tokens + generated tokens)
    ref/old log-probs 2 x params x (distinct prompt tokens + completion tokens), per forward that a setting needs
    loss + backward   6 x params x (distinct prompt tokens + completion tokens)
params counts every weight matrix once (a tied embedding once, as the vocabulary projection); attention's own
score and value products (about 4 x layers x context x width per token) are left out, as in the usual 6N rule.
So an implementation that prefills each prompt G times, or recomputes activations, does more work for the same
FLOPs and shows a lower utilisation. utilisation = FLOPs / (seconds x peak), where peak is the best matmul rate this
script measures itself at the model's shapes, in the dtype that phase runs in.

Reported per implementation: the median seconds of each phase (generation, reference/old log-probs, loss and
backward, optimiser) and of the whole step, completion tokens per second, and peak memory. Peak memory is
measured in a FRESH process per implementation, one block of --steps steps after the models are loaded: the peak
RSS above the RSS before the block (a 10 ms sampler; it covers activations, logits and optimiser state) on CPU,
or torch.cuda.max_memory_allocated on CUDA. Inside the shared timing process, memory that the allocator kept from
the other implementation's block would hide part of the next block's growth. The last table gives grpo_mini / TRL
for every figure. TRL is a benchmark-only dependency (`pip install trl`); none of the modules import it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo_mini as g  # noqa: E402
from benchmarks.cli import at_least, run_main  # noqa: E402
from engine import bound_kernel_caches, decoder_layers  # noqa: E402

PHASES = ("generate_s", "ref_old_logps_s", "loss_backward_s", "optimizer_s")
IMPLEMENTATIONS = ("grpo_mini", "trl_best", "trl_default")


def char_count_reward(completions, answers=None, **_):
    """Dense reward for ANY model, random ones included: the completion's length in characters / 100. Samples of
    64 tokens differ in characters, so groups almost never have zero spread and no row can be skipped.
    TRL passes conversational completions as [{"role": "assistant", "content": text}]."""
    return [len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]


def build_model(name: str):
    """(model, tokenizer). All three use SmolLM2's tokenizer from the offline GGUF, so prompts are identical."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    smollm2, tokenizer = g.load_model_and_tokenizer(g.DEFAULT_MODEL)
    torch.manual_seed(0)
    if name == "smollm2":
        return smollm2, tokenizer
    if name == "tiny-random":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    elif name == "qwen2.5-0.5b-random":  # Qwen2.5-0.5B's shape (494M parameters with its 151k vocabulary)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
    else:
        raise SystemExit(f"error: --models: unknown model {name!r}")
    model.generation_config = copy.deepcopy(smollm2.generation_config)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(smollm2.config, key))
    return model, tokenizer


class PeakMemory:
    """Peak memory above the starting point: RSS sampled every 10 ms on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self._rss()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.start)
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self._stop.set()
            self.thread.join()


def compile_layers(model) -> int:
    """Regional compilation: every decoder layer gets torch.compile (inductor, dynamic shapes) on its own. Returns
    how many. The layers share one forward, but not one compiled graph: transformers' KV cache picks a layer's
    entry by the layer's index, an int that dynamo specialises on, so each layer compiles apart (twice in the
    training forward: the prompt pass and the completion pass). dynamo's recompile limit (8 by default) would leave
    the rest eager without a word, so it is raised to fit every layer."""
    import torch._dynamo

    layers = decoder_layers(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(layers))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def grpo_mini_block(model, tokenizer, problems, cfg: g.Config, device, steps: int, compile_where: str = "none") -> dict:
    """`steps` steps of grpo_mini.grpo_step (the code train() runs); per-step phase seconds. compile_where (train,
    sample, both) compiles the decoder layers of the policy and / or of the sampling copy first (compile_layers); the
    compile happens in the block's first step, whose seconds are returned apart as first_step_s."""
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    # as train() does: the training attention kernel by --attn_implementation, the sampling copy keeps the model's own
    dtype = g.pick_dtype(cfg.dtype, device)
    own_kernel = g.use_training_attention(model, cfg.attn_implementation, device, dtype)
    sampler = g.make_sampling_model(model, dtype, own_kernel)
    if compile_where in ("sample", "both"):
        compile_layers(sampler)
    if compile_where in ("train", "both"):
        compile_layers(model)
    records = []
    with PeakMemory(device) as memory:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.99))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        make_advantages = g.grpo_advantage_fn(cfg)
        for step in range(steps):
            batch = problems[step * cfg.prompts_per_step:(step + 1) * cfg.prompts_per_step]
            start = time.perf_counter()
            ro, _, _, seconds = g.grpo_step(model, ref_model, tokenizer, optimizer, scheduler, batch, cfg, device,
                                            char_count_reward, make_advantages, sampler=sampler)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds["step_s"] = time.perf_counter() - start
            seconds["tokens"] = ro.completion_mask.sum().item()
            records.append(seconds)
        del optimizer, ref_model
    model.set_attn_implementation(own_kernel)  # the next block starts from the model as it was loaded
    return {"records": records[1:], "peak_bytes": memory.peak, "first_step_s": records[0]["step_s"]}


def trl_precision(impl: str, device) -> dict:
    """GRPOConfig flags of the two TRL settings (see the module docstring)."""
    if impl == "trl_default":
        return {}  # GRPOConfig's defaults: gradient_checkpointing=True, bf16=True
    fast_bf16 = device.type == "cuda" or g.cpu_has_fast_bf16()
    return {"gradient_checkpointing": False, "bf16": fast_bf16}


def trl_block(model_dir: str, tokenizer, problems, cfg: g.Config, device, steps: int, workdir: str,
              impl: str = "trl_best") -> dict:
    """`steps` steps of TRL's GRPOTrainer with the same settings; phases timed by wrapping its methods.

    TRL gets the model as a directory: with beta > 0 it builds its reference model by loading that path."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"{p.prompt}\n{g.INSTRUCTION}"}]}
            for p in problems[:steps * cfg.prompts_per_step]]
    args = GRPOConfig(
        output_dir=workdir, per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_k=0, top_p=1.0, beta=cfg.beta, loss_type=cfg.loss_type,
        epsilon=cfg.epsilon, learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, max_steps=steps,
        lr_scheduler_type="constant", warmup_steps=0, gradient_accumulation_steps=1, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=device.type == "cpu", **trl_precision(impl, device),
        generation_kwargs={"min_new_tokens": cfg.max_completion_length}, disable_tqdm=True, seed=cfg.seed,
        shuffle_dataset=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=char_count_reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    records, current = [], {}

    def timed(name, fn, only_without_grad=False):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if not (only_without_grad and torch.is_grad_enabled()):
                    current[name] = current.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    trainer._generate = timed("generate_s", trainer._generate)
    trainer._get_per_token_logps_and_entropies = timed(
        "ref_old_logps_s", trainer._get_per_token_logps_and_entropies, only_without_grad=True)
    trainer._clip_grad_norm = timed("clip_s", trainer._clip_grad_norm)

    class PhaseClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.clear()
            current["begin"] = time.perf_counter()

        def on_pre_optimizer_step(self, *_, **__):
            current["pre_optimizer"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            end = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
            # TRL generates and scores inside the step; what remains before the optimiser is scoring, loss, backward.
            before_optimizer = current["pre_optimizer"] - current["begin"] - current.get("clip_s", 0.0)
            records.append({
                "generate_s": current.get("generate_s", 0.0), "ref_old_logps_s": current.get("ref_old_logps_s", 0.0),
                "loss_backward_s": before_optimizer - current.get("generate_s", 0.0)
                - current.get("ref_old_logps_s", 0.0),
                "optimizer_s": end - current["pre_optimizer"] + current.get("clip_s", 0.0),
                "step_s": end - current["begin"],
                "tokens": cfg.prompts_per_step * cfg.num_generations * cfg.max_completion_length,
            })

    trainer.add_callback(PhaseClock())
    with PeakMemory(device) as memory:
        trainer.train()
    del trainer
    return {"records": records[1:], "peak_bytes": memory.peak}


def config_for(beta: float, device) -> g.Config:
    return g.Config(prompts_per_step=4, num_generations=8, max_completion_length=64, beta=beta, loss_type="dapo",
                    temperature=0.7, device=str(device))


def memory_child(args, device, problems) -> int:
    """Child-process mode: load, run one block of one implementation, print its peak memory growth."""
    model, tokenizer = build_model(args.models[0])
    model.to(device)
    cfg = config_for(args.betas[0], device)
    model.generation_config.min_new_tokens = cfg.max_completion_length
    with tempfile.TemporaryDirectory() as workdir:
        if args.memory_of.startswith("trl"):
            g.save_model(model, tokenizer, Path(workdir) / "model")
            del model
            block = trl_block(str(Path(workdir) / "model"), tokenizer, problems, cfg, device, args.steps, workdir,
                              impl=args.memory_of)
        else:
            block = grpo_mini_block(model, tokenizer, problems, cfg, device, args.steps, args.compile)
    print(f"peak_mib {block['peak_bytes'] / 2**20:.1f}")
    return 0


def peak_memory_in_fresh_process(impl: str, model_name: str, beta: float, args) -> float:
    result = subprocess.run([sys.executable, __file__, "--models", model_name, "--betas", str(beta), "--steps",
                             str(args.steps), "--device", args.device, "--memory-of", impl, "--compile", args.compile]
                            + (["--no-keep-freed-memory"] if args.no_keep_freed_memory else []),
                            capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("peak_mib ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"error: memory measurement of {impl} failed:\n{result.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def summarise(blocks: list) -> dict:
    records = [r for block in blocks for r in block["records"]]
    out = {key: statistics.median(r[key] for r in records) for key in PHASES + ("step_s",)}
    out["tokens_per_s"] = statistics.median(r["tokens"] / r["step_s"] for r in records)
    out["tokens"] = statistics.median(r["tokens"] for r in records)
    out["steps"] = len(records)
    return out


def matmul_params(model) -> int:
    """Weights that take part in a matmul per token: every parameter of >= 2 dimensions, a tied matrix once."""
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2)


def measured_peak_flops(model, dtype: torch.dtype, device, tokens: int = 2048, repeats: int = 5) -> float:
    """The best matmul rate (FLOP/s) at this model's shapes: [tokens, in] @ [in, out] for every distinct weight
    shape (attention, MLP, vocabulary projection), in `dtype`, median of `repeats` after a warm-up."""
    shapes = sorted({tuple(p.shape) for p in model.parameters() if p.dim() == 2})
    best = 0.0
    for out_features, in_features in shapes:
        x = torch.randn(tokens, in_features, dtype=dtype, device=device)
        w = torch.randn(in_features, out_features, dtype=dtype, device=device)
        x @ w
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            x @ w
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = max(best, 2 * tokens * in_features * out_features / statistics.median(times))
    return best


def phase_flops(params: int, prompt_tokens: float, completion_tokens: float, beta: float) -> dict:
    """Useful matmul FLOPs per phase of one step (module docstring): the same for every implementation."""
    tokens = prompt_tokens + completion_tokens
    return {"generate_s": 2 * params * tokens, "ref_old_logps_s": 2 * params * tokens if beta > 0 else 0.0,
            "loss_backward_s": 6 * params * tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-random", "smollm2"],
                        help="tiny-random | smollm2 | qwen2.5-0.5b-random")
    parser.add_argument("--betas", nargs="+", type=at_least(0.0, float), default=[0.0, 0.04])
    parser.add_argument("--rounds", type=at_least(1), default=2, help="alternating blocks per implementation")
    parser.add_argument("--steps", type=at_least(2), default=3, help="steps per block; the first is a warm-up")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-trl", action="store_true", help="time grpo_mini alone")
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave glibc's allocator at its defaults (engine.keep_freed_memory is process-wide, "
                             "so by default it applies to every implementation here, TRL included)")
    parser.add_argument("--compile", choices=("none", "train", "sample", "both"), default="none",
                        help="torch.compile grpo_mini's decoder layers (compile_layers): in the training model, in the "
                             "sampling copy, or both; the compile falls in each block's first (untimed) step, whose "
                             "seconds are printed")
    parser.add_argument("--memory-of", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("error: --steps must be >= 2 (the first step of a block is a warm-up)")
    device = g.pick_device(args.device)
    try:
        import trl  # noqa: F401
        with_trl = not args.no_trl
    except ImportError:
        with_trl = False
        print("trl is not installed: timing grpo_mini alone (pip install trl to compare)")
    g.set_seed(0)
    problems = g.make_arithmetic_split(0, 400, 1)[0]
    kept = device.type == "cpu" and not args.no_keep_freed_memory and g.keep_freed_memory()  # as train() does
    kernel_caches = bound_kernel_caches()  # as train() does, before the first matmul (measured_peak_flops')
    if args.memory_of:
        return memory_child(args, device, problems)
    impls = list(IMPLEMENTATIONS) if with_trl else ["grpo_mini"]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, fast bf16 on this CPU: "
          f"{g.cpu_has_fast_bf16()}; 4 prompts x 8 generations x 64 tokens, dapo, median over {args.rounds} x "
          f"{args.steps - 1} steps; freed memory kept in the process (all implementations): {kept}; "
          f"matmul kernel caches (all implementations): {kernel_caches}; "
          f"torch.compile of grpo_mini's layers: {args.compile}")
    header = ("| model | beta | impl | dtype | generate s | ref/old s | loss+bwd s | optim s | step s | tok/s | "
              "peak MiB |")
    rows, ratios, utilisation = [header, "|" + "---|" * 11], [], []
    for name in args.models:
        base_model, tokenizer = build_model(name)
        model = base_model.to(device)
        params = matmul_params(model)
        peaks = {dtype: measured_peak_flops(model, dtype, device) for dtype in (torch.float32, torch.bfloat16)}
        print(f"{name}: {params / 1e6:.1f}M matmul parameters; measured matmul peak fp32 "
              f"{peaks[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s", flush=True)
        trl_dir = tempfile.TemporaryDirectory()
        if with_trl:
            g.save_model(base_model, tokenizer, Path(trl_dir.name))
        for beta in args.betas:
            cfg = config_for(beta, device)
            model.generation_config.min_new_tokens = cfg.max_completion_length  # grpo_mini's forced length
            blocks = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                blocks["grpo_mini"].append(grpo_mini_block(model, tokenizer, problems, cfg, device, args.steps,
                                                           args.compile))
                if args.compile != "none":
                    print(f"compiled ({args.compile}): the block's first step took "
                          f"{blocks['grpo_mini'][-1]['first_step_s']:.1f} s", flush=True)
                for impl in impls[1:]:
                    with tempfile.TemporaryDirectory() as workdir:
                        blocks[impl].append(trl_block(trl_dir.name, tokenizer, problems, cfg, device, args.steps,
                                                      workdir, impl=impl))
            summary = {impl: summarise(b) for impl, b in blocks.items()}
            for impl in summary:
                summary[impl]["peak_mib"] = peak_memory_in_fresh_process(impl, name, beta, args)
            # the distinct prompt tokens of the timed steps' batches (the same prompts for every implementation)
            batches = [problems[i * cfg.prompts_per_step:(i + 1) * cfg.prompts_per_step] for i in range(1, args.steps)]
            prompt_tokens = statistics.mean(
                sum(len(tokenizer(g.format_prompt(tokenizer, p.prompt), add_special_tokens=False).input_ids)
                    for p in batch) for batch in batches)
            for impl, s in summary.items():
                dtype = (g.pick_dtype(cfg.dtype, device) if impl == "grpo_mini" else
                         torch.bfloat16 if trl_precision(impl, device).get("bf16", True) else torch.float32)
                rows.append(f"| {name} | {beta:g} | {impl} | {str(dtype).replace('torch.', '')} | "
                            f"{s['generate_s']:.2f} | {s['ref_old_logps_s']:.2f} | {s['loss_backward_s']:.2f} | "
                            f"{s['optimizer_s']:.2f} | {s['step_s']:.2f} | {s['tokens_per_s']:.0f} | "
                            f"{s['peak_mib']:.0f} |")
                flops = phase_flops(params, prompt_tokens, s["tokens"], beta)
                total = sum(flops.values())
                cells = [f"{flops[k] / 1e12:.2f} TFLOP, {flops[k] / s[k] / peaks[dtype]:.0%}" if flops[k] and s[k]
                         else "-" for k in ("generate_s", "ref_old_logps_s", "loss_backward_s")]
                utilisation.append(f"| {name} | {beta:g} | {impl} | " + " | ".join(cells)
                                   + f" | {total / 1e12:.2f} TFLOP, {total / s['step_s'] / peaks[dtype]:.0%} |")
            for impl in impls[1:]:
                ours, theirs = summary["grpo_mini"], summary[impl]
                ratio = {k: ours[k] / theirs[k] if theirs[k] else float("nan")
                         for k in PHASES + ("step_s", "tokens_per_s", "peak_mib")}
                ratios.append(f"| {name} | {beta:g} | {impl} | " + " | ".join(f"{ratio[k]:.2f}" for k in
                              ("generate_s", "ref_old_logps_s", "loss_backward_s", "optimizer_s", "step_s",
                               "tokens_per_s", "peak_mib")) + " |")
            print("\n".join(rows[-len(impls):]), flush=True)
        trl_dir.cleanup()
    print("\n" + "\n".join(rows))
    print("\nUseful matmul FLOPs per phase, and utilisation = FLOPs / (seconds x measured peak in that dtype)\n")
    print("| model | beta | impl | generation | ref/old log-probs | loss+backward | whole step |\n|" + "---|" * 7)
    print("\n".join(utilisation))
    if ratios:
        print("\ngrpo_mini / TRL (step time and memory: lower is better; tok/s: higher is better)\n")
        print("| model | beta | vs | generate | ref/old | loss+bwd | optim | step | tok/s | peak mem |\n|"
              + "---|" * 10)
        print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
