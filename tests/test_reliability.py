"""Nothing the user asked to keep is lost when the pipe, the disk or the signals misbehave; --overwrite and the
benchmarks never replace what is not theirs; --data never misreads a number; and the modules import downwards only."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
import flags
import gfpo
import grpo_mini as g
import harness
import tasks
from conftest import ROOT, TINY_RUN_FLAGS, run_script

TINY = dict(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=8, num_train_problems=20,
            num_eval_problems=4, eval_every=0, device="cpu", dtype="fp32", save_every=1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# A run whose save and load paths print to stderr and stdout, as transformers' "Writing model shards" bar does on a
# real model (the tiny test model's own save prints nothing), and whose reward gives every group a spread.
NOISY_RUN = """
import sys, engine, grpo_mini as g
real_save, real_load = engine.save_model, engine.from_pretrained
def noisy_save(*args, **kwargs):
    for _ in range(50):
        print("Writing model shards: 50%", file=sys.stderr, flush=True)
        print("saving", flush=True)
    real_save(*args, **kwargs)
def noisy_load(*args, **kwargs):
    print("Loading weights: 100%", file=sys.stderr, flush=True)
    return real_load(*args, **kwargs)
engine.save_model, engine.from_pretrained = noisy_save, noisy_load
reward = lambda completions, answers: [sum(map(ord, t)) % 7 / 7 for t in completions]
sys.exit(g.main(argv=sys.argv[1:], reward_fn=reward))
"""


def checkpoint_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "state.json").read_text())["step"]


def noisy_run(tiny_model_dir, out, *extra, **popen):
    return subprocess.Popen([sys.executable, "-c", NOISY_RUN, "--model", str(tiny_model_dir), "--output_dir",
                             str(out), *TINY_RUN_FLAGS, "--dtype", "fp32", "--num_generations", "4", *extra],
                            cwd=ROOT, env=ENV, **popen)


# ---------------------------------------------------------------------------------------------- a dead pipe
def test_a_pipe_closed_after_two_lines_on_stdout_and_stderr_loses_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"  # `python grpo_mini.py ... 2>&1 | head -2`
    proc = noisy_run(tiny_model_dir, out, "--max_steps", "3", "--save_every", "1", stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
    proc.stdout.readline(), proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert checkpoint_step(out) == 3 and (out / "model" / "config.json").is_file()
    assert not (out / "checkpoint.tmp").exists() and not (out / harness.LOCK).exists()


def test_sigterm_with_both_streams_dead_saves_and_exits_143(tiny_model_dir, tmp_path):
    out = tmp_path / "run"  # `2>&1 | tee log`, tee killed first, then SIGTERM
    proc = noisy_run(tiny_model_dir, out, "--max_steps", "100000", "--save_every", "1000", stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step    2"):
            break
    proc.stdout.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    assert checkpoint_step(out) >= 2
    g.load_model_and_tokenizer(str(out / "model"))


def test_stderr_unwritable_from_the_start_still_trains_and_saves(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read stderr: every write to it is EPIPE
    proc = noisy_run(tiny_model_dir, out, "--save_every", "1", stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    assert proc.wait(timeout=300) == 0
    assert checkpoint_step(out) == 2 and (out / "model" / "config.json").is_file()


def test_a_closed_stderr_is_no_stream_at_all(tiny_model_dir, tmp_path):
    out = tmp_path / "run"  # `2>&-`: Python starts with sys.stderr = None
    proc = noisy_run(tiny_model_dir, out, "--save_every", "1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     preexec_fn=lambda: os.close(2))
    assert proc.wait(timeout=300) == 0
    assert (out / "model" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 900 kB tmpfs: room for the run's files and the tiny model/ (about 0.4 MB), not for a checkpoint (1.2 MB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_removes_its_debris_and_still_writes_the_model(tiny_model_dir, small_disk):
    out = small_disk / "run"  # a reward with a spread: the optimiser has state, and the checkpoint its full size
    proc = noisy_run(tiny_model_dir, out, "--save_every", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write {out / 'checkpoint'} (") and "free some space" in error
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoint.tmp").exists() and not (out / "model.tmp").exists()
    assert (out / "model" / "config.json").is_file()  # model/ is smaller than a checkpoint, and was still tried
    assert not (out / harness.LOCK).exists()
    filler = small_disk / "filler"  # now fill the disk to the last byte: even the lock cannot be written
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    again = run_script("grpo_mini.py", "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS,
                       "--dtype", "fp32", "--num_generations", "4", "--overwrite")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir {out}: could not write")
    assert not (out / harness.LOCK).exists()  # no empty lock left to refuse the next try


# ---------------------------------------------------------------------------------------------- whose directory
def test_only_our_marker_makes_a_directory_ours(tmp_path):
    out = tmp_path / "trl_run"  # a TRL GRPOConfig dump has output_dir, num_generations and loss_type too
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_text("the user's weights")
    (out / "config.json").write_text(json.dumps({"output_dir": str(out), "num_generations": 8, "loss_type": "dapo",
                                                 "per_device_train_batch_size": 8}))
    with pytest.raises(g.ConfigError, match=r"holds files that no grpo-mini run wrote .* `touch .*\.grpo_mini_run` "
                                            r"marks it"):
        g.check_output_dir(g.Config(output_dir=str(out), overwrite=True))
    assert (out / "model" / "model.safetensors").read_text() == "the user's weights"
    (out / harness.MARKER).write_text("grpo_mini.py:Config\n")  # the user says it is one of ours
    g.check_output_dir(g.Config(output_dir=str(out), overwrite=True))


def fake_compare_run(run_dir: Path, method: str, flags: list, finished: bool) -> None:
    """What compare.py leaves in a run directory: config.json as the flags give it, and metrics.jsonl."""
    import dataclasses

    from benchmarks.compare import METHODS, config_classes

    cfg = g.parse_config(config_classes()[METHODS[method][0]], argv=flags)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    records = [{"step": 0, "eval_accuracy": 0.5, "eval_completion_len": 9.0}]
    records += [{"step": cfg.max_steps, "eval_accuracy": 0.75, "eval_completion_len": 8.0}] if finished else []
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_stored_config_reads_a_flag_added_since_at_its_default():
    """--resume and compare.py --reuse both read an older run's config this way (harness.with_defaults)."""
    import harness

    stored = harness.with_defaults({"seed": 3, "dtype": "bf16"}, harness.RunConfig)
    assert stored["seed"] == 3 and stored["dtype"] == "bf16" and stored["gradient_checkpointing"] is False


def test_compare_never_replaces_a_run_it_was_not_asked_to(tmp_path):
    from benchmarks.compare import PRESETS, plan_run, run_flags

    settings = {**PRESETS["cpu"], "max_steps": 2}
    out = tmp_path / "compare"
    fake_compare_run(out / "grpo_seed0", "grpo", run_flags("grpo", 0, settings, out / "grpo_seed0"), True)
    fake_compare_run(out / "grpo_seed1", "grpo", run_flags("grpo", 1, settings, out / "grpo_seed1"), False)
    other = {**settings, "learning_rate": 1e-4}
    fake_compare_run(out / "grpo_seed2", "grpo", run_flags("grpo", 2, other, out / "grpo_seed2"), True)
    for seed in (0, 1, 2):  # without --reuse or --overwrite, any earlier run is refused
        with pytest.raises(SystemExit, match=rf"grpo_seed{seed} holds an earlier run \(nothing was changed\)"):
            plan_run("grpo", seed, settings, out, overwrite=False, reuse=False)
    assert plan_run("grpo", 0, settings, out, overwrite=False, reuse=True) == "reuse"
    assert plan_run("grpo", 1, settings, out, overwrite=False, reuse=True) == "train"  # this comparison, interrupted
    with pytest.raises(SystemExit, match="grpo_seed2 holds an earlier run with other flags"):
        plan_run("grpo", 2, settings, out, overwrite=False, reuse=True)
    assert plan_run("grpo", 2, settings, out, overwrite=True, reuse=True) == "train"
    assert plan_run("grpo", 3, settings, out, overwrite=False, reuse=False) == "train"  # nothing there
    # a run made before a flag existed had the flag's default: it is reused while the flag is at that default
    stored = json.loads((out / "grpo_seed0" / "config.json").read_text())
    (out / "grpo_seed0" / "config.json").write_text(json.dumps({k: v for k, v in stored.items()
                                                                if k != "gradient_checkpointing"}))
    assert plan_run("grpo", 0, settings, out, overwrite=False, reuse=True) == "reuse"
    with pytest.raises(SystemExit, match="grpo_seed0 holds an earlier run with other flags"):
        plan_run("grpo", 0, {**settings, "gradient_checkpointing": True}, out, overwrite=False, reuse=True)
    # end to end: refused in one line before anything runs, and nothing was touched
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_script("benchmarks/compare.py", "--output_dir", out, "--seeds", "0", "1", "2", "--methods", "grpo",
                        "--set", "max_steps=2", "--reuse", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {out / 'grpo_seed2'} holds an earlier run with other flags (nothing was changed): pass --reuse to "
        f"keep finished runs made with the same flags, --overwrite to replace it, or choose another --output_dir"]
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_tree_compare_refuses_to_replace_earlier_results(tmp_path):
    out = tmp_path / "trees"
    out.mkdir()
    (out / "results.md").write_text("an earlier comparison")
    result = run_script("benchmarks/tree_compare.py", "--output_dir", out, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: --output_dir {out} already holds results (results.md): pass --overwrite to replace them (with "
        f"--reuse to keep its finished runs), or choose another --output_dir"]
    (out / "results.md").unlink()
    (out / "tree_grpo_seed0").mkdir()
    (out / "tree_grpo_seed0" / "metrics.jsonl").write_text("{}\n")
    result = run_script("benchmarks/tree_compare.py", "--output_dir", out, timeout=120)
    assert result.returncode == 1 and "tree_grpo_seed0 holds an earlier run (nothing was changed)" in result.stderr


# ---------------------------------------------------------------------------------------------- --data numbers
def test_data_reads_scientific_notation_or_refuses_it_in_one_line(tmp_path):
    assert [tasks.read_answer(a, "f:1") for a in ("2.5e3", "1e3", "1.5e-2", " -4 ", 7, "3 + 4 = 7. #### 7")] == [
        2500.0, 1000.0, 0.015, -4.0, 7.0, 7.0]
    data = tmp_path / "sci.jsonl"
    data.write_text('{"prompt": "a?", "answer": "2.5e3"}\n{"prompt": "b?", "answer": "1e3"}\n'
                    '{"prompt": "c?", "answer": "1.5e-2"}\n{"prompt": "d?", "answer": "about 2.5e3 apples"}\n')
    with pytest.raises(g.ConfigError, match=r"sci.jsonl:4: \"answer\" 'about 2.5e3 apples' has a number in "
                                            r"scientific notation inside text"):
        g.load_jsonl_problems(str(data))
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))
    assert [p.answer for p in g.load_jsonl_problems(str(data))] == [2500.0, 1000.0, 0.015]


# ---------------------------------------------------------------------------------------------- signals
def test_a_second_signal_during_the_exit_path_cannot_interrupt_the_save(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_sample, real_save, calls = engine.sample_completions, harness.Run.save, []

    def sample_then_ctrl_c(*args, **kwargs):  # Ctrl-C arrives during step 2's sampling ...
        calls.append(1)
        if len(calls) == 3:  # the step-0 eval, step 1, step 2
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        return real_sample(*args, **kwargs)

    def sigterm_then_save(self, final_model):  # ... and SIGTERM on the way out, just before the save
        if len(calls) == 3:  # not the checkpoint every step: the exit path's save
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        return real_save(self, final_model)

    monkeypatch.setattr(engine, "sample_completions", sample_then_ctrl_c)
    monkeypatch.setattr(harness.Run, "save", sigterm_then_save)
    summary = g.train(g.Config(model=str(tiny_model_dir), output_dir=str(out), **{**TINY, "max_steps": 5}),
                      reward_fn=lambda c, a: [sum(map(ord, t)) % 7 / 7 for t in c])
    assert summary["interrupted"] and summary["exit_code"] == 130
    assert checkpoint_step(out) == 1 and (out / "model" / "config.json").is_file()
    assert not (out / harness.LOCK).exists()


# ---------------------------------------------------------------------------------------------- the minor classes
def test_a_completion_length_beyond_the_context_is_one_line_after_loading(tiny_model_dir, tmp_path):
    with pytest.raises(g.ConfigError, match=r"--max_completion_length 600: the model's context is 512 tokens"):
        g.train(g.Config(model=str(tiny_model_dir), output_dir=str(tmp_path / "a"), **{**TINY,
                                                                                        "max_completion_length": 600}))
    with pytest.raises(g.ConfigError, match=r"a generated prompt: the prompt has \d+ tokens, more than the 2 "):
        g.train(g.Config(model=str(tiny_model_dir), output_dir=str(tmp_path / "b"), **{**TINY,
                                                                                        "max_completion_length": 510}))


def test_a_rollout_that_cannot_fit_in_memory_is_one_line_before_it_starts(tiny_model_dir, tmp_path):
    with pytest.raises(g.ConfigError, match=r"--prompts_per_step x --num_generations = 10000000 rows of up to \d+ "
                                            r"tokens need about [\d.]+ GiB to sample"):
        g.train(g.Config(model=str(tiny_model_dir), output_dir=str(tmp_path / "a"),
                         **{**TINY, "prompts_per_step": 10_000, "num_generations": 1000, "num_train_problems": 10}))


def test_out_of_memory_is_one_line():
    def train(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes.")

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert flags.run_cli(train, g.Config()) == 2
    assert err.getvalue().startswith("error: out of memory (") and "lower --prompts_per_step" in err.getvalue()
    with pytest.raises(RuntimeError, match="another error"):  # other errors keep their traceback
        flags.run_cli(lambda cfg: (_ for _ in ()).throw(RuntimeError("another error")), g.Config())


def test_a_gfpo_metric_that_returns_nan_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nan_metric.py").write_text("import torch\n"
                                            "def score(rewards, lengths, completions):\n"
                                            "    return torch.full_like(rewards, float('nan'))\n"
                                            "def late(rewards, lengths, completions):\n"
                                            "    return rewards / (lengths - 4)\n")  # fine on validate()'s trial group; 0 / 0 at length 4
    with pytest.raises(g.ConfigError, match="must return a tensor with one finite score per completion"):
        gfpo.GFPOConfig(filter_metric="nan_metric:score").validate()
    fn = gfpo.gfpo_advantage_fn(gfpo.GFPOConfig(filter_metric="nan_metric:late", num_generations=4,
                                                num_remains_in_group=2))
    import torch

    ro = g.Rollout(*[None] * 5, completions=["a"] * 4, answers=[0] * 4, questions=[""] * 4, num_generations=4,
                   rewards=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    ro.completion_mask = torch.ones(4, 4)  # every length 4: 0 / 0 for the reward-0 rows
    with pytest.raises(g.ConfigError, match="nan_metric:late: returned a non-finite score"):
        fn(ro)


def test_resume_accepts_the_same_path_spelled_differently_and_refuses_changed_data(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(30)))
    first = dict(model=str(tiny_model_dir), output_dir="run", data="data.jsonl", **{**TINY, "max_steps": 1})
    g.train(g.Config(**first))
    g.train(g.Config(**{**first, "data": "./data.jsonl", "max_steps": 2, "resume": True}))  # the same file
    with data.open("a") as handle:
        handle.write(json.dumps({"prompt": "What is 100 + 1?", "answer": 101}) + "\n")
    with pytest.raises(g.ConfigError, match=r"--resume: --data data.jsonl has changed since the run began"):
        g.train(g.Config(**{**first, "max_steps": 3, "resume": True}))


def test_a_lock_of_a_live_unrelated_process_is_stale_or_names_its_remedy(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the pid is alive, but it started after the lock was written: the number was reused
        (out / harness.LOCK).write_text(f"{other.pid} 1")
        g.check_output_dir(g.Config(output_dir=str(out)))
        assert (out / harness.LOCK).read_text().split()[0] == str(os.getpid())
        (out / harness.LOCK).write_text(str(other.pid))  # an older lock, the pid alone: refused, with the remedy
        with pytest.raises(g.ConfigError, match=rf"if no run is writing there, delete {out / harness.LOCK}"):
            g.check_output_dir(g.Config(output_dir=str(out)))
    finally:
        other.kill()
        other.wait()


def test_benchmark_command_lines_answer_bad_input_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    for args, expected in [
        (["benchmarks/cold_start.py", "--steps", "0"], "argument --steps: must be >= 1 (got 0)"),
        (["benchmarks/length_probe.py", "--temperature", "nan"], "argument --temperature: must be >= 0.01"),
        (["benchmarks/length_probe.py", "--write_jsonl", tmp_path / "no" / "dir" / "x.jsonl", "--settings",
          "sum_of_four"], f"error: {tmp_path / 'no' / 'dir' / 'x.jsonl'}: No such file or directory"),
        (["benchmarks/plot_run.py", run_dir, "--out", tmp_path / "no" / "dir" / "x.png"], "No such file or directory"),
    ]:
        result = run_script(*args, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        assert expected in result.stderr.strip().splitlines()[-1], (args, result.stderr)


# ---------------------------------------------------------------------------------------------- the layering
LAYERS = ["scaling", "flags", "engine", "harness", "tasks", "grpo_mini", "semantic_entropy", "seed_grpo", "gfpo", "tree_grpo"]


def test_every_module_imports_only_modules_below_it_by_name():
    for index, name in enumerate(LAYERS):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not any(alias.name == "*" for alias in node.names), f"{name}.py star-imports {node.module}"
                imported = [node.module]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            for module in imported:
                if module in LAYERS:
                    assert LAYERS.index(module) < index, f"{name}.py imports {module}, which is not below it"
    assert g.sample_completions is engine.sample_completions and g.ConfigError is harness.ConfigError
