"""Decode attention through sdpa with the query heads grouped under their kv head as query rows: bit-identical to
transformers' sdpa call (repeat_kv, bool mask), and faster?"""
import time, torch
import torch.nn.functional as F
torch.manual_seed(0)
def rep(x, n):
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)
for N, L in ((64, 115), (64, 60), (8, 115), (64, 300)):
    q = torch.randn(N, 9, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(N, 3, L, 64, dtype=torch.bfloat16); v = torch.randn(N, 3, L, 64, dtype=torch.bfloat16)
    mask = (torch.rand(N, 1, 1, L) > 0.2)
    ref = lambda: F.scaled_dot_product_attention(q, rep(k, 3), rep(v, 3), attn_mask=mask, scale=0.125)
    grp = lambda: F.scaled_dot_product_attention(q.view(N, 3, 3, 64), k, v, attn_mask=mask.expand(N, 1, 3, L), scale=0.125).view(N, 9, 1, 64)
    res = {}
    for name, fn in (("ref", ref), ("grouped", grp), ("ref", ref), ("grouped", grp)):
        for _ in range(10): fn()
        s = time.perf_counter()
        for _ in range(200): o = fn()
        res[name] = o
        print(f"N={N} L={L} {name:8s} {1e6*(time.perf_counter()-s)/200:8.1f} us")
    print("  equal:", torch.equal(res["ref"], res["grouped"]), (res["ref"].float()-res["grouped"].float()).abs().max().item())
