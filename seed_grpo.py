"""seed_grpo.py: SEED-GRPO, GRPO whose updates shrink on prompts the model is semantically unsure about.

SEED-GRPO (arXiv 2505.12346) measures, for every prompt, the semantic entropy SE(q) of its G sampled completions
(how many different final answers the model gave, weighted by how likely each was) and scales that prompt's
advantages by it:

    A_i      = (r_i - mean(r)) / std(r)            (GRPO's advantage, our default; the paper builds on Dr. GRPO's
                                                    r_i - mean(r): --scale_rewards none)
    A^_i     = A_i * f(alpha * SE(q) / SE_max)     SE_max = log G, so the argument lies in [0, alpha]
    f        = linear 1 - x | exp e^-x | inverse 1 / (1 + x)

High entropy -> smaller factor -> a more conservative update: when the model's answers are all over the place,
a lucky correct sample is weak evidence, so it should not move the policy as much. Everything else (rollout,
loss, loop, evaluation) is grpo_mini's; this file holds only the difference.

Run it:

    python seed_grpo.py                                 # same defaults, model and task as grpo_mini.py
    python seed_grpo.py --modulation exp --alpha 1.0    # another f
    python seed_grpo.py --modulation bins               # the blog variant (NOT the paper; see uncertainty_bins)
    python seed_grpo.py --judge nli --nli-model microsoft/deberta-large-mnli   # free-text tasks
    python seed_grpo.py --judge exact --estimator likelihood --modulation inverse --alpha 0.0417 --scale_rewards none
                                                        # the authors' released code, as re-implementations report it
    python seed_grpo.py --estimator monte_carlo         # the paper's own SE equation
    python seed_grpo.py --shuffle_factors               # the control: the same factors, shuffled among prompts

What you will see: grpo_mini's per-step line plus `se` (mean semantic entropy of the step's prompts, nats) and
`factor` (mean advantage multiplier), and the same `held-out accuracy: BEFORE -> AFTER` at the end.

What the paper does and does not pin down (see ../shared/ALGORITHMS.md and the README's deviations list):
  - The base advantage. The paper builds on Dr. GRPO (no std division). Our default divides by the group's std,
    as GRPO does, because of a measurement: on the built-in task at GRPO's learning rate, the no-std advantage
    times the factor gave a mean gradient norm of 0.31 against GRPO's 1.65 (clipped to 1.0). That is about a third
    of GRPO's step, and SEED-GRPO did not learn in 20 steps (0.406 -> 0.391). With the std, the step is GRPO's
    times the factor, and the comparison with GRPO isolates what the factor does. `--scale_rewards none` is the
    paper's base; give it a larger --learning_rate.
  - The paper names f as linear, exponential or focal without one definitive form. Code released later by the
    authors is reported (by re-implementations; we have not verified it) to multiply by 1 / (1 + alpha_eff * SE)
    with alpha_eff = 0.0417 / log G: at most about a 4% change at G = 8.
  - Our default is that inverse form, f(x) = 1 / (1 + x), but with alpha = 1: the factor then spans [0.5, 1], so a
    maximally uncertain prompt gets half the update. At the authors' reported strength the effect (<= 4%) would be
    invisible in a 30-step run next to sampling noise, and a teaching run should show what the knob does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from grpo_mini import Config, ConfigError, Rollout, group_advantages, main, mean_token_logps
from semantic_entropy import (DEFAULT_NLI_MODEL, ExactAnswerJudge, MathAnswerJudge, NLIJudge,
                              discrete_semantic_entropy, monte_carlo_semantic_entropy, semantic_entropy)

MODULATIONS = ("inverse", "exp", "linear", "bins")
ESTIMATORS = ("likelihood", "discrete", "monte_carlo")
JUDGES = ("math", "exact", "nli")


@dataclass
class SeedConfig(Config):
    """SEED-GRPO (seed_grpo.py): advantages scaled by semantic entropy"""
    output_dir: str = "runs/seed_grpo"
    """where metrics.jsonl, config.json and the trained model go"""
    scale_rewards: str = "group"
    """advantage scaling: group (GRPO's std, our default; see the module docstring) | batch | none (the paper's Dr. GRPO base, A = r - mean)"""
    modulation: str = "inverse"
    """f in A^ = A * f(alpha * SE / log G): inverse 1/(1+x) | exp e^-x | linear 1-x | bins (blog variant, not the paper)"""
    alpha: float = 1.0
    """strength of the modulation (the authors' code is reported to use about 0.0417; see the module docstring)"""
    estimator: str = "likelihood"
    """likelihood (Rao form over the sampler's length-normalised log-probs: the authors' code as reported) | discrete (cluster frequencies) | monte_carlo (the paper's equation: -mean_k log p(C_k) over raw sequence probabilities)"""
    judge: str = "math"
    """how answers are clustered: math (same final number, no model) | exact (same final-answer TEXT: the authors' code as reported, so "12" and "12.0" differ) | nli (bidirectional entailment)"""
    nli_model: str = DEFAULT_NLI_MODEL
    """NLI checkpoint for --judge nli (hub id or directory)"""
    shuffle_factors: bool = False
    """the control (seed_shuffled): permute the step's factors at random among its prompts. The same factors, so the
    same distribution of step sizes, but no link to each prompt's uncertainty: SEED-GRPO beating it means the link
    matters"""

    def validate(self) -> None:
        super().validate()
        if self.modulation not in MODULATIONS:
            raise ConfigError(f"--modulation must be one of {', '.join(MODULATIONS)} (got {self.modulation!r})")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {self.estimator!r})")
        if self.judge not in JUDGES:
            raise ConfigError(f"--judge must be one of {', '.join(JUDGES)} (got {self.judge!r})")
        if self.alpha < 0:
            raise ConfigError(f"--alpha must be >= 0 (got {self.alpha})")
        if self.modulation == "linear" and self.alpha > 1:
            raise ConfigError(f"--alpha must be <= 1 with --modulation linear, or 1 - x turns negative and flips the "
                              f"sign of the advantage (got {self.alpha})")


# ======================================================================================================================
# The difference from GRPO: semantic entropy per prompt, and advantages scaled by it
# ======================================================================================================================


def modulation_factor(entropy: torch.Tensor, num_generations: int, modulation: str, alpha: float) -> torch.Tensor:
    """f(alpha * SE / SE_max) with SE_max = log G, elementwise over prompts.

        x = alpha * SE / log G;   linear: 1 - x   exp: e^-x   inverse: 1 / (1 + x)
    Example, G = 8, alpha = 1, SE = log 8 / 2 (x = 0.5): linear 0.5, exp 0.6065, inverse 0.6667. SE = 0 gives 1."""
    x = alpha * entropy / math.log(num_generations)
    if modulation == "linear":
        return 1 - x
    if modulation == "exp":
        return torch.exp(-x)
    if modulation == "inverse":
        return 1 / (1 + x)
    raise ValueError(f"modulation must be linear, exp or inverse, got {modulation!r}")


def uncertainty_bins(entropy: torch.Tensor) -> torch.Tensor:
    """The variant a widely read article describes. It is NOT the paper's method, and it points the other way:

    prompts are split by the terciles of SE over the batch, and LOW uncertainty gets 0.8, mid 1.0, HIGH 1.2 (the
    paper makes high-uncertainty updates smaller). Low: SE < 1/3 quantile; high: SE > 2/3 quantile; else mid, so a
    batch of equal entropies stays at 1.0. Example: SE = [0, 1, 2] -> quantiles 0.667, 1.333 -> [0.8, 1.0, 1.2]."""
    values = entropy.double().cpu().numpy()
    low, high = np.quantile(values, [1 / 3, 2 / 3])
    factors = np.where(values < low, 0.8, np.where(values > high, 1.2, 1.0))
    return torch.tensor(factors, dtype=entropy.dtype, device=entropy.device)


def seed_advantages(rewards: torch.Tensor, entropy: torch.Tensor, num_generations: int, *, modulation: str,
                    alpha: float, scale_rewards: str = "none", baseline: str = "mean",
                    permutation: Optional[torch.Tensor] = None) -> tuple:
    """A^_i = A_i * factor(prompt of i). rewards [N], entropy [B] (one per prompt) -> (advantages [N], factors [B]).
    permutation [B] (the seed_shuffled control): prompt b gets factor factors[permutation[b]] instead of its own.

    Example, G = 2, rewards [1, 0, 1, 0], SE = [0, log 2], inverse, alpha 1: A = [0.5, -0.5, 0.5, -0.5],
    factors [1, 0.5] -> A^ = [0.5, -0.5, 0.25, -0.25]; with permutation [1, 0] the factors become [0.5, 1] ->
    A^ = [0.25, -0.25, 0.5, -0.5]."""
    base = group_advantages(rewards, num_generations, scale_rewards, baseline=baseline)  # [N]
    if modulation == "bins":
        factors = uncertainty_bins(entropy)
    else:
        factors = modulation_factor(entropy, num_generations, modulation, alpha)  # [B]
    if permutation is not None:
        factors = factors[permutation]
    return base * factors.repeat_interleave(num_generations), factors


def group_entropies(ro: Rollout, judge, estimator: str) -> torch.Tensor:
    """Semantic entropy of each prompt's G completions. [B]

    The likelihoods come from the SAMPLING policy's log-probs, which the rollout already computed (no extra forward):
      likelihood:  the length-normalised sequence log-prob (mean token log-prob), in the Rao form;
      monte_carlo: the raw sequence log-prob (sum over tokens), in Kuhn's Monte-Carlo form, as the paper writes it;
      discrete:    none, cluster frequencies only."""
    G = ro.num_generations
    if estimator == "likelihood":
        likelihoods = mean_token_logps(ro.sampling_logps, ro.completion_mask).tolist()  # [N]
    elif estimator == "monte_carlo":
        likelihoods = (ro.sampling_logps * ro.completion_mask).sum(dim=1).tolist()  # [N]
    values = []
    for start in range(0, len(ro.completions), G):
        ids = judge.cluster(ro.completions[start:start + G], ro.questions[start])
        if estimator == "likelihood":
            values.append(semantic_entropy(ids, likelihoods[start:start + G]))
        elif estimator == "monte_carlo":
            values.append(monte_carlo_semantic_entropy(ids, likelihoods[start:start + G]))
        else:
            values.append(discrete_semantic_entropy(ids))
    return torch.tensor(values, dtype=torch.float32, device=ro.rewards.device)


def seed_advantage_fn(cfg: SeedConfig):
    """SEED-GRPO's replacement for grpo_mini.grpo_advantage_fn."""
    judge = {"math": MathAnswerJudge, "exact": ExactAnswerJudge}.get(cfg.judge)
    judge = judge() if judge else NLIJudge(cfg.nli_model, device=cfg.device)

    shuffler = torch.Generator().manual_seed(cfg.seed)  # its own stream: the sampling's random numbers stay SEED-GRPO's

    def advantages(ro: Rollout):
        entropy = group_entropies(ro, judge, cfg.estimator)  # [B]
        permutation = torch.randperm(entropy.numel(), generator=shuffler).to(entropy.device) \
            if cfg.shuffle_factors else None
        adv, factors = seed_advantages(ro.rewards, entropy, ro.num_generations, modulation=cfg.modulation,
                                       alpha=cfg.alpha, scale_rewards=cfg.scale_rewards, baseline=cfg.baseline,
                                       permutation=permutation)
        return adv, {"semantic_entropy": entropy.mean().item(), "seed_factor": factors.mean().item()}

    # the shuffler's state goes into checkpoints, so that --resume draws the same permutations (harness.Run)
    advantages.state_dict = lambda: {"shuffler": shuffler.get_state()}
    advantages.load_state_dict = lambda state: shuffler.set_state(state["shuffler"])
    return advantages


SEED_LOG_KEYS = [("semantic_entropy", "se", "{:.3f}"), ("seed_factor", "factor", "{:.3f}")]

if __name__ == "__main__":
    sys.exit(main(SeedConfig, advantage_fn=seed_advantage_fn, extra_log_keys=SEED_LOG_KEYS))
