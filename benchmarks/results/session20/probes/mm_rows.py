"""Time of one decode step's matmuls (30 layers of SmolLM2's projections + the vocabulary) against the rows M."""
import time, torch
import torch.nn.functional as F
layer = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
ws = [torch.randn(o, i, dtype=torch.bfloat16) for i, o in layer]
head = torch.randn(49152, 576, dtype=torch.bfloat16)
for M in (64, 56, 48, 40, 32, 24, 16, 8):
    xs = {i: torch.randn(M, i, dtype=torch.bfloat16) for i in (576, 1536)}
    def step():
        for _ in range(30):
            for w in ws: F.linear(xs[w.shape[1]], w)
        F.linear(xs[576], head)
    for _ in range(3): step()
    s = time.perf_counter()
    for _ in range(10): step()
    print(f"M={M:3d}: {1e3*(time.perf_counter()-s)/10:7.1f} ms per decode step's matmuls")
