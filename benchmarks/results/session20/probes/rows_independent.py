"""Does a bf16 F.linear give each row the same bits whatever the other rows (M = 64 against subsets)?"""
import torch
import torch.nn.functional as F
torch.manual_seed(0)
bad = 0
for fin, fout in ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)):
    w = torch.randn(fout, fin, dtype=torch.bfloat16)
    x = torch.randn(64, fin, dtype=torch.bfloat16)
    full = F.linear(x, w)
    for M in (63, 48, 40, 33, 32, 17, 16, 9, 8, 5, 3, 1):
        keep = torch.randperm(64)[:M].sort().values
        sub = F.linear(x[keep], w)
        eq = torch.equal(sub, full[keep])
        bad += not eq
        if not eq:
            print(f"{fin}->{fout} M={M}: differs, max {(sub.float()-full[keep].float()).abs().max().item():.3g}")
print("shapes x subsets differing:", bad)
