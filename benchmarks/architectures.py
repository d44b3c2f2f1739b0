"""benchmarks/architectures.py: a tiny random model of each common small architecture, built offline in a second.

tests/test_architectures.py runs the fast engine against the plain forms on each (on the CPU, in CI), and
benchmarks/gpu_check.py does the same on a GPU. Where a new architecture breaks first is the fast sampler's use of
the cache internals (expand_cache_rows, batch_select_indices): sliding-window layers (Gemma 3, with a window smaller
than the prompt), fused projections (Phi-3), learned positions (GPT-2), and each family's own norms and attention.
"""

from __future__ import annotations

import torch

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


def tiny_model(family: str, tokenizer, device="cpu"):
    """A 2-layer random `family` model over `tokenizer`'s vocabulary, in eval mode on `device`. Its weights are
    larger than the default initialisation, and untied, so that greedy decoding varies its tokens."""
    import transformers

    config_name, model_name, own = ARCHITECTURES[family]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        settings = dict(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids)
    else:
        settings = dict(vocab_size=len(tokenizer), tie_word_embeddings=False, **COMMON, **own, **ids)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**settings))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["eos_token_id"], ids["pad_token_id"]
    return model.to(device).eval()
