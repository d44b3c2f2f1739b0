"""grpo-mini against TRL 1.16's own code, on fixed tensors: the numbers in data/trl_1_16_reference.json were produced
by benchmarks/trl_reference.py running TRL's GRPOTrainer code (see its docstring); TRL is not needed here."""

import json
import math
from pathlib import Path

import pytest
import torch

import grpo_mini as g

REFERENCE = json.loads((Path(__file__).parent / "data" / "trl_1_16_reference.json").read_text())
TENSORS = {key: torch.tensor(value, dtype=torch.float64) for key, value in REFERENCE["tensors"].items()}


def test_reference_was_made_by_trl_1_16():
    assert REFERENCE["trl_version"] == "1.16.0"


@pytest.mark.parametrize("case", REFERENCE["importance_weights"], ids=lambda c: f"{c['mode']}-{c['clip_min']}-"
                                                                              f"{c['clip_max']}")
def test_importance_sampling_correction_equals_trl(case):
    ours = g.importance_sampling_correction(TENSORS["old"], TENSORS["sampling"], TENSORS["mask"], case["mode"],
                                            case["clip_min"], case["clip_max"])
    assert torch.allclose(ours, torch.tensor(case["weights"], dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_the_reference_weights_exercise_the_clip_and_the_mask():
    weights = {(c["mode"], c["clip_min"], c["clip_max"]): torch.tensor(c["weights"]) for c in
               REFERENCE["importance_weights"]}
    assert (weights[("token_mask", 0.5, 2.0)] == 0).any() and (weights[("token_mask", 0.5, 2.0)] > 0).any()
    assert (weights[("token_truncate", 0.5, 2.0)] == 2.0).any() or (weights[("token_truncate", 0.5, 2.0)] == 0.5).any()


def test_importance_sampling_correction_docstring_example():
    d = torch.tensor([[math.log(2), math.log(2)]])
    mask, zero = torch.ones(1, 2), torch.zeros(1, 2)
    run = lambda mode: g.importance_sampling_correction(d, zero, mask, mode, None, 3.0)  # noqa: E731
    assert torch.allclose(run("token_truncate"), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(run("token_mask"), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(run("sequence_truncate"), torch.tensor([[3.0]]))
    assert torch.equal(run("sequence_mask"), torch.tensor([[0.0]]))


@pytest.mark.parametrize("case", REFERENCE["entropy_masks"], ids=lambda c: str(c["top_entropy_quantile"]))
def test_high_entropy_mask_equals_trl(case):
    ours = g.high_entropy_mask(TENSORS["entropies"], TENSORS["mask"], case["top_entropy_quantile"])
    assert ours.tolist() == case["mask"]


def test_high_entropy_mask_docstring_example():
    kept = g.high_entropy_mask(torch.tensor([[0.1, 0.5, 0.9, 0.3]]), torch.ones(1, 4), 0.5)
    assert kept.tolist() == [[False, True, True, False]]


def our_loss(case: dict, mask: torch.Tensor):
    """grpo-mini's policy_loss with what TRL's case switched on: (loss, d loss / d logp)."""
    logp = TENSORS["logp"].clone().requires_grad_(True)
    weights = None
    if "is_mode" in case:
        weights = g.importance_sampling_correction(TENSORS["old"], TENSORS["sampling"], mask, case["is_mode"],
                                                   None, 3.0)
    if case.get("top_entropy_quantile", 1.0) < 1.0:
        kept = g.high_entropy_mask(TENSORS["entropies"], mask, case["top_entropy_quantile"]).to(torch.float64)
        weights = kept if weights is None else weights * kept
    beta = case.get("beta", 0.0)
    loss, _ = g.policy_loss(logp, TENSORS["old"], TENSORS["ref"] if beta else None, TENSORS["advantages"], mask,
                            loss_type=case["loss_type"], epsilon=0.2, epsilon_high=case.get("epsilon_high"), beta=beta,
                            importance_sampling_level=case.get("importance_sampling_level", "token"),
                            max_completion_length=6, num_items=mask.sum().item(), delta=case.get("delta"),
                            token_weights=weights, sapo_temperatures=(1.0, 1.05))
    loss.backward()
    return loss.item(), logp.grad


@pytest.mark.parametrize("reference", REFERENCE["losses"], ids=lambda r: "-".join(f"{k}={v}" for k, v in
                                                                                 r["case"].items()))
def test_policy_loss_value_and_gradient_equal_trl(reference):
    loss, grad = our_loss(reference["case"], TENSORS["mask"])
    assert loss == pytest.approx(reference["loss"], abs=1e-5)
    assert torch.allclose(grad, torch.tensor(reference["grad"], dtype=torch.float64), atol=1e-5)
    assert grad.abs().sum() > 0  # every case has a gradient to compare


def test_the_reference_cases_bind_their_caps():
    """cispo's cap at epsilon_high 1.2 and delta 1.3 are active on some token with A > 0: the cases test them."""
    ratio = torch.exp(TENSORS["logp"] - TENSORS["old"])
    positive = (TENSORS["advantages"] > 0).unsqueeze(1) & TENSORS["mask"].bool()
    assert (ratio[positive] > 1.3).any()


def test_mask_truncated_completions_equals_trl():
    """DAPO's overlong filtering: completion_mask keeps the EOS and drops truncated rows, and the loss over what is
    left (dapo: normalised by the kept tokens) equals TRL's."""
    truncation = REFERENCE["truncation"]
    mask, truncated = g.completion_mask(torch.tensor(truncation["ids"]), [truncation["eos"]])
    kept = mask * ~truncated.unsqueeze(1)
    assert kept.tolist() == truncation["mask"] and kept.sum().item() == truncation["num_items"]
    loss, grad = our_loss({"loss_type": "dapo"}, kept.to(torch.float64))
    assert loss == pytest.approx(truncation["dapo_loss"], abs=1e-5)
    assert torch.allclose(grad, torch.tensor(truncation["dapo_grad"], dtype=torch.float64), atol=1e-5)
