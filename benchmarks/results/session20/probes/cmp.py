"""Compare two metrics.jsonl files value for value, seconds aside: records equal, first differing record."""
import json, sys
TIME = {"step_s", "tokens_per_s"}
def load(p):
    return [{k: v for k, v in json.loads(l).items() if k not in TIME} for l in open(p)]
a = load(sys.argv[1])
for other in sys.argv[2:]:
    b = load(other)
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    print(f"{other}: {len(a)} vs {len(b)} records, {same} equal, first differing: {first}"
          + ("" if first is None else f" (step {a[first].get('step')})"))
