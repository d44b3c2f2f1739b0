"""gfpo.py: Group Filtered Policy Optimization, "sample more to think less" (arXiv 2508.09726).

GRPO rewards correct answers whatever their length, so reasoning models drift towards long completions. GFPO
samples a LARGER group per prompt (G' = num_generations, e.g. 16), keeps only the best k by a metric that
prefers brevity, and learns only from those:

    S        = top-k of the G' completions by the metric      (shortest, or token efficiency r_i / |o_i|)
    A_i      = m_i * (r_i - mean_S(r)) / std_S(r)             m_i = 1 if i in S else 0; population std over S
    loss     = DAPO token-level aggregation, normalised by the tokens of ALL G' completions

So a short correct answer beats a long correct one simply by being the one that gets learned from. Sampling
more is what makes this work: the paper's ablation that keeps 6 of the ORIGINAL 8 barely shortens anything,
because there is too little to choose from. Everything else is grpo_mini's; this file holds only the difference.

Run it:

    python gfpo.py                                        # G' = 16, k = 8, token efficiency
    python gfpo.py --filter_metric shortest
    python gfpo.py --adaptive                             # k from the prompt's difficulty (8/8/6/4), shortest
    python gfpo.py --filter_metric mymodule:my_metric     # your own: fn(rewards, lengths, completions) -> scores

What you will see: grpo_mini's per-step line plus `len_all` / `len_kept` (mean length of all sampled vs retained
completions), `eff` (mean reward per token) and `k`, and `held-out accuracy: BEFORE -> AFTER` at the end. The
record also has tokens_sampled and tokens_trained. Compare runs with excess_length_reduction (ELR).

GFPO's regime needs a model that GRPO makes verbose. The raw SmolLM2-135M is terse, so `python
benchmarks/cold_start.py` first fine-tunes it on padded answers, and `python benchmarks/compare.py --preset
cold_start --seeds 0 1 2` compares GRPO with the GFPO variants from there (docs/RESULTS.md has what happened).
"""

from __future__ import annotations

import bisect
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from grpo_mini import Config, ConfigError, Rollout, main

BUILTIN_METRICS = ("token_efficiency", "shortest")


@dataclass
class GFPOConfig(Config):
    """GFPO (gfpo.py): sample G', learn from the k best by a metric"""
    output_dir: str = "runs/gfpo"
    """where metrics.jsonl, config.json and the trained model go"""
    num_generations: int = 16
    """completions sampled per prompt, G' (the paper's 16); only k of them are learned from"""
    num_remains_in_group: int = 8
    """k: completions kept per prompt (2 <= k < num_generations)"""
    filter_metric: Optional[str] = None
    """token_efficiency (reward / length, highest kept) | shortest (length, lowest kept) | module:function. Default: token_efficiency, or shortest with --adaptive (the paper's adaptive runs use shortest)"""
    adaptive: bool = False
    """choose k per prompt from its difficulty (mean reward of its G' samples) against the running quartiles (Algorithm 2)"""
    k_very_hard: int = 8
    """k for prompts below the 25th percentile of past difficulties (and during the warm-up)"""
    k_hard: int = 8
    """k between the 25th and 50th percentile"""
    k_medium: int = 6
    """k between the 50th and 75th percentile"""
    k_easy: int = 4
    """k above the 75th percentile"""
    adaptive_warmup_steps: int = 2
    """training steps during which every prompt gets k_very_hard, before the quartiles are used (the paper: "for a few warm-up training steps we retain 8")"""

    def validate(self) -> None:
        super().validate()
        if self.loss_type != "dapo":
            raise ConfigError(f"--loss_type must be dapo for GFPO: the paper normalises by the tokens of all G' "
                              f"completions (got {self.loss_type!r})")
        if self.baseline != "mean":
            raise ConfigError(f"--baseline {self.baseline}: GFPO's advantage compares each kept sample with the mean "
                              f"of the kept set; --baseline applies to grpo_mini.py and seed_grpo.py")
        ks = {"num_remains_in_group": self.num_remains_in_group}
        if self.adaptive:
            ks.update(k_very_hard=self.k_very_hard, k_hard=self.k_hard, k_medium=self.k_medium, k_easy=self.k_easy)
        for flag, k in ks.items():
            if not 2 <= k < self.num_generations:
                raise ConfigError(f"--{flag} must be at least 2 and below --num_generations ({self.num_generations}):"
                                  f" filtering needs two kept samples to compare and something to drop (got {k})")
        if self.adaptive_warmup_steps < 0:
            raise ConfigError(f"--adaptive_warmup_steps must be >= 0 (got {self.adaptive_warmup_steps})")
        resolve_metric(metric_name(self))


# ======================================================================================================================
# The difference from GRPO: score, keep the top k, and compute advantages over the kept set only
# ======================================================================================================================

# A metric maps one group to a score per completion; the k HIGHEST scores are kept.
#   fn(rewards: Tensor[G'], lengths: Tensor[G'] (tokens, EOS included), completions: list[str]) -> Tensor[G']
Metric = Callable[[torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor]


def token_efficiency(rewards: torch.Tensor, lengths: torch.Tensor, completions: Sequence[str]) -> torch.Tensor:
    """Reward per token, r_i / |o_i|: correct AND short scores highest."""
    return rewards / lengths.clamp(min=1.0)


def shortest(rewards: torch.Tensor, lengths: torch.Tensor, completions: Sequence[str]) -> torch.Tensor:
    """Minus the length: the shortest completions score highest, whatever their reward."""
    return -lengths.float()


def metric_name(cfg: GFPOConfig) -> str:
    """--filter_metric, or its default: shortest with --adaptive (as in the paper's adaptive runs), else token
    efficiency."""
    if cfg.filter_metric is not None:
        return cfg.filter_metric
    return "shortest" if cfg.adaptive else "token_efficiency"


def resolve_metric(name: str) -> Metric:
    """A built-in metric by name, or `module:function` importable from the working directory."""
    if name in BUILTIN_METRICS:
        return {"token_efficiency": token_efficiency, "shortest": shortest}[name]
    module_name, _, function_name = name.partition(":")
    metric = None
    if module_name and function_name:
        sys.path.insert(0, os.getcwd())  # the directory itself, not ".": the finder cached for "." may be another's
        importlib.invalidate_caches()
        try:
            metric = getattr(importlib.import_module(module_name), function_name, None)
        except ImportError:
            pass
        finally:
            sys.path.pop(0)
    if not callable(metric):
        raise ConfigError(f"--filter_metric must be one of {', '.join(BUILTIN_METRICS)} or an importable "
                          f"module:function (got {name!r})")
    # Try it on a made-up group of two before any model loads: a function with the wrong signature (os:getcwd)
    # or the wrong output would otherwise fail in the middle of the first step.
    try:
        trial = metric(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 5.0]), ["3", "five"])
        ok = isinstance(trial, torch.Tensor) and trial.shape == (2,) and bool(torch.isfinite(trial).all())
    except Exception as err:  # noqa: BLE001 - any failure means the same thing: not a usable metric
        raise ConfigError(f"--filter_metric {name}: calling it as fn(rewards, lengths, completions) raised "
                          f"{type(err).__name__}: {err}") from None
    if not ok:
        raise ConfigError(f"--filter_metric {name}: must return a tensor with one finite score per completion "
                          f"(got {trial!r:.80} for a group of 2)")
    return metric


def retain_mask(scores: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Keep the ks[b] highest-scoring completions of group b. scores [B, G'] -> mask [B, G'] of 0/1.

    Ties break deterministically: among equal scores the earlier completion is kept (stable sort).
        retain_mask([[3, 1, 3, 2]], [2]) == [[1, 0, 1, 0]];   retain_mask([[5, 5, 5]], [2]) == [[1, 1, 0]]"""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [B, G']
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.size(1), device=scores.device).expand_as(order))
    return (rank < torch.tensor(list(ks), device=scores.device).unsqueeze(1)).float()


def filtered_advantages(rewards: torch.Tensor, mask: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = m_i * (r_i - mean_S) / (std_S + eps), mean and POPULATION std (1/k) over the retained set S.

    rewards, mask [B, G'] -> advantages [N = B*G']. Filtered completions get 0. eps (TRL's 1e-4) only matters for
    a zero-variance retained set, which then gets A = 0 like a zero-variance GRPO group.
    Example: rewards [1, 0, 1, 1], kept [1, 1, 1, 0]: mean_S 2/3, std_S 0.4714 -> [0.7070, -1.4140, 0.7070, 0]."""
    k = mask.sum(dim=1, keepdim=True)  # [B, 1]
    mean = (rewards * mask).sum(dim=1, keepdim=True) / k
    std = torch.sqrt(((rewards - mean) ** 2 * mask).sum(dim=1, keepdim=True) / k)
    return (mask * (rewards - mean) / (std + eps)).reshape(-1)


class DifficultyRecord:
    """Adaptive k (Algorithm 2 of arXiv 2508.09726): a streaming record of prompt difficulties (the mean reward of
    a prompt's G' samples).

    Each step, in the paper's order: the step's difficulties are ADDED to the record first, then the quartiles of
    the record are read, and each prompt is bucketed: below q25 very hard, below q50 hard, below q75 medium, else
    easy, each bucket with its k. During the first `warmup_steps` steps every prompt gets k_very_hard (the largest,
    most GRPO-like choice). The paper keeps a t-digest; a plain list gives exact quartiles and is small enough here.
        warmup_steps 0, ks [8, 8, 6, 4], step difficulties [0, .25, .5, .75, 1] -> record = those five,
        quartiles .25 / .5 / .75 -> k = [8, 8, 6, 4, 4]"""

    def __init__(self, ks: Sequence[int], warmup_steps: int):
        self.ks, self.warmup_steps, self.values, self.steps = list(ks), warmup_steps, [], 0

    def bucket_k(self, difficulty: float) -> int:
        """k for one difficulty against the record's current quartiles."""
        q25, q50, q75 = np.percentile(self.values, [25, 50, 75])
        return self.ks[bisect.bisect_right([q25, q50, q75], difficulty)]  # 0: below q25 ... 3: at or above q75

    def step_ks(self, difficulties: Sequence[float]) -> list:
        """One training step: record the step's difficulties, then return each prompt's k."""
        self.values.extend(float(d) for d in difficulties)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            return [self.ks[0]] * len(difficulties)
        return [self.bucket_k(d) for d in difficulties]


def excess_length_reduction(length_grpo: float, length_gfpo: float, length_reference: float) -> float:
    """ELR = (L_GRPO - L_GFPO) / (L_GRPO - L_ref): the share of GRPO's extra length (over the reference, e.g. the
    untrained or SFT model) that GFPO removed. 1 = back to the reference length, 0 = as long as GRPO, < 0 longer.
    Example: L_GRPO 1000, L_GFPO 700, L_ref 600 -> 300 / 400 = 0.75."""
    if length_grpo == length_reference:
        raise ValueError("ELR is undefined when the GRPO and reference lengths are equal (no excess to reduce)")
    return (length_grpo - length_gfpo) / (length_grpo - length_reference)


def gfpo_advantage_fn(cfg: GFPOConfig):
    """GFPO's replacement for grpo_mini.grpo_advantage_fn. Filtered completions get A = 0, so grpo_mini skips their
    forward and backward when beta == 0 while still counting their tokens in dapo's normaliser."""
    metric = resolve_metric(metric_name(cfg))
    record = DifficultyRecord([cfg.k_very_hard, cfg.k_hard, cfg.k_medium, cfg.k_easy], cfg.adaptive_warmup_steps)

    def advantages(ro: Rollout):
        G = ro.num_generations
        rewards, lengths = ro.rewards.view(-1, G), ro.lengths.view(-1, G)  # [B, G']
        scores = [metric(rewards[b], lengths[b], ro.completions[b * G:(b + 1) * G]) for b in range(rewards.size(0))]
        shapes = [tuple(getattr(s, "shape", ())) for s in scores]
        if any(shape != (G,) for shape in shapes):  # a user's metric that goes wrong mid-run: one line, after a save
            raise ConfigError(f"--filter_metric {metric_name(cfg)}: returned scores of shape "
                              f"{next(s for s in shapes if s != (G,))} for a group of {G}; it must return one score "
                              f"per completion")
        scores = torch.stack(scores)  # [B, G']
        if not torch.isfinite(scores).all():  # NaN compares False with everything: the filter would keep at random
            raise ConfigError(f"--filter_metric {metric_name(cfg)}: returned a non-finite score "
                              f"({scores[~torch.isfinite(scores)][0].item()}); it must score every completion "
                              f"with a finite number")
        if cfg.adaptive:
            ks = record.step_ks(rewards.mean(dim=1).tolist())
        else:
            ks = [cfg.num_remains_in_group] * rewards.size(0)
        mask = retain_mask(scores, ks)
        kept = mask.bool()
        return filtered_advantages(rewards, mask), {
            "len_sampled": lengths.float().mean().item(), "len_retained": lengths[kept].float().mean().item(),
            "token_efficiency": token_efficiency(rewards, lengths, ro.completions).mean().item(),
            "k": float(np.mean(ks)),
        }

    # The difficulty record is state that a checkpoint must carry (grpo_mini.train saves and restores it).
    advantages.state_dict = lambda: {"difficulties": list(record.values), "steps": record.steps}

    def load_state_dict(state: dict) -> None:
        record.values, record.steps = list(state["difficulties"]), state["steps"]

    advantages.load_state_dict = load_state_dict
    return advantages


GFPO_LOG_KEYS = [("len_sampled", "len_all", "{:.1f}"), ("len_retained", "len_kept", "{:.1f}"),
                 ("token_efficiency", "eff", "{:.4f}"), ("k", "k", "{:.1f}")]

if __name__ == "__main__":
    sys.exit(main(GFPOConfig, advantage_fn=gfpo_advantage_fn, extra_log_keys=GFPO_LOG_KEYS))
