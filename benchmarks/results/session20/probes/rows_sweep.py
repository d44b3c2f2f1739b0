"""bf16 F.linear row independence for every M in 1..64 (SmolLM2's decode shapes), and sdpa's batch independence."""
import torch
import torch.nn.functional as F
torch.manual_seed(0)
for fin, fout in ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)):
    w = torch.randn(fout, fin, dtype=torch.bfloat16)
    x = torch.randn(64, fin, dtype=torch.bfloat16)
    full = F.linear(x, w)
    bad = [M for M in range(1, 64) if not torch.equal(F.linear(x[:M], w), full[:M])]
    print(f"linear {fin}->{fout}: M differing from 64 rows: {bad}")
q = torch.randn(64, 3, 3, 64, dtype=torch.bfloat16); k = torch.randn(64, 3, 115, 64, dtype=torch.bfloat16)
v = torch.randn(64, 3, 115, 64, dtype=torch.bfloat16); m = torch.rand(64, 1, 1, 115) > 0.3
full = F.scaled_dot_product_attention(q, k, v, attn_mask=m.expand(64, 1, 3, 115), scale=0.125)
bad = [M for M in range(1, 64) if not torch.equal(F.scaled_dot_product_attention(q[:M], k[:M], v[:M], attn_mask=m[:M].expand(M, 1, 3, 115), scale=0.125), full[:M])]
print("sdpa (packed grouped queries), M differing:", bad)
