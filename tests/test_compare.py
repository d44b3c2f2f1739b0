"""benchmarks/compare.py end to end on the tiny offline model: 1 seed, 2 steps, four methods."""

import json

from conftest import run_script


def test_compare_runs_all_four_methods(tiny_model_dir, tmp_path):
    out = tmp_path / "compare"
    settings = ["max_steps=2", "prompts_per_step=2", "num_generations=2", "max_completion_length=8",
                "num_eval_problems=4", "num_train_problems=20", "device=cpu", "eval_every=1"]
    result = run_script("benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "--set",
                        f"model={tiny_model_dir}", *settings, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table, matched = (out / "results.md").read_text().split("Length at matched accuracy")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "grpo", "seed_grpo", "gfpo_shortest", "gfpo_token_efficiency"]
    assert "n/a" not in rows[1].split("|")[6]  # SEED-GRPO reports its mean semantic entropy
    assert "(1/1)" in matched.splitlines()[4]  # GRPO reaches its own first eval's accuracy, at step 0
    summary = json.loads((out / "summary.json").read_text())
    gfpo = summary["per_seed"]["gfpo_shortest"]["0"]
    assert gfpo["tokens_trained"] <= gfpo["tokens_sampled"]
    # the same prompts per step for every method; GFPO samples G' = 2G and keeps k = G
    flags = summary["method_flags"]
    assert flags["gfpo_shortest"][flags["gfpo_shortest"].index("--prompts_per_step") + 1] == "2"
    assert flags["gfpo_shortest"][flags["gfpo_shortest"].index("--num_generations") + 1] == "4"
    assert flags["gfpo_shortest"][flags["gfpo_shortest"].index("--num_remains_in_group") + 1] == "2"
    assert flags["grpo"][flags["grpo"].index("--num_generations") + 1] == "2"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in result.stdout
    else:
        assert (out / "curves.png").stat().st_size > 10_000
    # --reuse keeps the finished runs made with the same flags, and trains a run whose flags changed
    again = run_script("benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "--overwrite", "--reuse",
                       "--set", f"model={tiny_model_dir}", *settings, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") == 4, again.stderr[-2000:]
    changed = run_script("benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "--overwrite", "--reuse",
                         "--methods", "grpo", "--set", f"model={tiny_model_dir}", *settings, "max_steps=1",
                         timeout=600)
    assert changed.returncode == 0 and "reusing" not in changed.stdout, changed.stderr[-2000:]
    # seed by seed: all methods of seed 0 (reused), then all of seed 1 (trained), so an interrupted comparison
    # leaves whole seeds to pair
    more = run_script("benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "1", "--overwrite", "--reuse",
                      "--methods", "seed_grpo", "gfpo_shortest", "--set", f"model={tiny_model_dir}", *settings,
                      timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    order = [line.split(":")[0] for line in more.stdout.splitlines() if line.startswith("[compare]")]
    assert order == ["[compare] seed_grpo seed 0", "[compare] gfpo_shortest seed 0", "[compare] seed_grpo seed 1",
                     "[compare] seed_grpo seed 1", "[compare] gfpo_shortest seed 1", "[compare] gfpo_shortest seed 1"]


def test_curve_is_the_mean_and_std_over_seeds():
    from benchmarks.compare import curve, mean_std

    seeds = [{"records": [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 1.0}]},
             {"records": [{"step": 1, "reward": 1.0}, {"step": 2, "reward": 1.0}, {"step": 3, "reward": 5.0}]}]
    steps, means, stds = curve(seeds, "reward")
    assert steps == [1, 2]  # step 3 was logged by one seed only
    assert means == [0.5, 1.0] and abs(stds[0] - 0.7071) < 1e-4 and stds[1] == 0.0
    assert mean_std([0.5, 0.7]) == "0.6 ± 0.14"


def test_set_overrides_become_flags_booleans_included():
    from benchmarks.compare import method_flags, parse_overrides

    settings = parse_overrides(["dynamic_sampling=true", "baseline=leave_one_out", "learning_rate=3e-5",
                                "save_model=false", "max_steps=2"])
    assert settings == {"dynamic_sampling": True, "baseline": "leave_one_out", "learning_rate": 3e-5,
                        "save_model": False, "max_steps": 2}
    flags = method_flags("grpo", {**settings, "num_generations": 8})
    assert flags[:2] == ["--dynamic_sampling", "--baseline"] and "--no-save_model" in flags
    assert flags[flags.index("--learning_rate") + 1] == "3e-05"
    import grpo_mini as g

    cfg = g.parse_config(argv=flags)
    assert cfg.dynamic_sampling and cfg.baseline == "leave_one_out" and not cfg.save_model


def test_unknown_set_keys_and_earlier_results_are_one_line_before_any_run(tmp_path):
    out = tmp_path / "compare"
    result = run_script("benchmarks/compare.py", "--output_dir", out, "--set", "unknownkey=1", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --set unknownkey: not a flag of grpo_mini.py (method grpo); `python grpo_mini.py --help` lists them"]
    assert not (out / "grpo_seed0.log").exists()  # nothing ran
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("an earlier comparison")
    result = run_script("benchmarks/compare.py", "--output_dir", out, timeout=120)
    assert result.returncode == 1 and "already holds results (results.md): pass --overwrite" in result.stderr
    assert (out / "results.md").read_text() == "an earlier comparison"


def test_reuse_trains_again_a_run_whose_local_model_or_data_changed(tiny_model_dir, tmp_path):
    """--reuse keeps a finished run only when its --model directory still holds the same weights and its --data file
    the same problems (cost.json's model_sha256 and data_sha256): benchmarks/cold_start.py run again over
    runs/cold_start makes the earlier runs stale, though their flags are the same. Where the folder lies is not part
    of a run: a copy elsewhere is reused."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "compare"
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "answer": i + 2}) + "\n" for i in range(20)))
    settings = ["max_steps=1", "prompts_per_step=2", "num_generations=2", "max_completion_length=8",
                "num_eval_problems=4", f"data={data}", "device=cpu", "eval_every=1"]
    args = ("benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "--methods", "grpo", "--overwrite",
            "--reuse", "--set", f"model={model}", *settings)
    first = run_script(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    cost = json.loads((out / "grpo_seed0" / "cost.json").read_text())
    assert len(cost["model_sha256"]) == 64 and len(cost["data_sha256"]) == 64
    same = run_script(*args, timeout=600)
    assert same.returncode == 0 and same.stdout.count("reusing the finished run") == 1, same.stderr[-2000:]
    moved = tmp_path / "moved"  # a results folder copied elsewhere: the same run, reused where it now lies
    shutil.copytree(out, moved)
    there = run_script(*[moved if arg == out else arg for arg in args], timeout=600)
    assert there.returncode == 0 and there.stdout.count("reusing the finished run") == 1, there.stderr[-2000:]
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01  # another fine-tune's weights, at the same path
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = run_script(*args, timeout=600)
    assert changed.returncode == 0 and "reusing" not in changed.stdout, changed.stderr[-2000:]
    again = run_script(*args, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing the finished run") == 1, again.stderr[-2000:]
    with data.open("a") as more:  # more problems at the same path: another split, another run
        more.write(json.dumps({"prompt": "What is 40 + 2?", "answer": 42}) + "\n")
    changed = run_script(*args, timeout=600)
    assert changed.returncode == 0 and "reusing" not in changed.stdout, changed.stderr[-2000:]
