"""Run by test_scaling.py under `torchrun --nproc_per_node 2` (gloo, CPU): the gradient of one global batch, split
across the ranks as a torchrun step splits it, against the single-process gradient of the same batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py LOSS_TYPE OUT_FILE"""

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import grpo_mini as g  # noqa: E402
from conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402

loss_type, out_file = sys.argv[1], sys.argv[2]
cfg = g.Config(prompts_per_step=4, num_generations=3, max_completion_length=8, device="cpu", dtype="fp32",
               loss_type=loss_type, max_tokens_per_micro_batch=40)
rank, world = g.init_distributed(cfg)
cpu = torch.device("cpu")
tokenizer = build_tiny_tokenizer()
model = build_tiny_model(tokenizer)  # the same weights on every rank (seeded)
torch.manual_seed(0)  # the same global batch on every rank
problems = g.make_arithmetic_split(0, 4, 1)[0]
full = g.rollout(model, tokenizer, problems, cfg, cpu)
full.rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.2, 0.9, 0.1, 0.0, 0.3, 1.0])  # group 1: no spread
advantages = g.group_advantages(full.rewards, cfg.num_generations)


def gradients():
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# one process, the whole batch
model.zero_grad(set_to_none=True)
g.accumulate_gradients(model, full, advantages, g.rows_to_train(advantages, cfg), None, None, cfg, cpu)
single = gradients()

# this rank's share, as grpo_step trains it under torchrun: prompts rank, rank + world, ...
model.zero_grad(set_to_none=True)
groups = list(range(4))[rank::world]
share = g.select_groups(full, groups)
share_advantages = advantages.view(4, -1)[groups].reshape(-1)
rows = g.rows_to_train(share_advantages, cfg)
n_rows, n_tokens, _ = g.all_reduce_sum([share.completion_ids.size(0), share.completion_mask.sum().item(), 1], cpu)
stats = g.accumulate_gradients(model, share, share_advantages, rows, None, None, cfg, cpu, counts=(n_rows, n_tokens))
g.sum_gradients_over_ranks(model, stats, cpu)
summed = gradients()
if rank == 0:
    torch.save({"single": single, "summed": summed}, out_file)
torch.distributed.destroy_process_group()
