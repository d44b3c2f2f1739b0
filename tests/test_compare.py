"""benchmarks/compare.py end to end on the tiny offline model: 1 seed, 2 steps, four methods."""

import json

from conftest import run_script


def test_compare_runs_all_four_methods(tiny_model_dir, tmp_path):
    out = tmp_path / "compare"
    result = run_script(
        "benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "--set", f"model={tiny_model_dir}",
        "max_steps=2", "prompts_per_step=2", "num_generations=2", "max_completion_length=8", "num_eval_problems=4",
        "num_train_problems=20", "device=cpu", "eval_every=1", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "grpo", "seed_grpo", "gfpo_shortest", "gfpo_token_efficiency"]
    assert "n/a" not in rows[1].split("|")[5]  # SEED-GRPO reports its mean semantic entropy
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summaries"]["gfpo_shortest"][0]["tokens_trained"] <= summary["summaries"]["gfpo_shortest"][0][
        "tokens_sampled"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in result.stdout
    else:
        assert (out / "curves.png").stat().st_size > 10_000
