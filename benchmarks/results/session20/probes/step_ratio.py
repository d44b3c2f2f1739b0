"""Per-step seconds of two runs that logged the same values (the same rollouts): median ratio, sums, training s."""
import json, statistics, sys
T = {"step_s", "tokens_per_s"}
def load(p): return [json.loads(l) for l in open(p)]
new = load(sys.argv[1])
for other in sys.argv[2:]:
    old = load(other)
    pairs = [(n["step_s"], o["step_s"]) for n, o in zip(new, old) if "step_s" in n and "step_s" in o
             and {k: v for k, v in n.items() if k not in T | {"is_ratio_mean", "sampler_kl"}}
             == {k: v for k, v in o.items() if k not in T | {"is_ratio_mean", "sampler_kl"}}]
    ratios = sorted(a / b for a, b in pairs)
    print(f"{sys.argv[1].split('/')[-2]} / {other.split('/')[-2]}: {len(pairs)} steps with the same values; "
          f"median step ratio {statistics.median(ratios):.3f} (quartiles {ratios[len(ratios)//4]:.3f}-{ratios[3*len(ratios)//4]:.3f}); "
          f"step seconds {sum(a for a, _ in pairs):.0f} against {sum(b for _, b in pairs):.0f}; "
          f"faster in {sum(r < 1 for r in ratios)} of {len(ratios)}")
