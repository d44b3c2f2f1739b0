"""Experiment: gradients and AdamW state allocated once, right after the optimiser is built; zero_grad in place.
Then runs benchmarks/memory.py's main with the remaining argv."""
import sys, torch
sys.path.insert(0, "/work/main")
RealAdamW = torch.optim.AdamW
class PreallocatedAdamW(RealAdamW):
    def __init__(self, params, *a, **k):
        super().__init__(params, *a, **k)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
                self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=False)
torch.optim.AdamW = PreallocatedAdamW
sys.argv = ["benchmarks/memory.py"] + sys.argv[1:]
import runpy
runpy.run_path("/work/main/benchmarks/memory.py", run_name="__main__")
