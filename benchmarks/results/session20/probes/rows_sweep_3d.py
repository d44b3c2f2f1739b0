"""bf16 F.linear on [A, 1, K] inputs (as the decode step calls it) for every A in 1..64: which A give a row other bits
than the same row among 64? Three random draws per shape."""
import torch
import torch.nn.functional as F
for seed in range(3):
    torch.manual_seed(seed)
    for fin, fout in ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)):
        w = torch.randn(fout, fin, dtype=torch.bfloat16); x = torch.randn(64, 1, fin, dtype=torch.bfloat16)
        full = F.linear(x, w)
        bad = [A for A in range(1, 64) if not torch.equal(F.linear(x[:A], w), full[:A])]
        print(f"draw {seed} linear [A,1,{fin}] -> {fout}: A differing: {bad}")
