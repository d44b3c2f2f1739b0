"""The fast engine on every common small architecture, as people bring their own model: a tiny random model of each
(built offline in a second), whose fast sampler must give model.generate's greedy tokens, whose shared-prompt
log-probs must equal the full forward's, and which must train two steps with the bf16 sampling copy.

Where a new architecture breaks first is the fast sampler's use of the cache internals (expand_cache_rows,
batch_select_indices): sliding-window layers (Gemma 3, with a window smaller than the prompt), fused projections
(Phi-3), learned positions (GPT-2), and each family's own norms and attention."""

import pytest
import torch
import transformers

import engine
import grpo_mini as g

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
ARCHITECTURES = {  # family -> (config class, model class, the config's own settings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # a window of 8 is smaller than every prompt here
               {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),  # learned absolute positions
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def build(family: str, tokenizer):
    config_name, model_name, own = ARCHITECTURES[family]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        settings = dict(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids)
    else:
        settings = dict(vocab_size=len(tokenizer), tie_word_embeddings=False, **COMMON, **own, **ids)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**settings)).eval()
    with torch.no_grad():  # larger weights than the default init, untied: greedy decoding then varies its tokens
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["eos_token_id"], ids["pad_token_id"]
    return model


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
