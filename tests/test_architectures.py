"""The fast engine on every common small architecture, as people bring their own model: a tiny random model of each
(built offline in a second), whose fast sampler must give model.generate's greedy tokens, whose shared-prompt
log-probs must equal the full forward's, and which must train two steps with the bf16 sampling copy.

The models and why these families: benchmarks/architectures.py (benchmarks/gpu_check.py checks the same on a GPU)."""

import pytest
import torch

from transformers.modeling_layers import GradientCheckpointingLayer

import engine
import grpo_mini as g
from benchmarks.architectures import ARCHITECTURES
from benchmarks.architectures import tiny_model as build  # not `tiny_model`: conftest's fixture has that name


def prompts(tokenizer, n=3):
    problems = g.make_arithmetic_split(0, n, 1)[0]
    tokenizer.padding_side = "left"  # as engine.load_model_and_tokenizer sets it
    return tokenizer([g.format_prompt(tokenizer, p.prompt) for p in problems], return_tensors="pt", padding=True,
                     add_special_tokens=False)


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_the_fast_engine_equals_the_plain_forms(family, tiny_tokenizer):
    model, enc = build(family, tiny_tokenizer), prompts(tiny_tokenizer)
    ids, mask = enc.input_ids, enc.attention_mask
    assert mask.sum(1).min() > 8  # every prompt is longer than Gemma 3's sliding window
    eos = g.eos_token_ids(model, tiny_tokenizer)
    fast, _ = engine.sample_completions(model, ids, mask, repeats=2, max_new_tokens=10, eos_ids=eos,
                                        pad_id=tiny_tokenizer.pad_token_id, greedy=True)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=eos)[:, ids.size(1):]
    assert torch.equal(fast[::2], generated) and torch.equal(fast[1::2], generated)  # both rows of each prompt
    assert max(len(set(row.tolist())) for row in generated) >= 4  # a model that repeats one token tests little
    # the shared-prompt log-probs of sampled completions equal one full forward per row, with the same gradient
    torch.manual_seed(1)
    completions, _ = engine.sample_completions(model, ids, mask, repeats=2, max_new_tokens=10, eos_ids=eos,
                                               pad_id=tiny_tokenizer.pad_token_id, temperature=1.0)
    completion_mask = g.completion_mask(completions, eos)[0]
    index = torch.arange(ids.size(0)).repeat_interleave(2)
    results = []
    for fn in (engine.shared_prompt_logps, g.completion_logps):
        model.zero_grad()
        logps = fn(model, ids, mask, completions, completion_mask, 0.7, prompt_index=index)
        (logps * completion_mask).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logps * completion_mask, grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4, rtol=1e-3)


def layer_bytes_values_and_grads(model, fn, checkpointed: bool, *inputs, **kwargs):
    """The bytes of the floating-point tensors, weights aside, that the decoder layers' forward keeps for the
    backward (GPT-2's also keep a boolean mask), and fn's log-probs and gradient."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    inside, saved, weights = [], [], {p.data_ptr() for p in model.parameters()}
    hooks = [hook for layer in layers for hook in (layer.register_forward_pre_hook(lambda *_: inside.append(1)),
                                                   layer.register_forward_hook(lambda *_: inside.clear()))]

    def keep(tensor):  # a checkpointed layer's own hooks replace this one: what it does not keep is not counted
        saved.append(tensor.numel() * tensor.element_size() if inside and tensor.is_floating_point()
                     and tensor.data_ptr() not in weights else 0)
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            engine.checkpointed_layers(model, checkpointed):
        logps = fn(model, *inputs, **kwargs)
    logps.sum().backward()  # after the context has exited, as micro_batch_logps' caller does it
    for hook in hooks:
        hook.remove()
    return sum(saved), logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_gradient_checkpointing_gives_the_same_values_and_gradient(family, tiny_tokenizer):
    """--gradient_checkpointing (engine.checkpointed_layers): the decoder layers keep nothing but their inputs and
    run their forward again in the backward; the log-probs and gradient are the plain backward's, bit for bit, for
    the shared-prompt pass (whose prompt layers write the cache and are not checkpointed) and the full forward."""
    model, enc = build(family, tiny_tokenizer), prompts(tiny_tokenizer)
    torch.manual_seed(2)
    completions = torch.randint(5, tiny_tokenizer.vocab_size, (6, 12))
    completion_mask = torch.ones_like(completions)
    completion_mask[0, 7:] = 0  # one row ended early
    inputs = (enc.input_ids, enc.attention_mask, completions, completion_mask, 0.7)
    index = torch.arange(3).repeat_interleave(2)  # two completions of each prompt
    sequence_length = enc.input_ids.size(1) + completions.size(1)
    for fn in (engine.shared_prompt_logps, g.completion_logps):
        plain_bytes, *plain = layer_bytes_values_and_grads(model, fn, False, *inputs, prompt_index=index)
        kept_bytes, *checkpointed = layer_bytes_values_and_grads(model, fn, True, *inputs, prompt_index=index)
        assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
        if fn is g.completion_logps:  # every layer keeps its input, [rows, P+T, hidden] in fp32, and nothing else
            layers = sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
            assert kept_bytes == layers * completions.size(0) * sequence_length * model.config.hidden_size * 4
            assert kept_bytes < plain_bytes / 10
        else:  # the prompt pass's layers write the cache, and keep what they kept
            assert kept_bytes < plain_bytes
        assert not any("forward" in vars(layer) for layer in model.modules())  # the layers are as they were


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_two_training_steps_with_the_bf16_sampling_copy(family, tiny_tokenizer, tmp_path):
    model = build(family, tiny_tokenizer)
    cfg = g.Config(max_steps=2, prompts_per_step=2, num_generations=4, max_completion_length=8, num_train_problems=20,
                   num_eval_problems=2, eval_every=0, device="cpu", dtype="bf16", output_dir=str(tmp_path / "run"),
                   save_every=0, save_model=False)
    summary = g.train(cfg, model=model, tokenizer=tiny_tokenizer,
                      reward_fn=lambda completions, answers: [len(c) % 3 / 2 for c in completions])
    assert summary["steps"] == 2 and not summary["interrupted"]
    assert next(summary["model"].parameters()).dtype == torch.float32  # the master weights stay fp32
