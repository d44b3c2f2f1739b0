"""bf16 F.linear at SmolLM2's decode shapes (M rows): GFLOP/s, and whether a oneDNN-prepacked weight helps."""
import time, torch
import torch.nn.functional as F
torch.manual_seed(0)
shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
def rate(M, fin, fout, fn, n):
    x = torch.randn(M, fin, dtype=torch.bfloat16); w = torch.randn(fout, fin, dtype=torch.bfloat16)
    for _ in range(5): fn(x, w)
    s = time.perf_counter()
    for _ in range(n): fn(x, w)
    dt = (time.perf_counter() - s) / n
    return dt, 2 * M * fin * fout / dt / 1e9
for M in (64, 2048):
    for fin, fout in shapes:
        n = 200 if M == 64 else 10
        if fout == 49152: n //= 10
        dt, gf = rate(M, fin, fout, lambda x, w: F.linear(x, w), max(n, 3))
        print(f"M={M:5d} {fin:5d}->{fout:5d}: {dt*1e6:9.1f} us  {gf:7.1f} GFLOP/s")
