"""The run directory is the run's own: --overwrite never removes what is not ours, one writer at a time, resume knows
the script that wrote a run, damaged files and a full disk are one line, and saving survives a dead stdout."""

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import engine
import grpo_mini as g
import harness
import tasks
from conftest import ROOT, TINY_RUN_FLAGS, run_script

TINY = dict(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=8, num_train_problems=20,
            num_eval_problems=4, eval_every=0, device="cpu", dtype="fp32", save_every=1)


def char_code_reward(completions, answers):
    return [sum(map(ord, text)) % 7 / 7 for text in completions]  # a spread in every group: every step trains


def finished_run(tiny_model_dir, out, **overrides):
    g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), **{**TINY, **overrides}),
            reward_fn=char_code_reward)
    return out


# ---------------------------------------------------------------------------------------------- --overwrite
def test_a_directory_that_holds_no_run_of_ours_is_never_cleared(tmp_path):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_text("a user's model")
    (out / "wandb").mkdir()
    for overwrite in (False, True):
        with pytest.raises(g.ConfigError, match=r"holds files that no grpo-mini run wrote \(model, wandb\)"):
            g.check_output_dir(g.Config(output_dir=str(out), overwrite=overwrite))
    assert (out / "model" / "weights.bin").read_text() == "a user's model" and (out / "wandb").is_dir()
    assert not (out / harness.LOCK).exists()  # a refused directory gets nothing of ours


def test_the_input_models_directory_is_not_an_output_dir(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model_copy"
    shutil.copytree(tiny_model_dir, model_dir)
    before = (model_dir / "config.json").read_text()
    result = run_script("grpo_mini.py", "--model", model_dir, "--output_dir", model_dir, "--overwrite",
                        *TINY_RUN_FLAGS)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "holds files that no grpo-mini run wrote (config.json)" in result.stderr
    assert (model_dir / "config.json").read_text() == before
    engine.load_model_and_tokenizer(str(model_dir))  # still loads


def test_overwrite_never_removes_the_model_it_trains_from(tiny_model_dir, tmp_path):
    out = finished_run(tiny_model_dir, tmp_path / "run", max_steps=1)
    cfg = g.Config(model=str(out / "model"), output_dir=str(out), overwrite=True, **TINY)
    with pytest.raises(g.ConfigError, match=r"--overwrite would remove .*model, which holds --model"):
        g.check_output_dir(cfg)
    engine.load_model_and_tokenizer(str(out / "model"))


def test_overwrite_refuses_the_root_home_and_working_directories(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for where in ("/", str(home), ".", str(tmp_path)):
        with pytest.raises(g.ConfigError, match="refusing to clear"):
            g.check_output_dir(g.Config(output_dir=where, overwrite=True))
    assert os.listdir(home) == []


def test_the_write_probe_leaves_a_users_file_of_any_name_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".write_test").write_text("mine")
    g.check_output_dir(g.Config(output_dir=str(out)))
    assert (out / ".write_test").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted([".write_test", harness.LOCK])


# ---------------------------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_while_the_first_lives_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / harness.LOCK).write_text(str(other.pid))
        for overwrite in (False, True):
            with pytest.raises(g.ConfigError, match=rf"another run \(pid {other.pid}\) is writing there"):
                g.check_output_dir(g.Config(output_dir=str(out), overwrite=overwrite))
    finally:
        other.kill()
        other.wait()
    g.check_output_dir(g.Config(output_dir=str(out)))  # its process is gone: the lock is stale, and taken over
    assert (out / harness.LOCK).read_text().split()[0] == str(os.getpid())


def test_a_run_releases_its_lock_when_it_ends(tiny_model_dir, tmp_path):
    out = finished_run(tiny_model_dir, tmp_path / "run", max_steps=1)
    assert not (out / harness.LOCK).exists()
    with pytest.raises(g.ConfigError, match="--model"):  # a run that fails while it sets up releases it too
        g.train(g.Config(model=str(tmp_path / "no_model"), output_dir=str(tmp_path / "failed"), **TINY))
    assert not (tmp_path / "failed" / harness.LOCK).exists()


# ---------------------------------------------------------------------------------------------- resume
def fake_checkpoint(out, algorithm, config):
    (out / "checkpoint").mkdir(parents=True)
    state = {"step": 1, "config": config, "eval_before": {"accuracy": 0.0}}
    if algorithm:
        state["algorithm"] = algorithm
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("algorithm, extra", [("seed_grpo.py:SeedConfig", {"alpha": 1.0}),
                                              ("gfpo.py:GFPOConfig", {}),
                                              (None, {"num_remains_in_group": 8})])  # an older run, no algorithm
def test_resume_refuses_another_scripts_run(tmp_path, algorithm, extra):
    out = tmp_path / "run"
    cfg = g.Config(output_dir=str(out), resume=True)
    fake_checkpoint(out, algorithm, {**{k: v for k, v in vars(cfg).items()}, **extra})
    with pytest.raises(g.ConfigError, match=r"was written by \S+ \(\w+\); resume it with that script"):
        g.check_output_dir(cfg)


def test_resuming_a_finished_run_says_so_and_writes_nothing(tiny_model_dir, tmp_path):
    out = finished_run(tiny_model_dir, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    flags = ["--model", tiny_model_dir, "--output_dir", out, "--resume", "--dtype", "fp32", "--save_every", "1",
             "--num_generations", "4", "--eval_every", "0", *TINY_RUN_FLAGS]
    result = run_script("grpo_mini.py", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [
        f"the run in {out} is finished (checkpoint of step 2, --max_steps 2): nothing to resume; a larger "
        f"--max_steps trains it further"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


DAMAGE = {
    "state.json missing": lambda c: (c / "state.json").unlink(),
    "state.json truncated": lambda c: (c / "state.json").write_text((c / "state.json").read_text()[:20]),
    "trainer_state.pt missing": lambda c: (c / "trainer_state.pt").unlink(),
    "trainer_state.pt truncated": lambda c: (c / "trainer_state.pt").write_bytes(
        (c / "trainer_state.pt").read_bytes()[:500]),
    "model.safetensors truncated": lambda c: (c / "model" / "model.safetensors").write_bytes(
        (c / "model" / "model.safetensors").read_bytes()[:1000]),
    "model/ missing": lambda c: shutil.rmtree(c / "model"),
    "metrics.jsonl garbage": lambda c: (c.parent / "metrics.jsonl").write_text("{not json\n"),
    "metrics.jsonl without step": lambda c: (c.parent / "metrics.jsonl").write_text('{"reward": 1}\n'),
}


def test_every_damaged_checkpoint_file_is_one_line_naming_it(tiny_model_dir, tmp_path):
    pristine = finished_run(tiny_model_dir, tmp_path / "pristine", max_steps=1)
    for case, damage in DAMAGE.items():
        out = tmp_path / case.replace(" ", "_").replace("/", "")
        shutil.copytree(pristine, out)
        damage(out / "checkpoint")
        file = {"model.safetensors": "model"}.get(case.split()[0], case.split()[0].rstrip("/"))
        with pytest.raises(g.ConfigError, match=rf"--resume: \S*{file}\S* (is missing or damaged|is not a metrics)"):
            g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), resume=True, **TINY),
                    reward_fn=char_code_reward)


def test_a_full_disk_is_one_line_and_leaves_no_debris(tiny_model_dir, tmp_path, monkeypatch):
    def disk_full(model, tokenizer, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "part").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine, "save_model", disk_full)
    out = tmp_path / "run"
    with pytest.raises(g.ConfigError, match=r"could not write .*checkpoint \(No space left on device\); the previous"):
        finished_run(tiny_model_dir, out, max_steps=1)
    assert not (out / "checkpoint.tmp").exists() and not (out / "model.tmp").exists()


# ---------------------------------------------------------------------------------------------- data
def test_duplicate_prompts_stay_out_of_the_held_out_split():
    rows = [tasks.Problem(q, float(i)) for i, q in enumerate(["q1", "q2", "q2", "q3", "q4"])]
    for seed in range(30):
        train, held_out = tasks.split_problems(rows, num_eval=1, seed=seed)
        assert len(held_out) == 1 and held_out[0].prompt not in {p.prompt for p in train}
        assert len(train) + (2 if held_out[0].prompt == "q2" else 1) == 5  # every other row is trained on
    with pytest.raises(g.ConfigError, match="1 distinct prompt"):
        tasks.split_problems([tasks.Problem("q", 1.0)] * 5, num_eval=1, seed=0)


def test_a_prompt_longer_than_the_models_context_is_one_line_naming_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{i} + 1?", "answer": i + 1} for i in range(8)]
    rows[5]["prompt"] = "1 + " * 3000 + "1?"  # the tiny model's context is 512 tokens
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(g.ConfigError, match=rf"{data}:6: the prompt has \d+ tokens, more than the 504 "):
        g.train(g.Config(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), **TINY))


# ---------------------------------------------------------------------------------------------- a dead stdout
def test_sigterm_with_a_dead_stdout_still_saves_the_checkpoint_and_the_model(tiny_model_dir, tmp_path):
    """`python grpo_mini.py | tee log`, and SIGTERM to the process group: tee dies first, so every print on the way
    out meets a broken pipe. The checkpoint and model/ are written all the same."""
    out = tmp_path / "run"
    flags = [*TINY_RUN_FLAGS, "--max_steps", "200", "--save_every", "100"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "grpo_mini.py"), "--model", str(tiny_model_dir),
                             "--output_dir", str(out), *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:
        if line.startswith("step    3"):
            break
    proc.stdout.close()  # the reader is gone: the next write to stdout is EPIPE
    proc.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 3, stderr[-2000:]
    engine.load_model_and_tokenizer(str(out / "model"))
    assert "Traceback" not in stderr.split("Exception ignored")[0], stderr[-2000:]


def test_under_torchrun_only_rank_0_prints_the_error(tmp_path):
    for rank, lines in (("0", 1), ("1", 0)):
        result = subprocess.run([sys.executable, "grpo_mini.py", "--num_generations", "1", "--output_dir",
                                 str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "RANK": rank, "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == lines, result.stderr


# ---------------------------------------------------------------------------------------------- the variants' errors
def test_semantic_entropy_names_lm_for_an_unloadable_lm(tmp_path):
    result = run_script("semantic_entropy.py", "--lm", tmp_path / "nonexist", "--question", "q?", "a", "b",
                        "--judge", "math", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"error: --lm {tmp_path / 'nonexist'}: could not load it"), result.stderr[-2000:]


def test_seed_grpo_with_a_model_that_is_not_nli_is_one_line(tiny_model_dir, tmp_path):
    result = run_script("seed_grpo.py", "--judge", "nli", "--nli-model", tiny_model_dir, "--model", tiny_model_dir,
                        "--output_dir", tmp_path / "run", *TINY_RUN_FLAGS, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # transformers reports too
    assert len(ours) == 1 and ours[0].startswith(f"error: --nli-model {tiny_model_dir}: cannot map its labels")


def test_a_gfpo_metric_that_goes_wrong_mid_run_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import gfpo

    monkeypatch.chdir(tmp_path)  # user metrics are imported from the working directory
    (tmp_path / "two_scores.py").write_text("def metric(rewards, lengths, completions):\n    return lengths[:2]\n")
    importlib.invalidate_caches()  # the module was written after this process last looked at its directory
    settings = {**TINY, "num_generations": 4, "num_remains_in_group": 2, "filter_metric": "two_scores:metric"}
    cfg = gfpo.GFPOConfig(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), **settings)
    with pytest.raises(g.ConfigError, match=r"--filter_metric two_scores:metric: returned scores of shape \(2,\) "
                                            r"for a group of 4"):
        g.train(cfg, advantage_fn=gfpo.gfpo_advantage_fn)


# ---------------------------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_same_seed_on_the_same_machine_gives_the_same_numbers(tiny_model_dir, tmp_path, dtype):
    """Two runs with one seed log the same metrics and end with the same weights (other machines may differ)."""
    def run(name):
        out = tmp_path / name
        g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out),
                         **{**TINY, "dtype": dtype, "max_steps": 3, "eval_every": 1, "save_every": 0}),
                reward_fn=char_code_reward)
        timing = ("step_s", "tokens_per_s")
        records = [{k: v for k, v in json.loads(line).items() if k not in timing}
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
        return records, (out / "model" / "model.safetensors").read_bytes()

    first, second = run("first"), run("second")
    assert len(first[0]) == 7 and first[0] == second[0]  # 3 steps, 4 evaluations
    assert first[1] == second[1]  # the saved weights, byte for byte


def test_a_lock_being_written_is_held_and_a_garbage_one_is_stale(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / harness.LOCK).write_text("")  # another run's lock, created a moment ago, its pid not yet written
    with pytest.raises(g.ConfigError, match=r"another run \(pid \?\) is writing there"):
        g.check_output_dir(g.Config(output_dir=str(out)))
    (out / harness.LOCK).write_text("not a pid")
    g.check_output_dir(g.Config(output_dir=str(out)))
    assert (out / harness.LOCK).read_text().split()[0] == str(os.getpid())


def test_a_run_from_before_the_marker_is_overwritten_only_once_marked(tiny_model_dir, tmp_path):
    out = finished_run(tiny_model_dir, tmp_path / "old_run", max_steps=1, save_every=0)
    (out / harness.MARKER).unlink()  # as a run of an earlier version left its directory: config.json, no marker
    with pytest.raises(g.ConfigError, match=r"no grpo-mini run wrote .* `touch .*\.grpo_mini_run` marks it"):
        g.check_output_dir(g.Config(output_dir=str(out), overwrite=True, model=str(tiny_model_dir)))
    (out / harness.MARKER).touch()
    g.check_output_dir(g.Config(output_dir=str(out), overwrite=True, model=str(tiny_model_dir)))
