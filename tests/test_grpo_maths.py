"""The maths of grpo_mini, pinned to hand-computed values and to a plain-Python transcription of TRL's loss."""

import itertools
import math

import pytest
import torch

import grpo_mini as g


# ---------------------------------------------------------------------------------------------- advantages
def test_group_advantages_docstring_example():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(g.group_advantages(rewards, 2, "group"), torch.tensor([0.7070, -0.7070, 0, 0]), atol=1e-4)
    assert torch.allclose(g.group_advantages(rewards, 2, "none"), torch.tensor([0.5, -0.5, 0, 0]))
    assert torch.allclose(g.group_advantages(rewards, 2, "batch"), torch.tensor([0.9998, -0.9998, 0, 0]), atol=1e-4)


def test_group_advantages_bessel_std_and_eps():
    rewards = torch.tensor([0.0, 1.0, 2.0])  # mean 1, Bessel std = 1
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4)
    assert torch.allclose(g.group_advantages(rewards, 3), expected)


def test_zero_variance_groups_get_zero_advantage_in_every_mode():
    rewards = torch.tensor([0.3, 0.3, 0.3, 1.0, 1.0, 1.0])
    for mode in g.SCALE_REWARDS:
        assert torch.equal(g.group_advantages(rewards, 3, mode), torch.zeros(6))
    assert g.zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5


def test_group_advantages_rejects_unknown_mode():
    with pytest.raises(ValueError):
        g.group_advantages(torch.zeros(4), 2, "bogus")


# ---------------------------------------------------------------------------------------------- KL, masks, log-probs
def test_k3_kl_worked_example():
    value = g.k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert value.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert value.item() == pytest.approx(0.1931, abs=1e-4)
    assert g.k3_kl(torch.tensor(0.3), torch.tensor(0.3)).item() == 0.0


def test_completion_mask_keeps_eos_and_drops_what_follows():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 2, 2]])
    mask, truncated = g.completion_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    mask, _ = g.completion_mask(torch.tensor([[5, 9, 3, 3]]), [3, 9])  # several EOS ids: the first one wins
    assert mask.tolist() == [[1, 1, 0, 0]]


def test_selective_log_softmax_example_and_agreement():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert g.selective_log_softmax(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75), abs=1e-6)
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    full = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(g.selective_log_softmax(logits, ids), full, atol=1e-6)



def test_chunked_token_logps_example_value_and_gradient():
    """TokenLogProbs' docstring example: log p = ln(3/4); the gradient of log p(y) is 1[j = y] - p_j."""
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    logp = g.chunked_token_logps(logits, torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    logp.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[-0.25, 0.25]]), atol=1e-6)


def test_chunked_token_logps_matches_autograd_across_chunks():
    """Same values and gradients as autograd through log_softmax(logits / tau), over more rows than one
    chunk (so the chunk loop and its last, partial chunk are exercised), in fp64 (gradcheck) and from bf16 logits."""
    torch.manual_seed(0)
    rows = 2 * g.TokenLogProbs.CHUNK_ROWS + 3
    logits = torch.randn(2, rows, 13, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (2, rows))
    assert torch.autograd.gradcheck(lambda z: g.chunked_token_logps(z, ids, 0.7), (logits,))
    upstream = torch.randn(2, rows, dtype=torch.float64)
    ours = g.chunked_token_logps(logits, ids, 0.7)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), logits)
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), logits)
    assert torch.allclose(ours, reference, atol=1e-12) and torch.allclose(grad_ours, grad_reference, atol=1e-12)
    # bf16 logits (autocast's output): fp32 log-probs, a bf16 gradient within bf16 rounding of the exact one
    low = logits.detach().bfloat16().requires_grad_(True)
    ours_bf16 = g.chunked_token_logps(low, ids, 0.7)
    assert ours_bf16.dtype == torch.float32
    exact_bf16 = torch.log_softmax(low.double() / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ours_bf16.double(), exact_bf16, atol=1e-5)
    (grad_bf16,) = torch.autograd.grad((ours_bf16 * upstream.float()).sum(), low)
    assert grad_bf16.dtype == torch.bfloat16
    assert torch.allclose(grad_bf16.double(), grad_reference, atol=2e-2, rtol=1e-2)

def test_chunked_token_logps_can_write_its_gradient_over_the_logits():
    """overwrite_logits: the same gradient, bit for bit, in the logits' memory; a second backward through the
    overwritten logits raises instead of using them."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2 * g.TokenLogProbs.CHUNK_ROWS + 3,))
    weight = torch.randn(50, 8, requires_grad=True)
    hidden = torch.randn(ids.numel(), 8, requires_grad=True)
    upstream = torch.randn(ids.numel())
    grads = []
    for overwrite in (False, True):
        logits = (hidden @ weight.T).bfloat16()  # [N, V], read by nothing else
        logps = g.chunked_token_logps(logits, ids, 0.7, overwrite_logits=overwrite)
        (logps * upstream).sum().backward(retain_graph=True)
        grads.append((weight.grad.clone(), hidden.grad.clone()))
        weight.grad = hidden.grad = None
        if overwrite:
            with pytest.raises(RuntimeError, match="inplace"):
                (logps * upstream).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_mean_token_logps():
    logps = torch.tensor([[-1.0, -3.0, -100.0]])
    assert g.mean_token_logps(logps, torch.tensor([[1.0, 1.0, 0.0]])).item() == -2.0


# ---------------------------------------------------------------------------------------------- parser and reward
@pytest.mark.parametrize("text, value", [
    ("3 + 4 = 7. So 7 apples.", 7.0), ("The answer is \\boxed{1,234}", 1234.0), ("3/4 of them", 0.75),
    ("no idea", None), ("-5 degrees", -5.0), ("12.50 dollars", 12.5), ("", None), ("1/0", None),
    ("\\boxed{} then 9", 9.0), ("x" * 10000, None),
    # the docstring's parser cases (a hostile run found them)
    ("\\boxed{\\frac{3}{4}}", 0.75), ("\u22125", -5.0), ("between 10-15", 15.0), ("x = -5", -5.0),
    ("1" + "0" * 400 + "/1", None), ("3 - 4 = -1", -1.0),
])
def test_extract_final_number(text, value):
    assert g.extract_final_number(text) == value


def test_extract_final_number_never_raises_on_odd_input():
    for junk in [None, 12, "∞", "1e999", "1,2,3,,", "\\boxed{\\boxed{3}}", "--5", "5/", "1" + "0" * 400 + "/1",
                 "\\frac{1" + "0" * 400 + "}{1}"]:
        g.extract_final_number(junk)


def test_data_file_numeric_answers_are_taken_as_numbers(tmp_path):
    import json

    data = tmp_path / "numbers.jsonl"
    answers = [1e-05, 1e+20, 2.5e-07, -3, "#### 72", "1e-05"]
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    parsed = [p.answer for p in g.load_jsonl_problems(str(data))]
    assert parsed[:5] == [1e-05, 1e+20, 2.5e-07, -3.0, 72.0]
    assert parsed[5] == 1e-05  # a string that is one number is read whole (its last number would be 5)


def test_correctness_reward_docstring_example():
    assert g.correctness_reward(["5 + 2 = 7", "It is 8.", "seven"], [7, 7, 7]) == [1.0, 0.0, 0.0]


def test_token_budget_micro_batches_example():
    assert g.token_budget_micro_batches([10, 10, 30, 5], 40) == [[0, 1], [2], [3]]
    assert g.token_budget_micro_batches([50], 10) == [[0]]
    assert g.token_budget_micro_batches([], 10) == []


def test_arithmetic_split_is_seeded_and_disjoint():
    train, held_out = g.make_arithmetic_split(0, 300, 40)
    again, _ = g.make_arithmetic_split(0, 300, 40)
    assert [p.prompt for p in train] == [p.prompt for p in again]
    assert len(held_out) == 40 and not {p.prompt for p in held_out} & {p.prompt for p in train}
    assert all(float(p.answer).is_integer() and p.answer > 0 for p in train)


def test_distinct_problems_stops_with_the_flag_named_when_a_task_runs_out():
    import random

    def two_prompts(rng):
        return g.Problem(prompt=rng.choice(["a", "b"]), answer=1.0)
    assert sorted(p.prompt for p in g.distinct_problems(two_prompts, 2, random.Random(0))) == ["a", "b"]
    with pytest.raises(g.ConfigError, match=r"^--num_problems 3: the task gave only 2 distinct prompts"):
        g.distinct_problems(two_prompts, 3, random.Random(0), flag="--num_problems")


# ---------------------------------------------------------------------------------------------- the loss, by hand
# Two completions of 3 token slots; the second has 2 real tokens. Ratios are chosen to hit both clip sides:
#   row 0, A = +1.0: rho = [1.5, 1.0, 0.9]            -> token 0 clipped high (1.2)
#   row 1, A = -0.5: rho = [0.7, 1.1, (masked 2.0)]   -> token 0 clipped low (0.8)
# per-token losses: row 0 [-1.2, -1.0, -0.9] (sum -3.1), row 1 [0.4, 0.55] (sum 0.95)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -0.5], dtype=torch.float64)
RATIOS = torch.tensor([[1.5, 1.0, 0.9], [0.7, 1.1, 2.0]], dtype=torch.float64)
OLD = torch.log(torch.tensor([[0.3, 0.5, 0.6], [0.4, 0.2, 0.1]], dtype=torch.float64))
LOGP = OLD + torch.log(RATIOS)


def _loss(loss_type, **kwargs):
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = g.policy_loss(logp, OLD, kwargs.pop("ref", None), ADV, MASK, loss_type=loss_type,
                                max_completion_length=4, **kwargs)
    loss.backward()
    return loss.item(), logp.grad, stats


def test_policy_loss_hand_computed_values():
    assert _loss("grpo")[0] == pytest.approx((-3.1 / 3 + 0.95 / 2) / 2)  # -0.2791667
    assert _loss("bnpo")[0] == pytest.approx(-2.15 / 5)  # -0.43
    assert _loss("dr_grpo")[0] == pytest.approx(-2.15 / (2 * 4))  # -0.26875
    assert _loss("dapo")[0] == pytest.approx(-2.15 / 5)  # num_items None -> mask.sum()
    assert _loss("dapo", num_items=10)[0] == pytest.approx(-2.15 / 10)
    assert _loss("bnpo", epsilon_high=0.28)[0] == pytest.approx((-3.18 + 0.95) / 5)  # clip-higher: 1.28


def test_policy_loss_hand_computed_gradient_and_stats():
    _, grad, stats = _loss("bnpo")
    # d l / d logp = -A * rho where the unclipped branch is active, 0 where the clip holds it constant.
    expected = torch.tensor([[0.0, -1.0, -0.9], [0.0, 0.55, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(grad, expected)
    assert stats["clip_low"] == pytest.approx(0.2) and stats["clip_high"] == pytest.approx(0.2)
    assert stats["clip_frac"] == pytest.approx(0.4) and stats["ratio"] == pytest.approx(5.2 / 5)
    assert stats["kl"] is None


def test_policy_loss_gspo_sequence_ratio():
    s0, s1 = 1.35 ** (1 / 3), math.sqrt(0.77)  # exp of the masked mean log-ratio of each row
    loss = _loss("grpo", importance_sampling_level="sequence")[0]
    assert loss == pytest.approx((-s0 * 1.0 + s1 * 0.5) / 2)  # -0.333231
    # A tiny clip range (the GSPO paper's 3e-4 / 4e-4) clips both sequences.
    loss, grad, stats = _loss("grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)
    assert loss == pytest.approx((-(1 + 4e-4) + (1 - 3e-4) * 0.5) / 2)
    assert torch.count_nonzero(grad) == 0 and stats["clip_frac"] == pytest.approx(1.0)


def test_policy_loss_worked_example_from_docstring():
    logp = torch.log(torch.tensor([[1.5, 1.0]]))
    loss, _ = g.policy_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2), loss_type="grpo")
    assert loss.item() == pytest.approx(-1.1)


def test_ratio_is_one_without_old_logps():
    loss, stats = g.policy_loss(LOGP, None, None, ADV, MASK, loss_type="bnpo")
    assert stats["ratio"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-(3 * 1.0 + 2 * -0.5) / 5)  # -mean over tokens of A


def test_policy_loss_with_kl_by_hand():
    ref = LOGP.detach() + math.log(0.5)  # ref - logp = ln 0.5 at every token -> k3 = 0.5 + ln 2 - 1
    k3 = 0.5 + math.log(2) - 1
    loss, _, stats = _loss("bnpo", beta=0.04, ref=ref)
    assert loss == pytest.approx((-2.15 + 0.04 * k3 * 5) / 5)
    assert stats["kl"] == pytest.approx(k3)


# A plain-Python, loop-by-loop transcription of TRL GRPOTrainer._compute_loss, and finite differences for its
# gradient: an independent check of the vectorised code for every combination the issue names.
def trl_reference(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, level, max_len):
    N, T = len(logp), len(logp[0])
    per_tok = [[0.0] * T for _ in range(N)]
    for i in range(N):
        n_i = max(sum(mask[i]), 1.0)
        seq_w = sum((logp[i][t] - old[i][t]) * mask[i][t] for t in range(T)) / n_i
        for t in range(T):
            w = logp[i][t] - old[i][t] if level == "token" else seq_w
            rho = math.exp(w)
            loss = -min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                loss += beta * (math.exp(d) - d - 1)
            per_tok[i][t] = loss * mask[i][t]
    total_tokens = max(sum(map(sum, mask)), 1.0)
    if loss_type == "grpo":
        return sum(sum(per_tok[i]) / max(sum(mask[i]), 1.0) for i in range(N)) / N
    if loss_type == "dr_grpo":
        return sum(map(sum, per_tok)) / (N * max_len)
    return sum(map(sum, per_tok)) / total_tokens  # bnpo, and dapo with num_items = tokens of this batch


@pytest.mark.parametrize("loss_type, level, beta, eps_high", list(itertools.product(
    ("grpo", "bnpo", "dr_grpo", "dapo"), g.IMPORTANCE_LEVELS, [0.0, 0.04], [None, 0.28])))
def test_policy_loss_matches_trl_transcription(loss_type, level, beta, eps_high):
    torch.manual_seed(1)
    N, T = 3, 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    old = -torch.rand(N, T, dtype=torch.float64) - 0.5
    logp = (old + 0.5 * torch.randn(N, T, dtype=torch.float64)).requires_grad_(True)
    ref = old - 0.3 * torch.rand(N, T, dtype=torch.float64)
    adv = torch.tensor([0.9, -1.3, 0.4], dtype=torch.float64)
    loss, _ = g.policy_loss(logp, old, ref if beta else None, adv, mask, loss_type=loss_type, epsilon=0.2,
                            epsilon_high=eps_high, beta=beta, importance_sampling_level=level,
                            max_completion_length=6)
    loss.backward()
    args = (old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), loss_type, 0.2,
            0.2 if eps_high is None else eps_high, beta, level, 6)
    expected = trl_reference(logp.detach().tolist(), *args)
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    h = 1e-6
    for i, t in itertools.product(range(N), range(T)):
        up, down = logp.detach().clone(), logp.detach().clone()
        up[i, t] += h
        down[i, t] -= h
        numeric = (trl_reference(up.tolist(), *args) - trl_reference(down.tolist(), *args)) / (2 * h)
        assert logp.grad[i, t].item() == pytest.approx(numeric, abs=1e-6), (i, t)


def test_leave_one_out_baseline_docstring_example():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    none = g.group_advantages(rewards, 2, "none", baseline="leave_one_out")
    assert none.tolist() == [1.0, -1.0, 0.0, 0.0]
    group = g.group_advantages(rewards, 2, "group", baseline="leave_one_out")
    assert torch.allclose(group, torch.tensor([1.4140, -1.4140, 0.0, 0.0]), atol=1e-4)
    # G = 4: r_i - mean of the other three, by hand
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    by_hand = torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert torch.allclose(g.group_advantages(rewards, 4, "none", baseline="leave_one_out"), by_hand)
    with pytest.raises(g.ConfigError, match="--baseline "):
        g.Config(baseline="median").validate()


def test_signed_reward_docstring_example_and_invariance():
    assert g.signed_correctness_reward(["5 + 2 = 7", "It is 8.", "seven"], [7, 7, 7]) == [1.0, -1.0, -1.0]
    binary = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(g.group_advantages(binary, 4), g.group_advantages(2 * binary - 1, 4), atol=1e-3)


def test_multistep_problem_docstring_example_and_split():
    import random

    p = g.make_multistep_problem(random.Random(0))  # the docstring's example
    assert p.prompt == ("Grace has 5 cookies. Then Grace gives away 4 cookies. Then Grace finds 6 more cookies. "
                        "How many cookies does Grace have now? Work it out step by step.") and p.answer == 7.0
    train, held_out = g.make_arithmetic_split(0, 50, 10, g.make_multistep_problem)
    assert len(train) == 50 and len(held_out) == 10
    assert not {q.prompt for q in held_out} & {q.prompt for q in train}


def test_learning_rate_factor_docstring_example():
    from grpo_mini import learning_rate_factor
    constant = [learning_rate_factor(s, 2, 6, "constant") for s in range(6)]
    linear = [learning_rate_factor(s, 2, 6, "linear") for s in range(6)]
    assert constant == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert linear == pytest.approx([1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25])

