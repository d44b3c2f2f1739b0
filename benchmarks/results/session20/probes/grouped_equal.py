"""Is attention with the query heads grouped under their kv head (no repeat_kv) bit-identical to transformers' eager
form, forward and backward, in bf16 on this CPU? Decode (q=1) and training (q=47) shapes; and times."""
import time, torch
torch.manual_seed(0)
def rep(x, n):
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)
def eager(q, k, v, mask, scale):
    n = q.shape[1] // k.shape[1]
    w = torch.matmul(q, rep(k, n).transpose(2, 3)) * scale
    w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, rep(v, n))
def grouped(q, k, v, mask, scale):
    b, h, s, d = q.shape; kvh = k.shape[1]; n = h // kvh
    qg = q.reshape(b, kvh, n * s, d)
    m = mask if mask.shape[2] == 1 else mask[:, :, None].expand(b, mask.shape[1], n, s, mask.shape[-1]).reshape(b, mask.shape[1], n * s, -1)
    w = torch.matmul(qg, k.transpose(2, 3)) * scale
    w = w + m
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).reshape(b, h, s, d)
for name, N, S, L in (("decode", 64, 1, 115), ("train", 32, 47, 107)):
    q = torch.randn(N, 9, S, 64, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(N, 3, L, 64, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(N, 3, L, 64, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.zeros(N, 1, S, L, dtype=torch.bfloat16).masked_fill(torch.rand(N, 1, S, L) < 0.2, torch.finfo(torch.bfloat16).min)
    outs = {}
    for fn in (eager, grouped):
        for t_ in (q, k, v): t_.grad = None
        o = fn(q, k, v, mask, 0.125); g = torch.randn_like(o, generator=torch.Generator().manual_seed(1)); o.backward(g)
        outs[fn.__name__] = (o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
        reps = 200 if S == 1 else 10
        s = time.perf_counter()
        for _ in range(reps):
            with torch.no_grad(): fn(q, k, v, mask, 0.125)
        fw = (time.perf_counter() - s) / reps
        print(f"{name} {fn.__name__:8s} forward {fw*1e6:8.1f} us")
    for i, part in enumerate(("out", "dq", "dk", "dv")):
        a, b = outs["eager"][i], outs["grouped"][i]
        print(f"  {part}: equal {torch.equal(a, b)}  max|diff| {(a.float()-b.float()).abs().max().item():.3g}")
