"""Scaling with the ecosystem (issue 15): LoRA through peft, TensorBoard logging, and the plot of one run."""

import json
import os

import pytest
import torch

import grpo_mini as g

# peft, tensorboard and matplotlib are optional dependencies; .ci/run installs them, and each test that needs one
# skips without it.

CPU = torch.device("cpu")
TINY = dict(max_steps=1, prompts_per_step=2, num_generations=4, max_completion_length=8, num_train_problems=20,
            num_eval_problems=4, eval_every=0, device="cpu", dtype="fp32", learning_rate=1e-2, warmup_steps=0)


def char_code_reward(completions, answers):
    return [sum(map(ord, text)) / 1000 for text in completions]


def logps_of(model, ro):
    return g.completion_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 0.7)


def test_lora_trains_only_the_adapters_and_its_reference_is_the_base_model(tiny_model, tiny_tokenizer, tmp_path):
    import copy

    pytest.importorskip("peft")

    base = copy.deepcopy(tiny_model)
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    cfg = g.Config(output_dir=str(tmp_path / "run"), lora_r=4, lora_alpha=8, beta=0.04, save_every=1,
                   save_model=True, **TINY)
    summary = g.train(cfg, reward_fn=char_code_reward, model=tiny_model, tokenizer=tiny_tokenizer,
                      problems=g.make_arithmetic_split(0, 20, 4))
    lora_model = summary["model"]  # the peft model
    changed, frozen_changed = [], []
    for name, p in lora_model.named_parameters():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            changed.append(name)
        elif not torch.equal(p, before[plain]):
            frozen_changed.append(name)
    assert frozen_changed == [] and changed  # only adapter parameters exist as trainable, and the rest did not move
    assert any(torch.count_nonzero(p) for n, p in lora_model.named_parameters() if "lora_B" in n)  # B left zero

    # the reference: adapters off == the base model, while the adapted policy differs from it
    torch.manual_seed(0)
    problems = g.make_arithmetic_split(1, 2, 1)[0]
    ro = g.rollout(base, tiny_tokenizer, problems, g.Config(**{**TINY, "num_generations": 2}), CPU)
    with torch.no_grad():
        reference, plain_base = logps_of(g.AdaptersOff(lora_model), ro), logps_of(base, ro)
        policy = logps_of(lora_model, ro)
    assert torch.allclose(reference, plain_base, atol=1e-6)
    assert not torch.allclose(policy, plain_base, atol=1e-4)

    # saved: the merged model loads with --model and equals the adapted policy; the adapter is there too
    out = tmp_path / "run" / "model"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged, _ = g.load_model_and_tokenizer(str(out))
    with torch.no_grad():
        assert torch.allclose(logps_of(merged, ro), policy, atol=1e-5)


def test_lora_with_gradient_checkpointing_trains_to_the_same_adapters(tiny_tokenizer, tmp_path):
    """--gradient_checkpointing with LoRA and a reference model (the adapters switched off, with no backward):
    the same adapters, bit for bit, as without it."""
    from conftest import build_tiny_model

    pytest.importorskip("peft")
    adapters = []
    for checkpointing in (False, True):
        cfg = g.Config(output_dir=str(tmp_path / str(checkpointing)), lora_r=4, lora_alpha=8, beta=0.04,
                       gradient_checkpointing=checkpointing, **TINY)
        summary = g.train(cfg, reward_fn=char_code_reward, model=build_tiny_model(tiny_tokenizer),
                          tokenizer=tiny_tokenizer, problems=g.make_arithmetic_split(0, 20, 4))
        adapters.append([p.detach() for n, p in summary["model"].named_parameters() if "lora_" in n])
    assert adapters[0] and all(map(torch.equal, *adapters))
    assert any(torch.count_nonzero(p) for p in adapters[1])  # lora_B moved from its zeros


def test_lora_run_resumes(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    cfg = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), lora_r=4, **{**TINY, "max_steps": 2})
    g.train(g.Config(**{**cfg, "max_steps": 1}), reward_fn=char_code_reward)
    summary = g.train(g.Config(**cfg, resume=True), reward_fn=char_code_reward)
    assert summary["steps"] == 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"reward"' in x]
    assert steps == [1, 2]


def test_bad_lora_flags_are_one_line(tiny_model, tiny_tokenizer, tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(g.ConfigError, match="--lora_r must be >= 0"):
        g.Config(lora_r=-1).validate()
    with pytest.raises(g.ConfigError, match="--lora_target_modules nope_proj"):
        g.train(g.Config(output_dir=str(tmp_path / "r"), lora_r=2, lora_target_modules="nope_proj", **TINY),
                model=tiny_model, tokenizer=tiny_tokenizer, problems=g.make_arithmetic_split(0, 20, 4))


# ---------------------------------------------------------------------------------------------- logging and plots
def test_tensorboard_event_file_holds_the_step_scalars(tiny_model, tiny_tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = g.Config(output_dir=str(tmp_path / "run"), report_to="tensorboard", save_every=0, save_model=False,
                   **{**TINY, "max_steps": 2})
    g.train(cfg, reward_fn=char_code_reward, model=tiny_model, tokenizer=tiny_tokenizer,
            problems=g.make_arithmetic_split(0, 20, 4))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward", "zero_std_frac", "completion_len", "grad_norm", "tokens_per_s", "eval_accuracy"} <= tags
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {e.step: e.value for e in events.Scalars("reward")}
    assert logged == {r["step"]: pytest.approx(r["reward"]) for r in records if "reward" in r}  # same as the JSONL
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # JSONL stays on


def test_report_to_is_checked_before_any_model_loads():
    with pytest.raises(g.ConfigError, match="--report_to must be one of none, tensorboard, wandb"):
        g.Config(report_to="mlflow").validate()


def test_plot_of_one_run(tmp_path):
    pytest.importorskip("matplotlib")
    from conftest import run_script

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "eval_accuracy": 0.4, "eval_completion_len": 30.0}]
    records += [{"step": s, "reward": s / 10, "accuracy": s / 10, "completion_len": 30 - s, "zero_std_frac": 0.5}
                for s in range(1, 6)]
    records += [{"step": 5, "eval_accuracy": 0.6, "eval_completion_len": 25.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_script("benchmarks/plot_run.py", run)
    assert result.returncode == 0, result.stderr
    assert (run / "metrics.png").stat().st_size > 10_000
    result = run_script("benchmarks/plot_run.py", tmp_path / "nothing_here")
    assert result.returncode == 1 and result.stderr.strip().endswith("(is " + str(tmp_path / "nothing_here") +
                                                                      " a run's --output_dir?)")


# ---------------------------------------------------------------------------------------------- several processes
def torchrun(*args, timeout=300):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_two_processes_give_the_single_process_gradient(tmp_path, loss_type):
    out = tmp_path / "grads.pt"
    result = torchrun("tests/ddp_worker.py", loss_type, out)
    assert result.returncode == 0, result.stderr[-3000:]
    grads = torch.load(out)
    assert any(s.abs().sum() > 0 for s in grads["single"])
    for single, summed in zip(grads["single"], grads["summed"]):
        assert torch.allclose(single, summed, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("script, flags", [
    ("grpo_mini.py", ["--num_generations", "4"]),
    ("gfpo.py", ["--num_generations", "4", "--num_remains_in_group", "2", "--adaptive", "--k_very_hard", "3",
                 "--k_hard", "3", "--k_medium", "2", "--k_easy", "2"]),  # per-prompt advantages: rank-local
])
def test_torchrun_training_run_logs_once(tiny_model_dir, tmp_path, script, flags):
    from conftest import TINY_RUN_FLAGS

    out = tmp_path / "run"
    result = torchrun(script, "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS, *flags,
                      "--dtype", "fp32", "--eval_every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("step    1 ") for line in lines) == 1  # only rank 0 prints
    assert lines[-1].startswith("held-out accuracy: ")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the threads through Linux's /proc")
def test_torchrun_run_frees_its_process_group(tiny_model_dir, tmp_path):
    from conftest import TINY_RUN_FLAGS

    result = torchrun("tests/threads_after_run.py", "--model", tiny_model_dir, "--output_dir", tmp_path / "run",
                      *TINY_RUN_FLAGS, "--num_generations", "4", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if " threads after the run: " in line]
    assert len(reports) == 2  # one per rank
    assert not any("gloo" in line for line in reports), reports  # destroy_process_group() freed the group


def test_wandb_runs_offline_without_an_account(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    cfg = g.Config(output_dir=str(tmp_path / "run"), report_to="wandb", save_every=0, save_model=False,
                   **{**TINY, "max_steps": 2})
    g.train(cfg, reward_fn=char_code_reward, model=tiny_model, tokenizer=tiny_tokenizer,
            problems=g.make_arithmetic_split(0, 20, 4))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run, ready for `wandb sync`
