"""The sampling's row reductions (logsumexp, exp, cumsum, argmax) over a [A, 49152] fp32 tensor: does a row get the
same bits whatever A? (A reduction over one row may be split across threads when it is the only row.)"""
import torch
torch.manual_seed(0)
x = torch.randn(64, 49152) * 3
full_lz = torch.logsumexp(x, dim=-1)
full_cdf = torch.exp(x - full_lz[:, None]).cumsum(-1)
for A in range(1, 65):
    lz = torch.logsumexp(x[:A], dim=-1)
    cdf = torch.exp(x[:A] - lz[:, None]).cumsum(-1)
    if not torch.equal(lz, full_lz[:A]) or not torch.equal(cdf, full_cdf[:A]):
        print(f"A={A}: logsumexp equal {torch.equal(lz, full_lz[:A])}, cdf equal {torch.equal(cdf, full_cdf[:A])}, "
              f"max |d log_z| {(lz - full_lz[:A]).abs().max().item():.3g}")
print("threads", torch.get_num_threads(), "done")
