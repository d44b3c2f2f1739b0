"""Run by test_scaling.py under `torchrun --nproc_per_node 2` (gloo, CPU): a real training run, grpo_mini.main with
the given flags, then the names of the threads still alive in this process.

    python -m torch.distributed.run --nproc_per_node 2 tests/threads_after_run.py --model DIR ...

train() ends with destroy_process_group(), which must free the gloo group and stop its threads (gloo_tcp_loop,
pt_gloo_runloop): one still alive while Python shuts down can abort the process (the pitfall in init_distributed)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo_mini as g  # noqa: E402

exit_code = g.main(argv=sys.argv[1:])
threads = sorted(Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task"))
print(f"rank {os.environ['RANK']} threads after the run: {' '.join(threads)}", flush=True)
sys.exit(exit_code)
