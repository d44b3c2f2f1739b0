"""benchmarks/fit.py: will it fit? One training step of bigger models, its peak memory measured on the CPU, and what
that predicts for the README's GPU settings on one GPU (the card table of docs/PERFORMANCE.md, "Will it fit?").

    python benchmarks/fit.py                                  # the four rows below, about 5 minutes on 2 CPU cores
    python benchmarks/fit.py --models qwen2.5-0.5b --prompts 1
    python benchmarks/fit.py --table runs/fit/fit.json           # the table again, from an earlier run's JSON
    python benchmarks/fit.py --output runs/fit/checkpointed.json -- --gradient_checkpointing    # another setting
    python benchmarks/fit.py --table runs/fit/fit.json runs/fit/checkpointed.json   # ... in brackets beside

Each model is built from its published config in code, with random weights (nothing is downloaded), and saved with
SmolLM2's tokenizer. One step of grpo_mini.train then runs in a subprocess under benchmarks/memory.py with the README
GPU command's settings (G = 8, --beta 0.04, so a reference model, --max_tokens_per_micro_batch 16384), bf16
autocast, sdpa attention, and glibc's default allocator (--no-keep_freed_memory, so that RSS follows what is live),
but smaller: 2 prompts, not 16, and 64 completion tokens, not 512. A random model almost never samples EOS, so its
rows are all 64 tokens long. Why smaller: the full step does not fit here (16 rows of 512 tokens of SmolLM2-360M
alone grew past this machine's 24 GiB and the OOM killer ended it), and would take an hour for the 1.5B model. What
a step keeps grows linearly with its tokens: the KV cache, the activations and the logits do, and sdpa's CPU kernel
keeps no [T, T] matrix for the backward, with a mask or without (measured: 8 layers of 16 x 15 heads keep 0.08 GiB
at T = 256 and 0.19 at 512), as a GPU's flash or memory-efficient kernel keeps none.

MEASURED (on this CPU, the small step): the run's peak RSS, and two increments:
    generation   RSS peak during the rollout minus RSS entering it (the KV cache and the sampling buffers), per
                 token of its rows (prompt + completion: the cache holds each row's copy of its prompt)
    backward     RSS peak during log-probs, loss and backward minus RSS entering it, less the fp32 gradients
                 (4 bytes per trainable parameter): the activations and logits of the micro-batch, per token it
                 forwards (each distinct prompt once, every completion: forwarded_tokens)
PREDICTED (for 16 prompts x 8 completions of 512 tokens on one GPU, a later step, whose AdamW moments exist):
    fixed       fp32 weights 4, bf16 sampling copy 2, AdamW 8 bytes per trainable parameter, and for full fine-tuning
                with beta > 0 an fp32 reference copy 4 (LoRA's reference is the same model with its adapters off)
    peak        fixed + max(generation per token x 128 rows x their tokens,
                            4 per trainable parameter + backward per token x the micro-batch's forwarded tokens)
    Linear in tokens: an estimate, slightly high for generation (the sampling buffers are per row, not per token).
    A card fits when the prediction plus 1 GiB (CUDA context and allocator slack, not measured) is at most its
    memory; the table gives, per card, the largest --max_tokens_per_micro_batch (16384 down to 1024) that fits.
    Qwen2.5-1.5B full fine-tuning needs more than this machine's 24 GiB, so its row is predicted from its LoRA run's
    per-token increments (the same activations; LoRA's own are small) with the base model's full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.cli import at_least, run_main  # noqa: E402

GIB = 2**30
G, ROWS_ON_GPU, MICRO_BATCH_TOKENS = 8, 16 * 8, 16384  # the README's --prompts_per_step 16 x --num_generations 8
CARDS_GB = (16, 24, 48, 80)
MICRO_BATCHES = (16384, 8192, 4096, 2048, 1024)  # --max_tokens_per_micro_batch; a 512-token row needs 1024
GPU_COMPLETION_TOKENS = 512
README_GPU_FLAGS = ["--num_generations", str(G), "--beta", "0.04",
                    "--learning_rate", "1e-6", "--max_tokens_per_micro_batch", str(MICRO_BATCH_TOKENS),
                    "--attn_implementation", "sdpa", "--no-keep_freed_memory", "--num_eval_problems", "1"]
# The published configs (config.json on the hub), as transformers classes and arguments.
MODELS = {
    "smollm2-360m": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}
ROWS = [("smollm2-360m", 0), ("qwen2.5-0.5b", 0), ("qwen2.5-1.5b", 16)]  # (model, LoRA rank; 0: full fine-tuning)


def build_model(name: str, directory: Path, tokenizer) -> None:
    """A random-weight model with `name`'s config, saved in bf16 with `tokenizer` (its ids cover the prompts; the
    model's larger vocabulary only makes the logits larger, as the real model's would be)."""
    import torch
    import transformers

    config_name, model_name, settings = MODELS[name]
    config = getattr(transformers, config_name)(bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **settings)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def measure(name: str, lora_r: int, prompts: int, completion_tokens: int, workdir: Path, extra: list) -> dict:
    """One step under benchmarks/memory.py in a subprocess; its JSON report."""
    model_dir, report = workdir / name, workdir / f"{name}_r{lora_r}.json"
    if not model_dir.is_dir():
        import engine
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one line per model, not the loading bars
        build_model(name, model_dir, engine.load_model_and_tokenizer(engine.DEFAULT_MODEL)[1])
    flags = ["--model", str(model_dir), "--prompts_per_step", str(prompts), "--max_completion_length",
             str(completion_tokens), *README_GPU_FLAGS, *extra]
    flags += ["--lora_r", str(lora_r)] if lora_r else []
    print(f"[fit] {name}{f' LoRA r={lora_r}' if lora_r else ''}: one step of {prompts} x 8 rows of "
          f"{completion_tokens} tokens ...", flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--steps", "1", "--json",
                             str(report), "--", *flags], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {name}: the step failed (exit {result.returncode}): "
                         f"{(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(report.read_text())


def first_call(report: dict, phase_prefix: str) -> dict:
    return next(call for call in report["calls"] if call["phase"].startswith(phase_prefix))


def forwarded_tokens(rows: int, prompt_tokens: int, completion_tokens: int) -> int:
    """Tokens the training forward runs for `rows` rows in groups of G: each distinct prompt once (the shared-prompt
    forward), every completion. The micro-batch budget counts prompt + completion per row instead. 16 rows of 64 + 64
    tokens -> 2 x 64 + 16 x 64 = 1152 forwarded (2048 counted)."""
    return -(-rows // G) * prompt_tokens + rows * completion_tokens


def increments(report: dict) -> dict:
    """The measured increments of one step (see the module docstring): generation per token of the rollout's rows
    (the KV cache holds every row's prompt and completion), the backward per forwarded token."""
    shape = report["rollouts"][0]
    rows, prompt_tokens, completion_tokens = shape["rows"], shape["prompt_tokens"], shape["completion_tokens"]
    generation, backward = first_call(report, "4 "), first_call(report, "5 ")
    grads = 4 * report["trainable_parameters"]
    return {"rows": rows, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "generation_per_token": (generation["peak"] - generation["entered"]) / (rows * (prompt_tokens
                                                                                          + completion_tokens)),
            "backward_per_token": max(0, backward["peak"] - backward["entered"] - grads)
            / forwarded_tokens(rows, prompt_tokens, completion_tokens)}


def predict(parameters: int, trainable: int, full_reference: bool, inc: dict, micro_batch_tokens: int) -> float:
    """Predicted peak bytes of a later step of ROWS_ON_GPU rows of inc's prompt plus GPU_COMPLETION_TOKENS, on one
    GPU. Example: 100 parameters, all trained, a full reference; 10 bytes a token in generation, 2 in the backward,
    prompts of 0 tokens (rows of 512) -> fixed 4*100 + 2*100 + 8*100 + 4*100 = 1800; with a 16384-token micro-batch,
    32 rows of 512 in one: max(10 * 128 * 512 = 655360, 4*100 + 2 * 32 * 512 = 33168) -> 657160; and with 1 byte a
    token in generation and a 1024-token micro-batch (2 rows): max(65536, 400 + 2048) -> 67336. With prompts of 64
    tokens, a 16384-token micro-batch holds 28 rows of 576, which forward 4 x 64 + 28 x 512 = 14592 tokens."""
    fixed = 4 * parameters + 2 * parameters + 8 * trainable + (4 * parameters if full_reference else 0)
    row_tokens = inc["prompt_tokens"] + GPU_COMPLETION_TOKENS
    rows_per_micro_batch = max(1, min(ROWS_ON_GPU, micro_batch_tokens // row_tokens))
    forwarded = forwarded_tokens(rows_per_micro_batch, inc["prompt_tokens"], GPU_COMPLETION_TOKENS)
    backward = 4 * trainable + inc["backward_per_token"] * forwarded
    return fixed + max(inc["generation_per_token"] * ROWS_ON_GPU * row_tokens, backward)


def result_row(model: str, training: str, parameters: int, trainable: int, inc: dict, measured_peak) -> dict:
    """One row of the table: what was measured (None: nothing) and the predictions at 16384 and 4096 tokens."""
    full = training == "full"  # full fine-tuning keeps an fp32 reference copy; LoRA's reference is its adapters off
    return {"model": model, "training": training, "parameters": parameters, "trainable_parameters": trainable,
            "increments": inc, "measured_peak": measured_peak,
            "predicted": predict(parameters, trainable, full, inc, MICRO_BATCH_TOKENS),
            "predicted_4096": predict(parameters, trainable, full, inc, 4096)}


def largest_micro_batch(row: dict, card_gb: int):
    """The largest --max_tokens_per_micro_batch of MICRO_BATCHES predicted to fit a card of card_gb GB (prediction
    plus 1 GiB at most the card's bytes), or None."""
    full_reference = row["training"] == "full"
    for tokens in MICRO_BATCHES:
        if predict(row["parameters"], row["trainable_parameters"], full_reference, row["increments"], tokens) + GIB \
                <= card_gb * 1e9:
            return tokens
    return None


def table(results: list, prompts: int = 2, completion_tokens: int = 64, alternative: list = ()) -> str:
    """The card table (docs/PERFORMANCE.md, "Will it fit?"): per card, the largest micro-batch predicted to fit
    ("-": none of MICRO_BATCHES); with `alternative` (the same rows measured with other flags, e.g. --
    --gradient_checkpointing), its largest in brackets after each."""
    lines = [f"| model | training | measured: CPU peak RSS, {prompts} x 8 rows of {completion_tokens} tokens | "
             "predicted: one GPU, 16 x 8 rows of 512, micro-batch 16384 / 4096 tokens | "
             + " | ".join(f"{gb} GB" for gb in CARDS_GB) + " |", "|---|---|---|---|" + "---|" * len(CARDS_GB)]
    others = {(row["model"], row["training"]): row for row in alternative}
    for row in results:
        measured = f"{row['measured_peak'] / GIB:.1f} GiB" if row["measured_peak"] else "- (over 24 GiB)"
        other = others.get((row["model"], row["training"]))
        cells = [str(largest_micro_batch(row, gb) or "-") + (f" ({largest_micro_batch(other, gb) or '-'})"
                                                              if other else "") for gb in CARDS_GB]
        lines.append(f"| {row['model']} | {row['training']} | {measured} | {row['predicted'] / GIB:.1f} / "
                     f"{row['predicted_4096'] / GIB:.1f} GiB | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=[name for name, _ in ROWS])
    parser.add_argument("--prompts", type=at_least(1), default=2, help="prompts in the measured step (x 8 rows)")
    parser.add_argument("--completion_tokens", type=at_least(1), default=64, help="completion tokens in the measured "
                        "step (the prediction is for 512)")
    parser.add_argument("--output", type=Path, default=Path("runs/fit/fit.json"))
    parser.add_argument("--table", type=Path, nargs="+", metavar="FIT_JSON", help="print the table of an earlier "
                        "fit.json, and measure nothing; with a second (a run with other flags, e.g. -- "
                        "--gradient_checkpointing), its micro-batches in brackets")
    parser.add_argument("flags", nargs="*", help="more grpo_mini.py flags for the measured step, after --")
    args = parser.parse_args()
    if args.table and len(args.table) > 2:  # argparse has no "one or two"
        parser.error(f"--table takes one or two fit.json files, not {len(args.table)}")
    if args.table:
        earlier, *alternative = [json.loads(path.read_text()) for path in args.table]
        print(table(earlier["rows"], earlier["prompts"], earlier["completion_tokens"],
                    alternative[0]["rows"] if alternative else ()))
        return 0
    import torch

    args.output.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, lora_r in [row for row in ROWS if row[0] in args.models]:
            report = measure(name, lora_r, args.prompts, args.completion_tokens, Path(tmp), args.flags)
            inc = increments(report)
            params, trainable = report["parameters"], report["trainable_parameters"]
            if lora_r:  # and full fine-tuning of the base model (no adapters): predicted only (the module docstring)
                rows = [result_row(name, f"LoRA r={lora_r}", params, trainable, inc, report["peak_rss"]),
                        result_row(name, "full", params - trainable, params - trainable, inc, None)]
            else:
                rows = [result_row(name, "full", params, params, inc, report["peak_rss"])]
            rows[0]["report"] = report
            results += rows
            print("\n".join(table(results[-len(rows):]).splitlines()[2:]), flush=True)
    text = table(results, args.prompts, args.completion_tokens)
    args.output.write_text(json.dumps({"torch": torch.__version__, "prompts": args.prompts,
                                       "completion_tokens": args.completion_tokens, "flags": README_GPU_FLAGS
                                       + args.flags, "rows": results}, indent=1))
    print(f"\n{text}\n\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
