"""Nothing is lost: checkpoints, exact resume, saving on every kind of exit, and one-line errors (issue 14).

Every run here trains the tiny random model from tests/conftest.py on the CPU, in fp32, for a few steps."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import gfpo
import engine
import grpo_mini as g
import tasks
from conftest import ROOT, TINY_RUN_FLAGS, run_script

TINY = dict(max_steps=4, prompts_per_step=2, num_generations=4, max_completion_length=8, num_train_problems=20,
            num_eval_problems=4, eval_every=0, device="cpu", dtype="fp32", learning_rate=1e-3, warmup_steps=1)


def char_code_reward(completions, answers):
    """Dense: random samples differ in their characters, so every step has a gradient and updates the weights."""
    return [sum(map(ord, text)) / 1000 for text in completions]


def stop_in_step(n, exception=KeyboardInterrupt):
    """A reward function that behaves like char_code_reward until its n-th call (step n), then raises."""
    calls = []

    def reward(completions, answers):
        calls.append(1)
        if len(calls) == n:
            raise exception
        return char_code_reward(completions, answers)
    return reward


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_step(run_dir):
    return json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]


# Everything a step computes; step_s and tokens_per_s are wall-clock times and differ between any two runs.
COMPARED = ("reward", "zero_std_frac", "completion_len", "truncated_frac", "clip_frac", "loss", "grad_norm",
            "tokens_sampled", "tokens_trained", "lr", "k")


def assert_same_steps(a, b):
    steps_a, steps_b = [r for r in a if "reward" in r], [r for r in b if "reward" in r]
    assert [r["step"] for r in steps_a] == [r["step"] for r in steps_b]
    for ra, rb in zip(steps_a, steps_b):
        for key in COMPARED:
            expected = rb.get(key)
            assert ra.get(key) == (expected if expected is None else pytest.approx(expected, rel=1e-6, abs=1e-9)), (
                ra["step"], key)


# ---------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("variant", ["grpo", "gfpo_adaptive"])
def test_stop_after_step_2_and_resume_gives_the_uninterrupted_run(tiny_model_dir, tmp_path, variant):
    """A 4-step run, and the same run stopped by Ctrl-C in step 3 then resumed: the same metrics, step for step,
    and the same final weights. GFPO's adaptive k depends on every earlier step's difficulties: its record must
    travel in the checkpoint, or step 3's k differs."""
    if variant == "grpo":
        config_cls, kwargs, extra = g.Config, {}, {}
    else:
        config_cls, kwargs = gfpo.GFPOConfig, {"advantage_fn": gfpo.gfpo_advantage_fn}
        extra = dict(adaptive=True, adaptive_warmup_steps=1, k_very_hard=3, k_hard=3, k_medium=2, k_easy=2,
                     num_remains_in_group=2)

    def config(out, **more):
        return config_cls(model=str(tiny_model_dir), output_dir=str(tmp_path / out), **{**TINY, **extra, **more})

    full = g.train(config("full", save_every=2), reward_fn=char_code_reward, **kwargs)
    assert not full["interrupted"] and checkpoint_step(tmp_path / "full") == 4

    cut = g.train(config("cut"), reward_fn=stop_in_step(3), **kwargs)
    assert cut["interrupted"] and checkpoint_step(tmp_path / "cut") == 2
    resumed = g.train(config("cut", resume=True), reward_fn=char_code_reward, **kwargs)
    assert not resumed["interrupted"] and checkpoint_step(tmp_path / "cut") == 4

    assert_same_steps(records(tmp_path / "full"), records(tmp_path / "cut"))
    assert resumed["eval_before"] == full["eval_before"]
    assert resumed["eval_after"]["accuracy"] == full["eval_after"]["accuracy"]
    a, _ = g.load_model_and_tokenizer(str(tmp_path / "full" / "model"))
    b, _ = g.load_model_and_tokenizer(str(tmp_path / "cut" / "model"))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_model_dir, tmp_path):
    """A run killed (kill -9) after logging step 3 but before its next checkpoint: resuming from step 2 removes
    the stale step-3 line first, so that metrics.jsonl holds each step once."""
    out = tmp_path / "run"
    g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), **{**TINY, "max_steps": 2}),
            reward_fn=char_code_reward)
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 3, "reward": 123.0}) + "\n")
    g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), resume=True, **TINY), reward_fn=char_code_reward)
    steps = [r["step"] for r in records(out) if "reward" in r]
    assert steps == [1, 2, 3, 4] and all(r.get("reward") != 123.0 for r in records(out))


def test_resume_refuses_other_flags_and_a_missing_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(g.ConfigError, match="--resume: no checkpoint in"):
        g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), resume=True, **TINY))
    g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), **{**TINY, "max_steps": 1}),
            reward_fn=char_code_reward)
    with pytest.raises(g.ConfigError, match=r"these differ: --learning_rate 0.001 -> 0.01"):
        g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), resume=True,
                         **{**TINY, "learning_rate": 1e-2}))
    with pytest.raises(g.ConfigError, match="--resume and --overwrite contradict"):
        g.Config(resume=True, overwrite=True).validate()


# ---------------------------------------------------------------------------------------------- every exit saves
def test_an_error_mid_run_saves_then_fails_with_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--output_dir", str(out), *TINY_RUN_FLAGS, "--num_generations", "4",
            "--max_steps", "5", "--dtype", "fp32"]
    reward_that_breaks = stop_in_step(3, ZeroDivisionError("division by zero"))
    reward_that_breaks.__name__ = "reward_that_breaks"
    assert g.main(argv=argv, reward_fn=reward_that_breaks) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (transformers' progress bars go to stderr too)
    assert "Traceback" not in "".join(err)
    assert re.fullmatch(r"error: reward function reward_that_breaks raised ZeroDivisionError: "
                        r"division by zero \(test_checkpoints.py:\d+\)", err[-1]), err
    assert checkpoint_step(out) == 2 and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("returned, message", [
    ([], "returned 0 values for 8 completions"),
    ([1.0] * 4, "returned 4 values for 8 completions"),  # N - G: the last group would be ignored silently
    (None, "must return a list of numbers"),
    (["good"] * 8, "must return a list of numbers"),
])
def test_reward_function_output_is_checked(returned, message):
    with pytest.raises(g.RewardError, match=message):
        g.checked_rewards(lambda c, a: returned, ["x"] * 8, [1.0] * 8)
    assert g.checked_rewards(lambda c, a: [True, 2, 0.5, float("nan")], ["x"] * 4, [1.0] * 4)[:3] == [1.0, 2.0, 0.5]


def test_a_second_ctrl_c_waits_for_the_save(tmp_path):
    exits, finished = g.SafeExit(), []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a shell's background job
    with exits:
        with pytest.raises(KeyboardInterrupt):
            with exits.held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, impatient
                time.sleep(0.05)
                finished.append("save done")  # reached: the block ran to its end before the interrupt
    assert finished == ["save done"] and exits.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back


def test_ctrl_c_during_the_exit_save_still_leaves_a_whole_model(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C in step 3, then another Ctrl-C while the model is being written: both directories come out whole."""
    real_save = g.save_model

    def save_and_get_interrupted(model, tokenizer, directory):
        os.kill(os.getpid(), signal.SIGINT)
        real_save(model, tokenizer, directory)

    monkeypatch.setattr(engine, "save_model", save_and_get_interrupted)
    out = tmp_path / "run"
    summary = g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), **TINY), reward_fn=stop_in_step(3))
    assert summary["interrupted"] and checkpoint_step(out) == 2
    monkeypatch.setattr(engine, "save_model", real_save)
    for directory in (out / "model", out / "checkpoint" / "model"):
        g.load_model_and_tokenizer(str(directory))
    assert not (out / "model.tmp").exists() and not (out / "checkpoint.tmp").exists()


def test_replace_dir_leaves_a_whole_copy_at_any_instant(tmp_path):
    final = tmp_path / "checkpoint"
    g.replace_dir(final, lambda d: (d.mkdir(), (d / "weights").write_text("old")))

    def killed_half_way(directory):
        directory.mkdir()
        (directory / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        g.replace_dir(final, killed_half_way)
    assert (g.find_saved(final) / "weights").read_text() == "old"
    g.replace_dir(final, lambda d: (d.mkdir(), (d / "weights").write_text("new")))
    assert (final / "weights").read_text() == "new" and not (tmp_path / "checkpoint.old").exists()
    final.rename(tmp_path / "checkpoint.old")  # a kill between the two renames leaves only NAME.old
    assert (g.find_saved(final) / "weights").read_text() == "new"


RUN_WITH_A_DENSE_REWARD = (
    "import sys, grpo_mini as g\n"
    "reward = lambda completions, answers: [sum(map(ord, t)) / 1000 for t in completions]\n"
    "sys.exit(g.main(argv=sys.argv[1:], reward_fn=reward))\n")


def test_sigterm_saves_and_exits_143(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", RUN_WITH_A_DENSE_REWARD, "--model", str(tiny_model_dir),
                             "--output_dir", str(out), *TINY_RUN_FLAGS, "--max_steps", "100000", "--dtype", "fp32",
                             "--num_generations", "4", "--save_every", "1000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step    2"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM during step" in stdout
    assert checkpoint_step(out) >= 2
    g.load_model_and_tokenizer(str(out / "model"))


# ---------------------------------------------------------------------------------------------- no silent overwrite
def test_a_new_run_refuses_an_existing_run_unless_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = dict(model=str(tiny_model_dir), output_dir=str(out), **{**TINY, "max_steps": 1})
    g.train(g.Config(**first), reward_fn=char_code_reward)
    assert (out / "checkpoint").is_dir()
    result = run_script("grpo_mini.py", "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --output_dir {out} already holds a run (config.json, metrics.jsonl, model, checkpoint): pass "
        f"--resume to continue it, or --overwrite to replace it"]
    (out / "notes.txt").write_text("mine")
    g.train(g.Config(**{**first, "max_steps": 0, "overwrite": True, "save_model": False}))
    assert not (out / "checkpoint").exists() and not (out / "model").exists()  # the old run is gone ...
    assert (out / "notes.txt").read_text() == "mine"  # ... and only the old run


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_output_dir_that_cannot_be_written_is_one_line(tmp_path, where):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(g.ConfigError, match=r"--output_dir .*: cannot write there"):
        g.check_output_dir(g.Config(output_dir=str(tmp_path / where)))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_dir_is_one_line(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    with pytest.raises(g.ConfigError, match="cannot write there"):
        g.check_output_dir(g.Config(output_dir=str(tmp_path / "locked" / "run")))


# ---------------------------------------------------------------------------------------------- bad input, one line
def test_data_file_bytes_bom_and_single_read(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "1+1?", "answer": 2}\n{"prompt": "\xff", "answer": 3}\n')
    with pytest.raises(g.ConfigError, match=r"data.jsonl:2: not UTF-8 \(byte 0xff at column 13\)"):
        g.load_jsonl_problems(str(data))
    data.write_bytes("\ufeff".encode() + b"".join(
        json.dumps({"prompt": f"{i}+1?", "answer": i + 1}).encode() + b"\n" for i in range(6)))
    assert len(g.load_jsonl_problems(str(data))) == 6  # a BOM (as Windows editors write it) is fine
    reads = []
    real = tasks.load_jsonl_problems
    monkeypatch.setattr(tasks, "load_jsonl_problems", lambda path, *rest: reads.append(path) or real(path, *rest))
    g.train(g.Config(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"),
                     **{**TINY, "max_steps": 0, "save_model": False}))
    assert reads == [str(data)]  # read once


def test_broken_model_files_are_one_line(tiny_model_dir, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(g.ConfigError, match=f"--model {broken}: could not load it"):
        g.load_model_and_tokenizer(str(broken))
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    result = run_script("grpo_mini.py", "--model", fake, "--output_dir", tmp_path / "run")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: --model {fake}: could not load it")


def test_filter_metric_that_is_not_a_metric_fails_before_loading(tmp_path, monkeypatch):
    with pytest.raises(g.ConfigError, match=r"--filter_metric os:getcwd: calling it .* raised TypeError"):
        gfpo.GFPOConfig(filter_metric="os:getcwd").validate()
    monkeypatch.chdir(tmp_path)  # user metrics are imported from the working directory
    (tmp_path / "my_metrics.py").write_text("def one_number(rewards, lengths, completions):\n    return 1.0\n")
    with pytest.raises(g.ConfigError, match="must return a tensor with one finite score per completion"):
        gfpo.GFPOConfig(filter_metric="my_metrics:one_number").validate()


@pytest.mark.parametrize("device", ["cuda", "tpu"])
def test_semantic_entropy_device_is_checked_first(tiny_model_dir, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_script("semantic_entropy.py", "--judge", "math", "--question", "6+6?", "--lm", tiny_model_dir,
                        "--device", device, "12", "twelve")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: --device")


def test_no_scheduler_warning_when_the_first_step_has_no_gradient(tiny_model, tiny_tokenizer, tmp_path):
    cfg = g.Config(output_dir=str(tmp_path / "run"), **{**TINY, "max_steps": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g.train(cfg, reward_fn=lambda c, a: [0.0] * len(c), model=tiny_model, tokenizer=tiny_tokenizer,
                problems=g.make_arithmetic_split(0, 20, 4))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    lrs = [r["lr"] for r in records(tmp_path / "run") if "lr" in r]
    assert lrs == [pytest.approx(1e-3 / 2)] * 2  # warm-up counts optimiser steps: none were taken


def test_fewer_training_rows_than_prompts_per_step_still_trains(tiny_model, tiny_tokenizer, tmp_path):
    """Once an IndexError: a step draws from a reshuffled order, so it can take a row twice when there are few."""
    summary = g.train(g.Config(output_dir=str(tmp_path / "run"), **{**TINY, "max_steps": 2, "prompts_per_step": 3,
                                                                     "num_train_problems": 1}),
                      reward_fn=char_code_reward, model=tiny_model, tokenizer=tiny_tokenizer)
    assert summary["steps"] == 2 and not summary["interrupted"]


def test_metrics_are_strict_json_even_with_nan(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="non-finite"):
        g.train(g.Config(output_dir=str(tmp_path / "run"), **{**TINY, "max_steps": 1}),
                reward_fn=lambda c, a: [float("nan")] * len(c), model=tiny_model, tokenizer=tiny_tokenizer)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
