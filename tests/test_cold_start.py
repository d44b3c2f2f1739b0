"""The GFPO cold start (benchmarks/cold_start.py) and compare.py's length-at-matched-accuracy and style columns."""

import json
import random

import pytest

from conftest import run_script


def test_each_style_is_a_correct_solution_that_the_regex_recognises():
    import grpo_mini as g
    from benchmarks.cold_start import STYLES, classify_style, make_sum_of_four, solution

    rng = random.Random(0)
    for _ in range(50):
        problem = make_sum_of_four(rng)
        for style in STYLES:
            text = solution(problem, style)
            assert classify_style(text) == style
            assert g.correctness_reward([text], [problem.answer]) == [1.0]
    problem = g.Problem("Ava has 12 coins, Ben has 7 coins, Chloe has 9 coins and Dan has 17 coins. How many coins "
                        "do they have together?", 45.0)
    assert solution(problem, "worked") == "12 + 7 = 19. 19 + 9 = 28. 28 + 17 = 45. The answer is 45."
    assert solution(problem, "filler") == (
        "We need the total of Ava's 12, Ben's 7, Chloe's 9 and Dan's 17 coins. 12 + 7 = 19. 19 + 9 = 28. 28 + 17 = 45. "
        "Let me double-check: 12 + 7 = 19, 19 + 9 = 28, 28 + 17 = 45. The answer is 45.")


@pytest.mark.parametrize("text, style", [
    ("The answer is 45.", "direct"),
    ("12 + 7 = 19. 19 + 26 = 45. The answer is 45.", "worked"),
    ("We need ... 12 + 7 = 19 ... Let me double-check: 12 + 7 = 19 ... The answer is 45.", "filler"),
    ("I think they have about 40 coins.", "other"),
    ("The answer is 45. Also 3 + 4 = 7.", "worked"),
])
def test_classify_style_docstring_examples(text, style):
    from benchmarks.cold_start import classify_style

    assert classify_style(text) == style


def test_style_report_shares_and_accuracies():
    from benchmarks.cold_start import style_report

    report = style_report(["The answer is 4.", "The answer is 5.", "1 + 3 = 4. The answer is 4.", "hm"],
                          [1.0, -1.0, 1.0, -1.0])
    assert report["direct"] == {"share": 0.5, "accuracy": 0.5}
    assert report["worked"] == {"share": 0.25, "accuracy": 1.0}
    assert report["filler"] == {"share": 0.0, "accuracy": None} and report["other"]["share"] == 0.25


def test_sft_and_rl_problems_never_share_a_prompt():
    from benchmarks.cold_start import split_problems

    sft, rl, held_out = split_problems(0, 300, 100, 50)
    assert (len(sft), len(rl), len(held_out)) == (300, 100, 50)
    assert len({p.prompt for p in sft} | {p.prompt for p in rl} | {p.prompt for p in held_out}) == 450
    assert split_problems(0, 300, 100)[:2] == (sft, rl)  # more held-out problems leave the others as they were


def test_too_many_problems_names_all_three_flags(monkeypatch):
    """All three counts draw from one pool, so running out names the sum of the three flags, not one of them."""
    import grpo_mini as g
    from benchmarks import cold_start

    monkeypatch.setattr(cold_start, "make_sum_of_four", lambda rng: g.Problem(f"{rng.randint(1, 3)} + 1?", 0.0))
    with pytest.raises(g.ConfigError, match=r"^--num_sft_problems \+ --num_rl_problems \+ --num_eval_problems = 6: "
                                            r"the task gave only 3 distinct prompts; ask for fewer$"):
        cold_start.split_problems(0, 2, 2, 2)


def test_matched_accuracy_docstring_example():
    from benchmarks.compare import matched_accuracy

    records = [{"step": 0, "eval_accuracy": 0.3, "eval_completion_len": 40}]
    for step in range(1, 21):
        records.append({"step": step, "tokens_sampled": 1000})
        if step % 10 == 0:
            records.append({"step": step, "eval_accuracy": {10: 0.55, 20: 0.6}[step],
                            "eval_completion_len": step * 3 + 30})
    assert matched_accuracy(records, 0.5) == {"step": 10, "length": 60, "tokens": 10000}
    assert matched_accuracy(records, 0.3) == {"step": 0, "length": 40, "tokens": 0}
    assert matched_accuracy(records, 0.9) == {"step": None, "length": None, "tokens": None}


def test_grpo_control_samples_what_gfpo_samples_and_trains_on_all():
    from benchmarks.compare import method_flags

    settings = {"num_generations": 8, "prompts_per_step": 4}
    control, gfpo = method_flags("grpo_2g", settings), method_flags("gfpo_adaptive", settings)
    assert control[control.index("--num_generations") + 1] == gfpo[gfpo.index("--num_generations") + 1] == "16"
    assert "--num_remains_in_group" not in control and "--adaptive" in gfpo
    assert gfpo[gfpo.index("--num_remains_in_group") + 1] == "8"


def test_cold_start_end_to_end_then_compare_reads_its_styles(tiny_model_dir, tmp_path):
    """The fine-tune on the tiny model (2 steps), then a 1-step compare from its checkpoint: the style table, the
    right / wrong lengths and the matched-accuracy table are written."""
    out = tmp_path / "cold"
    result = run_script("benchmarks/cold_start.py", "--model", tiny_model_dir, "--output_dir", out, "--steps", "2",
                        "--batch_size", "2", "--num_sft_problems", "20", "--num_rl_problems", "30",
                        "--num_eval_problems", "6", "--probe_prompts", "1", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and abs(sum(log[0][f"share_{s}"] for s in ("direct", "worked",
                                                                                            "filler")) - 1) < 1e-9
    styles = json.loads((out / "styles.json").read_text())
    assert set(styles["after"]["styles"]) == {"direct", "worked", "filler", "other"}
    assert len((out / "problems.jsonl").read_text().splitlines()) == 30
    assert len((out / "eval_problems.jsonl").read_text().splitlines()) == 6
    again = run_script("benchmarks/cold_start.py", "--model", tiny_model_dir, "--output_dir", out)
    assert again.returncode == 2 and "already holds a cold start" in again.stderr  # nothing replaced silently
    missing = run_script("benchmarks/cold_start.py", "--model", tmp_path / "nothing", "--output_dir", tmp_path / "x")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        f"error: --model {tmp_path / 'nothing'}: could not load it")

    compare = tmp_path / "compare"
    result = run_script(
        "benchmarks/compare.py", "--preset", "paired_cold_start_256", "--methods", "grpo", "gfpo_adaptive",
        "--output_dir", compare, "--set", f"model={out / 'model'}", f"data={out / 'problems.jsonl'}",
        f"eval_data={out / 'eval_problems.jsonl'}", "max_steps=1",
        "prompts_per_step=2", "num_generations=2", "max_completion_length=8", "num_eval_problems=4", "device=cpu",
        "eval_every=1", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (compare / "results.md").read_text()
    assert "Answer styles of the held-out completions" in table or "filler" not in table
    assert "Length at matched accuracy" in table
    summary = json.loads((compare / "summary.json").read_text())
    run = summary["per_seed"]["gfpo_adaptive"]["0"]
    assert set(run["styles"]["0"]) == {"direct", "worked", "filler"} and len(run["evals"]) == 2
    records = [json.loads(line) for line in (compare / "grpo_seed0" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in records if "eval_accuracy" in r)
    assert len(first_eval["eval_completions"]) == 4 and "eval_right_length" in first_eval


def test_cold_start_preset_without_its_checkpoint_is_one_line(tmp_path):
    result = run_script("benchmarks/compare.py", "--preset", "cold_start", "--output_dir", tmp_path / "c", "--set",
                        f"model={tmp_path / 'none'}", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --preset cold_start needs {tmp_path / 'none'}, which is not there yet: make it first with "
        f"`python benchmarks/cold_start.py` (--overwrite remakes an older cold start)"]
