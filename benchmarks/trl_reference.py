"""benchmarks/trl_reference.py: reference numbers from TRL 1.16's own code, for tests/test_trl_reference.py.

TRL is not a dependency of grpo-mini or of its tests. This script ran once, in a separate virtualenv, and its output
is committed as data (tests/data/trl_1_16_reference.json); the tests compare grpo-mini's functions with it:

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl==1.16.0
    /tmp/trlvenv/bin/python benchmarks/trl_reference.py          # writes tests/data/trl_1_16_reference.json

What is TRL's code here, and not a transcription of it:
  - GRPOTrainer._compute_loss runs unchanged on a trainer built without __init__; only its forward
    (_get_per_token_logps_and_entropies) is replaced by fixed per-token log-probs (a leaf tensor, so that
    loss.backward() gives d loss / d logp) and fixed entropies.
  - GRPOTrainer.get_high_entropy_mask runs unchanged (a one-process accelerate.Accelerator).
  - The importance-sampling ratio and the truncated-completion mask are computed inside
    _generate_and_score_completions, which needs a model, a dataset and a generator. Those two blocks are cut out of
    its source text (inspect.getsource) and run as they are, on fixed tensors.
"""

import collections
import inspect
import json
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch

import trl
from accelerate import Accelerator
from trl.trainer.grpo_trainer import GRPOTrainer

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "trl_1_16_reference.json"
SOURCE = inspect.getsource(GRPOTrainer._generate_and_score_completions)
ACCELERATOR = Accelerator(cpu=True)


def source_block(first_line: str, stop_line: str) -> str:
    """The lines of _generate_and_score_completions from the one starting with first_line up to (not including) the
    one starting with stop_line, dedented to run with exec."""
    lines = SOURCE.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first_line))
    stop = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(stop_line))
    return textwrap.dedent("\n".join(lines[start:stop]))


IS_BLOCK = source_block("# Compute the importance sampling ratio when using vLLM",
                        "# Compute the per-token log probabilities for the reference model")
TRUNCATION_BLOCK = source_block("# If mask_truncated_completions is enabled", "# Concatenate prompt_mask")


def trl_importance_weights(old, sampling, mask, mode, clip_min, clip_max):
    trainer = SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                              vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                              vllm_importance_sampling_clip_max=clip_max)
    scope = dict(self=trainer, torch=torch, math=math, old_per_token_logps=old, sampling_per_token_logps=sampling,
                 completion_mask=mask, tool_mask=None)
    exec(IS_BLOCK, scope)
    return scope["vllm_importance_sampling_ratio"]


def trl_truncation_mask(completion_ids_list, completion_mask, eos_ids, pad_id):
    trainer = SimpleNamespace(mask_truncated_completions=True, eos_token_ids=eos_ids,
                              _tokenizer=SimpleNamespace(pad_token_id=pad_id), accelerator=ACCELERATOR)
    scope = dict(self=trainer, torch=torch, completion_ids_list=completion_ids_list, completion_mask=completion_mask,
                 tool_mask=None, device="cpu")
    exec(TRUNCATION_BLOCK, scope)
    return scope["completion_mask"], scope["num_items_in_batch"]


def bare_trainer(**settings):
    trainer = GRPOTrainer.__new__(GRPOTrainer)  # TRL's methods, none of its __init__
    args = SimpleNamespace(use_bias_correction_kl=False, delta=settings.pop("delta", None), steps_per_generation=1,
                           sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    epsilon, epsilon_high = settings.pop("epsilon", 0.2), settings.pop("epsilon_high", None)
    defaults = dict(aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                    importance_sampling_level="token", beta=0.0, loss_type="dapo", use_vllm=False,
                    vllm_importance_sampling_correction=False, max_completion_length=6,
                    current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False)
    for key, value in {**defaults, **settings}.items():
        setattr(trainer, key, value)
    trainer.args, trainer.accelerator = args, ACCELERATOR
    trainer.epsilon_low, trainer.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    return trainer


def trl_loss(tensors: dict, settings: dict):
    """TRL's _compute_loss on fixed tensors: (loss, d loss / d logp)."""
    logp = tensors["logp"].clone().requires_grad_(True)
    trainer = bare_trainer(**settings)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, tensors["entropies"], None)
    mask = tensors["mask"]
    inputs = {"prompt_ids": torch.zeros(mask.size(0), 1, dtype=torch.long),
              "prompt_mask": torch.ones(mask.size(0), 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": tensors["advantages"], "old_per_token_logps": tensors["old"],
              "ref_per_token_logps": tensors["ref"], "num_items_in_batch": mask.sum(),
              "importance_sampling_ratio": tensors.get("is_ratio")}
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    return loss.item(), logp.grad.tolist()


def fixed_tensors() -> dict:
    generator = torch.Generator().manual_seed(2026)
    N, T = 4, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    old = -torch.rand(N, T, generator=generator, dtype=torch.float64) * 2 - 0.1
    logp = old + 0.4 * torch.randn(N, T, generator=generator, dtype=torch.float64)
    sampling = old + 0.6 * torch.randn(N, T, generator=generator, dtype=torch.float64)
    ref = old - 0.3 * torch.rand(N, T, generator=generator, dtype=torch.float64)
    entropies = torch.randperm(N * T, generator=generator).view(N, T).to(torch.float64) / 7 + 0.05  # distinct
    return dict(mask=mask * 1, old=old, logp=logp, sampling=sampling, ref=ref, entropies=entropies,
                advantages=torch.tensor([0.9, -1.3, 0.4, 0.0], dtype=torch.float64))


def main() -> int:
    tensors = fixed_tensors()
    mask = tensors["mask"]
    out = {"trl_version": trl.__version__, "torch_version": torch.__version__,
           "tensors": {k: v.tolist() for k, v in tensors.items()}, "importance_weights": [], "entropy_masks": [],
           "losses": [], "truncation": None}
    bounds = [(None, 3.0), (0.5, 2.0), (0.8, None)]
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        for clip_min, clip_max in bounds:
            weights = trl_importance_weights(tensors["old"], tensors["sampling"], mask, mode, clip_min, clip_max)
            out["importance_weights"].append(dict(mode=mode, clip_min=clip_min, clip_max=clip_max,
                                                  weights=weights.tolist()))
    trainer = bare_trainer()
    for quantile in (0.0, 0.2, 0.5, 0.8, 1.0):
        kept = trainer.get_high_entropy_mask(tensors["entropies"], mask, 1 - quantile)
        out["entropy_masks"].append(dict(top_entropy_quantile=quantile, mask=kept.tolist()))

    def is_weights(mode):
        return trl_importance_weights(tensors["old"], tensors["sampling"], mask, mode, None, 3.0)

    cases = [dict(loss_type=t, importance_sampling_level=level, beta=beta)
             for t in ("cispo", "sapo") for level in ("token", "sequence") for beta in (0.0, 0.04)]
    for case in cases:
        if case["loss_type"] == "cispo":
            case["epsilon_high"] = 1.2  # low enough that the cap binds on these tensors (ScaleRL's 5.0 would not)
    cases += [dict(loss_type=t, delta=1.3, beta=beta) for t in ("grpo", "bnpo", "dr_grpo", "dapo")
              for beta in (0.0, 0.04)]
    cases += [dict(loss_type="dapo", top_entropy_quantile=q) for q in (0.2, 0.5)]
    cases += [dict(loss_type="dapo", is_mode=mode) for mode in
              ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")]
    cases += [dict(loss_type="grpo", is_mode="token_truncate", top_entropy_quantile=0.5, beta=0.04, delta=1.3,
                   epsilon_high=0.28),
              dict(loss_type="cispo", epsilon_high=1.2, is_mode="sequence_truncate", top_entropy_quantile=0.8),
              dict(loss_type="sapo", is_mode="token_mask", top_entropy_quantile=0.5)]
    for case in cases:
        settings, case_tensors = dict(case), dict(tensors)
        mode = settings.pop("is_mode", None)
        if mode is not None:
            settings.update(use_vllm=True, vllm_importance_sampling_correction=True)
            case_tensors["is_ratio"] = is_weights(mode)
        loss, grad = trl_loss(case_tensors, settings)
        out["losses"].append(dict(case=case, loss=loss, grad=grad))

    # DAPO's overlong filtering: rows 1 and 3 end without EOS (id 2) within T = 5 tokens
    eos, pad = 2, 0
    ids = [[5, 6, 2], [7, 8, 9, 4, 4], [3, 2], [6, 6, 6, 6, 6]]
    padded_mask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in ids])
    truncation_mask, num_items = trl_truncation_mask(ids, padded_mask, [eos], pad)
    truncation = dict(ids=[r + [pad] * (5 - len(r)) for r in ids], eos=eos, mask=truncation_mask.tolist(),
                      num_items=num_items.item())
    tensors_t = dict(tensors, mask=truncation_mask.to(torch.float64))
    truncation["dapo_loss"], truncation["dapo_grad"] = trl_loss(tensors_t, dict(loss_type="dapo"))
    out["truncation"] = truncation
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}: {len(out['importance_weights'])} weight sets, {len(out['entropy_masks'])} entropy masks, "
          f"{len(out['losses'])} losses (TRL {trl.__version__}, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
