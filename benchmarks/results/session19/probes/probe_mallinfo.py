"""Probe: glibc malloc_info (free-chunk size histogram of the main arena) after each step, N steps."""
import sys, ctypes, tempfile, re
from pathlib import Path
sys.path.insert(0, "/work/main")
import grpo_mini as gm
from benchmarks.cli import short_run_argv
libc = ctypes.CDLL("libc.so.6"); libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]; libc.fclose.argtypes = [ctypes.c_void_p]
steps = int(sys.argv[1]); tag = sys.argv[2]; flags = sys.argv[3:]
real_step = gm.grpo_step; n = {"k": 0}
def dump(name):
    fp = libc.fopen(f"/work/s19/mi_{tag}_{name}.xml".encode(), b"w"); libc.malloc_info(0, fp); libc.fclose(fp)
def step(*a, **k):
    n["k"] += 1
    out = real_step(*a, **k)
    dump(f"step{n['k']}")
    return out
gm.grpo_step = step
with tempfile.TemporaryDirectory() as out:
    gm.train(gm.parse_config(argv=short_run_argv(steps, Path(out) / "run", flags)))
