"""Which op gives a lone row other bits than the same row in a batch of 2+? 3-D F.linear, sdpa with [A,1,1,L] mask."""
import torch
import torch.nn.functional as F
torch.manual_seed(0)
for fin, fout in ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)):
    w = torch.randn(fout, fin, dtype=torch.bfloat16); x = torch.randn(4, 1, fin, dtype=torch.bfloat16)
    full = F.linear(x, w)
    print(f"linear 3-D {fin}->{fout}:", [A for A in (1, 2, 3) if not torch.equal(F.linear(x[:A], w), full[:A])])
q = torch.randn(4, 3, 3, 64, dtype=torch.bfloat16); k = torch.randn(4, 3, 115, 64, dtype=torch.bfloat16)
v = torch.randn(4, 3, 115, 64, dtype=torch.bfloat16); m = torch.rand(4, 1, 1, 115) > 0.3
full = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.125)
print("sdpa [A,1,1,L] mask:", [A for A in (1, 2, 3) if not torch.equal(F.scaled_dot_product_attention(q[:A], k[:A], v[:A], attn_mask=m[:A], scale=0.125), full[:A])])
h = torch.randn(4, 1, 576)
full = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
print("rmsnorm:", [A for A in (1, 2, 3) if not torch.equal(h[:A] * torch.rsqrt(h[:A].pow(2).mean(-1, keepdim=True) + 1e-5), full[:A])])
w = torch.randn(576, 1536, dtype=torch.bfloat16); x = torch.randn(64, 1, 1536, dtype=torch.bfloat16)
full = F.linear(x, w)
print("linear 3-D 1536->576, A in 1..64 differing:", [A for A in range(1, 65) if not torch.equal(F.linear(x[:A], w), full[:A])])
x2 = torch.randn(64, 1536, dtype=torch.bfloat16); full2 = F.linear(x2, w)
print("linear 2-D 1536->576, A in 1..64 differing:", [A for A in range(1, 65) if not torch.equal(F.linear(x2[:A], w), full2[:A])])
print("3-D lone row vs 2-D lone row equal:", torch.equal(F.linear(x[:1], w)[:, 0], F.linear(x[0], w)))
