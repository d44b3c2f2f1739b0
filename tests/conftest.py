"""Shared fixtures: a tiny, randomly initialised Llama and a byte-level BPE tokenizer, built offline in seconds."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """Byte-level BPE trained on a few arithmetic sentences; <|im_end|> is EOS and also the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import grpo_mini

    corpus = [grpo_mini.make_arithmetic_problem(__import__("random").Random(i)).prompt for i in range(200)]
    corpus += [grpo_mini.INSTRUCTION, "The answer is 42.", "0 1 2 3 4 5 6 7 8 9 10 11 12 = + - x /"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model and tokenizer saved to disk, for `--model DIR` in subprocess runs."""
    directory = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(tiny_tokenizer).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


# Flags for a 2-step run of any of the training scripts on the tiny model (seconds, not minutes).
TINY_RUN_FLAGS = ["--max_steps", "2", "--prompts_per_step", "2", "--max_completion_length", "8",
                  "--num_eval_problems", "4", "--num_train_problems", "20", "--device", "cpu"]


def run_script(*args, timeout=300):
    """Run one of the repository's scripts in a subprocess, offline, as a user would."""
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
