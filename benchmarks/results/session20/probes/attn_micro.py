"""Decode attention at the Quickstart's shapes: 64 rows, 9 query heads, 3 kv heads, head 64, kv length 108, bf16."""
import time, torch
import torch.nn.functional as F
torch.manual_seed(0)
N, H, KVH, D, L = 64, 9, 3, 64, 108
q = torch.randn(N, H, 1, D, dtype=torch.bfloat16)
k = torch.randn(N, KVH, L, D, dtype=torch.bfloat16); v = torch.randn(N, KVH, L, D, dtype=torch.bfloat16)
valid = torch.rand(N, L) > 0.2
bmask = valid[:, None, None, :]
fmask = torch.zeros(N, 1, 1, L, dtype=torch.bfloat16).masked_fill(~bmask, float("-inf"))
def rep(x): return x[:, :, None].expand(N, KVH, H // KVH, L, D).reshape(N, H, L, D)
def t(name, fn, n=300):
    for _ in range(20): fn()
    s = time.perf_counter()
    for _ in range(n): out = fn()
    print(f"{name:40s} {1e6*(time.perf_counter()-s)/n:8.1f} us"); return out
a = t("sdpa bool mask, repeat_kv", lambda: F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=bmask, scale=D**-0.5))
b = t("sdpa bool mask, enable_gqa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bmask, scale=D**-0.5, enable_gqa=True))
c = t("sdpa float mask, repeat_kv", lambda: F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=fmask, scale=D**-0.5))
def eager():
    w = torch.matmul(q, rep(k).transpose(2, 3)) * D**-0.5 + fmask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, rep(v))
e = t("eager (transformers' form)", eager)
def grouped():  # the 3 query heads of a kv head as 3 query rows: no repeat
    qg = q.view(N, KVH, H // KVH, D)
    w = torch.matmul(qg, k.transpose(2, 3)) * D**-0.5 + fmask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).view(N, H, 1, D)
gq = t("eager, grouped query heads", grouped)
for name, x in (("enable_gqa", b), ("float mask", c), ("eager", e), ("grouped", gq)):
    print(name, "max |diff| vs sdpa bool:", (x.float() - a.float()).abs().max().item(), "equal:", torch.equal(x, a))
print("threads", torch.get_num_threads())
