"""benchmarks/saved_tensors.py: what one micro-batch's forward keeps for its backward, by the operation that keeps it.

    python benchmarks/saved_tensors.py                                  # SmolLM2, the Quickstart's micro-batch
    python benchmarks/saved_tensors.py --prompts 8 --json out.json --model DIR

It forwards one micro-batch the way training does (engine.shared_prompt_logps under bf16 autocast, eager attention
on a CPU): `--prompts` distinct prompts of `--prompt_tokens` random tokens, each continued by `--generations`
completions of `--completion_tokens` columns, whose rows end at random lengths as sampled rows do. Then it walks the
autograd graph from the log-probs and adds up the tensors each node keeps for the backward (its `_saved_*`
attributes), counting each storage once, for the first node that reaches it, and leaving out the weights (but not
autocast's bf16 copies of them, which the backward keeps too). The table says where the activations go: the inputs
each matmul keeps and those weight copies (MmBackward0), the fp32 RMSNorm tensors (MulBackward0 float32), the
attention's keys, values and probabilities (BmmBackward0, SoftmaxBackward0), the MLP's (SiluBackward0, MulBackward0
bfloat16). docs/PERFORMANCE.md reads it. Only the plain forward is walked: reading what a checkpointed layer saved
would run its forward again.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402
from benchmarks.cli import at_least, run_main  # noqa: E402
from scaling import say  # noqa: E402


def saved_by_node(output: torch.Tensor, leave_out=()) -> dict:
    """{(node name, dtype): bytes} of the tensors that output's autograd graph keeps for the backward. A storage is
    counted once, for the first node (depth first from output) that keeps it; storages of `leave_out` (the
    weights) are not counted.
        x = torch.randn(4, 8, requires_grad=True); y = x.exp()   # ExpBackward0 keeps its result y: 4 x 8 x 4 bytes
        saved_by_node(y.sum()) == {("ExpBackward0", "float32"): 128}
        saved_by_node((y * y).sum()) == {("MulBackward0", "float32"): 128}   # y once, though three nodes keep it"""
    seen = {t.untyped_storage().data_ptr() for t in leave_out}
    totals, stack, visited = collections.Counter(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in sorted(n for n in dir(node) if n.startswith("_saved_")):
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed already, or a saved value of a type Python cannot see
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
                    continue
                storage = tensor.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                totals[(type(node).__name__, str(tensor.dtype).removeprefix("torch."))] += storage.nbytes()
        stack.extend(reversed([parent for parent, _ in node.next_functions]))
    return dict(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=engine.DEFAULT_MODEL, help="a transformers model (name or folder)")
    parser.add_argument("--prompts", type=at_least(1), default=4, help="distinct prompts in the micro-batch")
    parser.add_argument("--generations", type=at_least(1), default=8, help="completions per prompt")
    parser.add_argument("--prompt_tokens", type=at_least(1), default=60)
    parser.add_argument("--completion_tokens", type=at_least(2), default=48, help="columns; rows end at random")
    parser.add_argument("--json", type=Path, help="also write the table to this JSON file")
    args = parser.parse_args()
    model, _ = engine.load_model_and_tokenizer(args.model)
    device = torch.device("cpu")
    dtype = engine.pick_dtype("auto", device)
    engine.use_training_attention(model, "auto", device, dtype)
    generator = torch.Generator().manual_seed(0)
    U, G, P, T = args.prompts, args.generations, args.prompt_tokens, args.completion_tokens
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(vocab, (U, P), generator=generator)  # [U, P]
    completion_ids = torch.randint(vocab, (U * G, T), generator=generator)  # [n, T]
    ends = torch.randint(T // 4 + 1, T + 1, (U * G,), generator=generator)  # each row's length, as sampled rows end
    mask = (torch.arange(T)[None] < ends[:, None]).long()  # [n, T]
    with engine.autocast(device, dtype):
        logps = engine.shared_prompt_logps(model, prompt_ids, torch.ones_like(prompt_ids), completion_ids, mask, 1.0,
                                           prompt_index=torch.arange(U).repeat_interleave(G))  # [n, T]
    table = saved_by_node(logps, leave_out=list(model.parameters()))
    total, tokens = sum(table.values()), U * P + U * G * (T - 1)  # each prompt once, every row's columns but the last
    layers = len(engine.decoder_layers(model))
    say(f"{Path(sys.argv[0]).name}: {args.model}, {U} prompts x {G} completions, {P} prompt tokens, up to {T} "
        f"completion tokens ({tokens} forwarded tokens, padding included; {dtype} autocast)\n")
    say("| kept by | dtype | MiB | share |\n|---|---|---|---|")
    for (node, kind), size in sorted(table.items(), key=lambda item: -item[1]):
        say(f"| {node} | {kind} | {size / 2**20:.1f} | {size / max(total, 1):.0%} |")
    say(f"\nkept for the backward: {total / 2**20:.0f} MiB, {total / max(tokens * layers, 1) / 1024:.1f} KiB per "
        f"forwarded token per decoder layer ({layers} layers)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "forwarded_tokens": tokens, "layers": layers,
                                         "dtype": str(dtype).removeprefix("torch."),
                                         "attention": model.config._attn_implementation,
                                         "total_bytes": total, "by_node": [
                                             {"node": node, "dtype": kind, "bytes": size}
                                             for (node, kind), size in table.items()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
