"""harness.py: running grpo_mini.py for real. None of it changes what a GRPO step computes.

    RunConfig     the run's flags (where, on what device and dtype, what is saved, LoRA), which grpo_mini.Config extends
    Run           what train() wraps its loop in: the output directory's checks and lock, --resume, signals, a
                  checkpoint and model/ saved on every exit, metrics.jsonl, rank 0 only under torchrun (scaling.py)
    checkpoints   written whole or not at all, and resumed exactly
(flags.py builds the command line from the config dataclasses' field docstrings.)
Bad input raises ConfigError, which the CLI prints as one line before any model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import engine
import scaling
from flags import NothingToDo
from scaling import ConfigError, say

DTYPES, ATTENTIONS, ENGINES, REPORT_TO = ("auto", "fp32", "bf16"), ("auto", "eager", "sdpa"), ("fast", "plain"), (
    "none", "tensorboard", "wandb")


# ======================================================================================================================
# 1. The run's flags
# ======================================================================================================================


@dataclass
class RunConfig:
    """the run (harness.py): where, on what, and what is kept"""
    support_flags = True  # not a field: flags.build_parser lists this group last
    output_dir: str = "runs/grpo"
    """where metrics.jsonl, config.json and the trained model go"""
    seed: int = 0
    """seed for the task split, sampling and initialisation"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda[:N]"""
    dtype: str = "auto"
    """compute precision: auto = bf16 on CUDA and on CPUs with AMX or AVX512-BF16 (torch reports them), else fp32 | fp32
    | bf16. bf16 means autocast with fp32 master weights for training, and a bf16 copy of the weights for sampling"""
    engine: str = "fast"
    """fast: engine.py's static-cache sampler and shared-prompt log-probs | plain: model.generate and a full-sequence
    forward, the forms written out in grpo_mini.py. The same numbers up to floating-point rounding; plain draws tokens
    from a different random stream"""
    attn_implementation: str = "auto"
    """attention kernel of the training forward and backward: auto = eager on a CPU where --dtype picks bf16 (faster
    than sdpa there), else the model's own | eager | sdpa. Sampling from the bf16 copy keeps the model's own kernel,
    which decodes faster"""
    keep_freed_memory: bool = True
    """on a CPU under Linux, keep freed memory in the process for reuse instead of returning it to the OS (glibc
    mallopt), so that large tensors are not paged in again every step; memory use then stays near its peak. --no-
    keep_freed_memory: glibc's default"""
    max_tokens_per_micro_batch: int = 4096
    """memory bound: sequences are packed into forward/backward micro-batches of at most this many (padded) tokens"""
    full_determinism: bool = False
    """torch's deterministic kernels (torch.use_deterministic_algorithms). Without them the backward of the shared
    prompt's gather adds a prompt's G gradients from several CPU threads at once: runs at the default micro-batches
    repeated bit for bit here, but at 1024 tokens one could end in either of two ways. With them, the sums go in row
    order: the same weights every time, and other numbers than without (docs/PERFORMANCE.md)"""
    gradient_checkpointing: bool = False
    """memory for time: each decoder layer keeps only its inputs for the backward, which runs the layer again
    (engine.checkpointed_layers); the same numbers, a smaller peak, a slower backward (docs/PERFORMANCE.md)"""
    eval_batch_size: int = 64
    """prompts per greedy generate call during evaluation"""
    save_model: bool = True
    """save the trained model and tokenizer to OUTPUT_DIR/model at the end, and on any early exit (Ctrl-C, SIGTERM, an
    error)"""
    save_every: int = 10
    """write a resumable checkpoint (model, optimiser, scheduler, RNG and data-order state) to OUTPUT_DIR/checkpoint
    every N steps, at the end and on any early exit; 0: never"""
    resume: bool = False
    """continue the run in OUTPUT_DIR from its checkpoint (same flags; only max_steps, save_every, eval_every,
    eval_batch_size, save_model, device, attn_implementation, keep_freed_memory, engine and gradient_checkpointing may
    change); metrics.jsonl is appended to"""
    overwrite: bool = False
    """allow a new run to replace the run already in OUTPUT_DIR (its config.json, metrics.jsonl, model/, checkpoint/,
    tensorboard/ and wandb/; nothing else)"""
    report_to: str = "none"
    """also log the step and evaluation scalars to: none | tensorboard (OUTPUT_DIR/tensorboard; pip install tensorboard)
    | wandb (pip install wandb; offline into OUTPUT_DIR/wandb unless you are logged in). metrics.jsonl is always
    written"""
    lora_r: int = 0
    """LoRA rank; 0 (the default) trains every weight. > 0 trains low-rank adapters only (peft), and with --beta > 0 the
    reference model is the same model with its adapters switched off: no second copy"""
    lora_alpha: int = 32
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: all-linear (every linear layer but the output head), or names separated by commas,
    e.g. q_proj,v_proj"""

    def validate(self) -> None:
        """Raise ConfigError naming the flag for any invalid run flag (and any non-finite number of a subclass)."""
        for f in dataclasses.fields(self):  # inf and nan pass every comparison the wrong way: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number (got {value!r})")
        at_least = dict(max_tokens_per_micro_batch=1, eval_batch_size=1, save_every=0, lora_r=0)
        checks = [(getattr(self, flag) >= low, flag, f"must be >= {low}") for flag, low in at_least.items()]
        check_flags(self, checks + [
            (0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)"),
            (self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"),
            (self.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}"),
            (self.attn_implementation in ATTENTIONS, "attn_implementation", f"must be one of {', '.join(ATTENTIONS)}"),
            (not (self.resume and self.overwrite), "resume", "and --overwrite contradict each other: pick one"),
            (self.report_to in REPORT_TO, "report_to", f"must be one of {', '.join(REPORT_TO)}"),
            (self.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
        ])
        pick_device(self.device)  # raises ConfigError for an unknown or absent device
        if self.lora_r and importlib.util.find_spec("peft") is None:
            raise ConfigError("--lora_r needs the peft package: pip install peft")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ConfigError(f"--report_to {self.report_to} needs the {self.report_to} package: "
                              f"pip install {self.report_to}")


def set_seed(seed: int, full_determinism: bool = False) -> None:
    """Seed every global RNG a run draws from: Python's, NumPy's and torch's. full_determinism (--full_determinism,
    transformers' enable_full_determinism): torch's deterministic kernels too (docs/PERFORMANCE.md), process-wide."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if full_determinism:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it, before CUDA starts
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid; each torch.empty here is written


def check_flags(cfg, checks: list) -> None:
    """checks: (ok, flag, why) triples; the first that is not ok raises ConfigError naming the flag and its value."""
    for ok, flag, why in checks:
        if not ok:
            raise ConfigError(f"--{flag} {why} (got {getattr(cfg, flag)!r})")


def pick_device(name: str) -> torch.device:
    """The one place the device is chosen: 'auto' means CUDA when present, else CPU. Anything else that is not cpu
    or an available cuda[:N] raises ConfigError naming --device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N] (got {name!r})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


# ======================================================================================================================
# 2. The run: output directory, checkpoints, resume, safe exits, logging
# ======================================================================================================================
# What is saved, where and when:
#   OUTPUT_DIR/config.json, metrics.jsonl   at the start, and a line per step / evaluation as they happen.
#   OUTPUT_DIR/checkpoint/                  every --save_every steps, at the end and on any early exit: model/
#       (loadable with --model), trainer_state.pt (optimiser, scheduler, every RNG, the data order, the advantage
#       function's own state; torch.load(weights_only=True) reads it) and state.json (step, config, step-0 eval).
#   OUTPUT_DIR/model/                       the trained weights, at the end and on any early exit (--save_model).
# Every directory is written whole to NAME.tmp, then swapped in by two renames, so a kill at any instant leaves the
# old or the new one whole (between the renames the old one is NAME.old; find_saved looks there too). Ctrl-C and
# SIGTERM raise KeyboardInterrupt; during a save they are held back until it is done. A checkpoint holds the state
# at the end of a step: an interrupt before the step's optimiser update leaves the model there (the checkpoint is
# written); one in the milliseconds after it keeps the previous checkpoint (model/ gets the newest weights).

CHECKPOINT = "checkpoint"
MARKER, LOCK = ".grpo_mini_run", ".grpo_mini_lock"  # "a run of ours is here" (the script that wrote it); its writer
RUN_FILES = ("config.json", "metrics.jsonl", "model", CHECKPOINT, "tensorboard", "wandb")  # a directory's run
# Flags that --resume lets change: none of them alters what a step computes.
RESUMABLE_CHANGES = ("max_steps", "save_every", "eval_every", "eval_batch_size", "save_model", "device",
                     "attn_implementation", "keep_freed_memory", "engine", "gradient_checkpointing", "resume",
                     "overwrite", "output_dir")


def replace_dir(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills the sibling directory FINAL.tmp; then FINAL is replaced by it, atomically enough that a
    kill at any instant leaves a whole FINAL or a whole FINAL.old (see find_saved). A write that fails removes
    FINAL.tmp, leaves FINAL as it was, and raises one line naming it, whatever the library raised: a full disk is
    OSError from open(), RuntimeError from torch.save and SafetensorError from safetensors."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # debris of a write that was killed
    try:
        write(tmp)
    except Exception as err:  # noqa: BLE001 - whatever the library raised, the remedy is the same
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise ConfigError(f"could not write {final} ({reason[:200]}); the previous copy is untouched: free some "
                          f"space, then --resume") from None
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_saved(final: Path) -> Optional[Path]:
    """The whole copy of a directory written by replace_dir: FINAL, or FINAL.old if a kill fell between renames."""
    for candidate in (final, final.with_name(final.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def algorithm_of(cfg) -> str:
    """Which script and config wrote a run, e.g. "gfpo.py:GFPOConfig": --resume refuses another one."""
    module = sys.modules.get(type(cfg).__module__)
    return f"{Path(getattr(module, '__file__', None) or type(cfg).__module__).name}:{type(cfg).__name__}"


def read_json(path: Path, what: str):
    """json.loads of a run's file, or one line naming the file when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}: {path} is missing or damaged ({type(err).__name__}); restore it, or start again "
                          f"with --overwrite") from None


def check_output_dir(cfg) -> None:
    """One-line errors, before any model loads, for an --output_dir that cannot be written, another live run writing
    to it, a run that would be overwritten silently, an --overwrite of something that is not a grpo-mini run, or a
    --resume that has nothing to resume, another script's run, or other flags than the run it continues. Takes the
    directory's lock (one writer at a time; Run releases it)."""
    out = Path(cfg.output_dir)
    target = out.resolve()
    if cfg.overwrite and target in (Path(target.anchor), Path.home().resolve(), Path.cwd().resolve()):
        raise ConfigError(f"--overwrite: refusing to clear {out}, the root, home or working directory; give the run "
                          f"a directory of its own")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):  # a name that cannot be a user's file
            pass
    except OSError as err:
        raise ConfigError(f"--output_dir {out}: cannot write there ({err.strerror or type(err).__name__})") from None
    existing = [name for name in RUN_FILES if (out / name).exists()]
    ours = (out / MARKER).is_file()  # only our marker: a TRL run's config.json has our field names too
    if cfg.resume:
        saved = find_saved(out / CHECKPOINT)
        if saved is None:
            raise ConfigError(f"--resume: no checkpoint in {out} (the run had --save_every 0, or stopped before "
                              f"its first save)")
        state = read_json(saved / "state.json", "--resume")
        previous, algorithm = state.get("config", {}), state.get("algorithm", algorithm_of(cfg))
        if algorithm != algorithm_of(cfg) or not set(previous) <= set(dataclasses.asdict(cfg)):
            raise ConfigError(f"--resume: the run in {out} was written by {algorithm.split(':')[0]} "
                              f"({algorithm.split(':')[-1]}); resume it with that script")
        previous = with_defaults(previous, type(cfg))
        changed = [f"--{key} {previous[key]!r} -> {value!r}" for key, value in dataclasses.asdict(cfg).items()
                   if key not in RESUMABLE_CHANGES and differs(key, previous[key], value)]
        if changed:
            raise ConfigError(f"--resume: give the flags of the run being resumed; these differ: {', '.join(changed)}"
                              f" (only {', '.join(RESUMABLE_CHANGES[:-3])} may change)")
        for flag, print_then in state.get("data_fingerprints", {}).items():
            if print_then != data_fingerprint(getattr(cfg, flag, None)):
                raise ConfigError(f"--resume: --{flag} {getattr(cfg, flag)} has changed since the run began (its "
                                  f"contents differ): resume with the data as it was, or start again with --overwrite")
        if state.get("step", 0) >= cfg.max_steps:
            raise NothingToDo(f"the run in {out} is finished (checkpoint of step {state.get('step')}, --max_steps "
                              f"{cfg.max_steps}): nothing to resume; a larger --max_steps trains it further")
    elif existing and not ours:
        unmarked = " (a grpo-mini run written before 2026-12-04 has no marker: if it is one, `touch " \
            f"{out / MARKER}` marks it)" if is_our_config(out / "config.json") else ""
        raise ConfigError(f"--output_dir {out} holds files that no grpo-mini run wrote "
                          f"({', '.join(existing)}); nothing was changed: choose another --output_dir{unmarked}")
    elif existing and not cfg.overwrite:
        raise ConfigError(f"--output_dir {out} already holds a run ({', '.join(existing)}): pass --resume to "
                          f"continue it, or --overwrite to replace it")
    elif existing:  # --overwrite of a run of ours: never of the model it is about to train
        model = Path(getattr(cfg, "model", "")).resolve()
        for name in existing:
            if model == (out / name).resolve() or (out / name).resolve() in model.parents:
                raise ConfigError(f"--overwrite would remove {out / name}, which holds --model {cfg.model}: copy "
                                  f"the model elsewhere first, or choose another --output_dir")
    take_lock(out)  # last: a refused directory gets nothing of ours


PATH_FLAGS, DATA_FLAGS = ("model", "data", "eval_data"), ("data", "eval_data")


def with_defaults(stored: dict, config_class) -> dict:
    """A run's stored config with every flag added since it was written, at its default: what that run had."""
    return {**{f.name: f.default for f in dataclasses.fields(config_class) if f.name not in stored}, **stored}


def differs(key: str, old, new) -> bool:
    """Whether flag `key` changed between a run and its --resume: "./runs/m" and "runs/m" are the same --model."""
    if key in PATH_FLAGS and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(old) != os.path.realpath(new)
    return old != new


def data_fingerprint(source: Optional[str]) -> Optional[str]:
    """sha256 of a local --data / --eval_data file, or of every file under a directory (a save_to_disk dataset);
    None for a hub name or no data. --resume compares it with the checkpoint's: changed data is one line."""
    if not source or not Path(source).exists():
        return None
    root = Path(source)
    digest = hashlib.sha256()
    for file in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def is_our_config(path: Path) -> bool:
    """Whether PATH looks like the config.json of a grpo-mini run. Only a hint for the message: a TRL GRPOConfig
    dump has these keys too, so this never makes a directory ours."""
    try:
        return {"num_generations", "loss_type", "output_dir"} <= set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False


def take_lock(out: Path) -> None:
    """One writer per run directory: OUTPUT_DIR/.grpo_mini_lock holds the writer's pid and that process's start time.
    A lock whose process has died, or whose pid now belongs to a process started later (the pid was reused), is stale
    and taken over; our own pid's is ours (train() called twice in one process). A lock that cannot be written (a
    full disk) is removed again: one line, and no lock left behind."""
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder, age = lock.read_text().split(), time.time() - lock.stat().st_mtime
                pid, started = int(holder[0]) if holder else 0, holder[1] if len(holder) > 1 else None
            except (OSError, ValueError):  # gone meanwhile, or not a pid: stale
                pid, started, age = 0, None, float("inf")
            alive = pid and pid != os.getpid() and process_alive(pid) and started in (None, process_start(pid))
            if alive or (not pid and age < 10):  # empty and new: being written
                raise ConfigError(f"--output_dir {out}: another run (pid {pid or '?'}) is writing there; wait for it "
                                  f"to end, or choose another --output_dir (if no run is writing there, delete "
                                  f"{lock})") from None
            lock.unlink(missing_ok=True)  # stale, or ours: take it over
            continue
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()} {process_start(os.getpid())}")
        except OSError as err:
            lock.unlink(missing_ok=True)
            raise ConfigError(f"--output_dir {out}: could not write {lock} ({err.strerror or err}); free some "
                              f"space, then try again") from None
        return


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def process_start(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat's 22nd field); "-" where there is no
    /proc. A pid with another start time than its lock says is a later process that reuses the number."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


def release_lock(out: Path) -> None:
    lock = out / LOCK
    try:
        if lock.read_text().split()[:1] == [str(os.getpid())]:
            lock.unlink()
    except OSError:
        pass


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (and only those; check_output_dir made sure the directory holds a
    run of ours, and that --model is not among them)."""
    for name in RUN_FILES:
        for path in (out / name, out / f"{name}.tmp", out / f"{name}.old"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def rng_state() -> dict:
    """Every global RNG the run draws from, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, boundary: dict, cfg) -> None:
    """Write the state at the end of step boundary["step"] (see Run) to DIRECTORY, atomically."""
    def write(tmp: Path) -> None:
        engine.save_model(model, tokenizer, tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **{key: boundary[key] for key in ("rng", "order", "order_rng", "advantage_fn")}},
                   tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": boundary["step"], "algorithm": algorithm_of(cfg),
                                                    "config": dataclasses.asdict(cfg),
                                                    "data_fingerprints": boundary["data_fingerprints"],
                                                    "eval_before": boundary["eval_before"]}, indent=2))
    replace_dir(directory, write)


def read_checkpoint(directory: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint's weights, optimiser and scheduler into the given objects; return the rest of its state
    (step, rng, order, order_rng, advantage_fn, eval_before). The weights go through from_pretrained and
    load_state_dict, so tied and sharded weights need no special case. A missing or damaged file is one line."""
    part = directory / "model"
    try:
        if scaling.is_lora(model):  # the base weights are --model's; only the adapter was trained
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            part = directory / "model" / "adapter" / "adapter_model.safetensors"
            set_peft_model_state_dict(model, load_file(part))
        else:
            saved_model, _ = engine.from_pretrained(str(part))
            model.load_state_dict(saved_model.state_dict())
            del saved_model
        part = directory / "trainer_state.pt"
        state = torch.load(part, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
    except Exception as err:  # noqa: BLE001 - a truncated file, a missing one, a wrong one: the same remedy
        raise ConfigError(f"--resume: {part} is missing or damaged ({type(err).__name__}); restore the checkpoint, "
                          f"or start again with --overwrite") from None
    meta = read_json(directory / "state.json", "--resume")
    return {**state, "step": meta["step"], "eval_before": meta["eval_before"]}


class SafeExit:
    """For the duration of a `with` block: SIGTERM stops the run like Ctrl-C (both raise KeyboardInterrupt), and
    inside `held()` blocks both are held back until the block ends. `signal_number` is the first signal received."""

    def __init__(self):
        self.signal_number: Optional[int] = None
        self._holding, self._pending, self._exiting, self._previous = 0, False, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        first = self.signal_number is None
        self.signal_number = self.signal_number or signum
        if self._holding or self._exiting or not first:  # a second signal never interrupts the exit path's save
            self._pending = True
            say(f"\n{signal.Signals(signum).name}: finishing the save first (kill -9 stops at once, and loses "
                f"what is not saved yet)", file=sys.stderr)
            return
        raise KeyboardInterrupt

    def hold_all(self) -> None:
        """The exit path has begun: every signal from now on is only noted."""
        self._exiting = True

    @contextlib.contextmanager
    def held(self):
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding and self._pending and not self._exiting:
                self._pending = False
                raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signal_number or signal.SIGINT)


class Run:
    """Everything around train()'s GRPO loop that is not GRPO, in one object:

        with Run(cfg) as run:          # --output_dir and --resume checked, the directory locked: before any model
            run.start(model, ...)      # --resume's checkpoint, --overwrite, config.json, metrics.jsonl, dashboards
            for step in run.steps():   # the steps still to run; a checkpoint every --save_every steps after each
                run.log_step(record)   # the step's line, and the state a checkpoint of this step will hold
        return run.summary(model)      # Ctrl-C, SIGTERM or an error in the block saved the last finished step first
    Under torchrun only rank 0 writes files, prints, evaluates and saves."""

    def __init__(self, cfg):
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 when torchrun launched us
        if cfg.prompts_per_step % world:
            raise ConfigError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the number of "
                              f"processes ({world}): each takes an equal share of the step's prompts")
        self.rank, self.world = scaling.init_distributed(cfg)  # (0, 1) in one process
        self.is_main = self.rank == 0
        if self.is_main:
            check_output_dir(cfg)
        self.device = scaling.rank_device(pick_device(cfg.device))
        if self.device.type == "cpu" and cfg.keep_freed_memory:
            engine.keep_freed_memory()  # fewer page faults: see its docstring
        engine.bound_kernel_caches()  # a rollout's new shapes no longer fill memory with kernels: see its docstring
        self.dtype = engine.pick_dtype(cfg.dtype, self.device)
        self.exits, self.log, self.boundary = SafeExit(), scaling.SilentLog(), None
        self.first_step, self.step, self.updates, self.skipped, self.interrupted = 1, 0, 0, 0, False
        prints = {flag: data_fingerprint(getattr(cfg, flag, None)) for flag in DATA_FLAGS}  # --resume checks them
        self.data_fingerprints = {flag: value for flag, value in prints.items() if value}
        self.eval_before = self.eval_after = None
        self.start_time = time.time()

    def start(self, model, tokenizer, optimizer, scheduler, prompts, advantage_fn, log_keys=()) -> None:
        """prompts: a tasks.PromptOrder; advantage_fn: the step's advantage function (its state is checkpointed).
        Resume from the checkpoint (--resume), clear the old run (--overwrite), write config.json, open the log."""
        cfg = self.cfg
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.prompts, self.advantage_fn = prompts, advantage_fn
        # optimiser updates so far: tells whether the model is still at the last step's end when a save comes
        optimizer.register_step_post_hook(lambda *_: setattr(self, "updates", self.updates + 1))
        resumed = cfg.resume and read_checkpoint(find_saved(self.out / CHECKPOINT), model, optimizer, scheduler)
        if self.is_main:
            if cfg.overwrite:
                clear_run(self.out)
            try:
                (self.out / MARKER).write_text(algorithm_of(cfg) + "\n")  # check_output_dir: "a run of ours is here"
                (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            except OSError as err:
                raise ConfigError(f"could not write {self.out / 'config.json'} ({err.strerror or err}): free some "
                                  f"space, then try again") from None
            if getattr(cfg, "dynamic_sampling", False):
                log_keys = [*log_keys, ("groups_sampled", "groups", "{:.0f}"), ("groups_dropped", "dropped", "{:.0f}")]
            self.log = scaling.MetricsLog(self.out, log_keys, resume_step=resumed["step"] if resumed else None,
                                          reporter=scaling.make_reporter(cfg, self.out))
        if resumed:  # continue exactly where the checkpoint left off
            prompts.load_state_dict(resumed)
            if resumed["advantage_fn"] is not None:
                advantage_fn.load_state_dict(resumed["advantage_fn"])
            set_rng_state(resumed["rng"])
            self.first_step, self.eval_before = resumed["step"] + 1, resumed["eval_before"]
            if self.is_main:
                say(f"resumed from step {resumed['step']} of {self.out / CHECKPOINT}")
        self.step, self.start_time = self.first_step - 1, time.time()

    def steps(self):
        """The training steps still to run. After each, a checkpoint every --save_every steps."""
        if self.world > 1:  # every rank samples its own completions (the weights are the same on every rank)
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.rank + self.first_step)
        self.boundary = self.end_of_step(self.first_step - 1)
        for step in range(self.first_step, self.cfg.max_steps + 1):
            self.step = step
            yield step
            if self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.cfg.max_steps:
                self.save(final_model=False)

    def end_of_step(self, step: int) -> dict:
        """Everything a checkpoint needs besides the model and optimiser, as it is at the end of `step`."""
        get_state = getattr(self.advantage_fn, "state_dict", None)  # advantage functions that keep state (GFPO)
        return {"step": step, "eval_before": self.eval_before, "updates": self.updates, "rng": rng_state(),
                **self.prompts.state_dict(), "advantage_fn": get_state() if get_state else None,
                "data_fingerprints": self.data_fingerprints}

    def log_step(self, record: dict) -> None:
        if self.world > 1:
            record = scaling.mean_record_over_ranks(record, self.device)
        self.skipped += bool(record["skipped"])
        with self.exits.held():  # the step's line and its end-of-step state go together
            self.log.step(record)
            self.boundary = self.end_of_step(record["step"])

    def log_eval(self, step: int, evaluate: Callable[[], dict]) -> dict:
        """Run evaluate() on rank 0, log and print its result. The other ranks go on; they wait for rank 0 at the
        next step's first all-reduce."""
        if not self.is_main:
            return {"accuracy": float("nan"), "mean_length": float("nan"), "sample": ""}
        result = evaluate()
        self.log.write({"step": step, "eval_accuracy": result["accuracy"], "eval_completion_len": result["mean_length"],
                        **{f"eval_{key}": value for key, value in result.items()  # right_length, completions, ...
                           if key not in ("accuracy", "mean_length", "sample")}})
        say(f"eval step {step:>4} | held-out accuracy {result['accuracy']:.3f} | "
            f"mean length {result['mean_length']:.1f} | e.g. {result['sample']!r}")
        return result

    def save(self, final_model: bool) -> None:
        """The checkpoint, if the model is at the end of the boundary's step; and model/ if asked for."""
        if not self.is_main:
            return
        cfg, boundary, failed = self.cfg, self.boundary, None
        with self.exits.held():
            try:
                if cfg.save_every and boundary["step"] == 0:
                    pass  # nothing trained: a checkpoint of the --model weights would only cost disk
                elif cfg.save_every and self.updates == boundary["updates"]:
                    write_checkpoint(self.out / CHECKPOINT, self.model, self.tokenizer, self.optimizer,
                                     self.scheduler, boundary, cfg)
                    say(f"checkpoint of step {boundary['step']} in {self.out / CHECKPOINT}")
                elif cfg.save_every:
                    say("the unfinished step had updated the weights already: the checkpoint stays as it was")
            except ConfigError as err:  # model/ is smaller than a checkpoint: it may still fit, so try it
                failed = err
            if final_model and cfg.save_model:
                try:
                    replace_dir(self.out / "model", lambda tmp: engine.save_model(self.model, self.tokenizer, tmp))
                    say(f"saved model and tokenizer to {self.out / 'model'}; metrics in {self.log.path}")
                except ConfigError as err:
                    failed = ConfigError(f"{failed}; and {err}") if failed else err
        if failed is not None:
            raise failed

    def __enter__(self):
        scaling.guard_std_streams()  # what anything prints can no longer stop a save (a dead `| tee` or `| head`)
        self.exits.__enter__()
        return self

    def __exit__(self, kind, err, tb) -> bool:
        self.exits.hold_all()  # from here to the end a further Ctrl-C or SIGTERM is noted, never raised
        try:
            if kind is None:
                try:
                    self.save(final_model=True)
                except KeyboardInterrupt:  # Ctrl-C during the final save: it completed; report the interrupt
                    self.interrupted = True
            elif issubclass(kind, KeyboardInterrupt):
                self.interrupted = True
                name = signal.Signals(self.exits.signal_number).name if self.exits.signal_number else kind.__name__
                if self.boundary is not None and self.updates > 0:
                    say(f"\n{name} during step {self.step}: saving what we have")
                    try:
                        self.save(final_model=True)
                    except KeyboardInterrupt:  # held back during the save, raised after it: the save is complete
                        pass
                else:
                    say(f"\n{name} during step {self.step}: no weights were updated, so there is nothing new to save")
            elif issubclass(kind, Exception) and self.boundary is not None and self.updates > 0:
                say(f"error during step {self.step}: saving what we have before reporting it")
                try:
                    self.save(final_model=True)
                except ConfigError as save_error:  # report both: the save's failure now, the run's error below
                    say(f"error: {save_error}", file=sys.stderr)
        finally:
            self.log.close()
            if self.is_main:
                release_lock(self.out)
            self.exits.__exit__(kind, err, tb)
        return kind is not None and issubclass(kind, KeyboardInterrupt)  # an interrupt ends train() normally

    def summary(self, model) -> dict:
        """train()'s result; prints the held-out accuracy before -> after."""
        seconds = time.time() - self.start_time
        if self.world > 1:
            torch.distributed.destroy_process_group()
        if self.skipped and self.skipped == self.step - self.first_step + 1 and self.is_main:
            say(f"warning: all {self.skipped} steps were skipped (non-finite gradients): the model did not change",
                file=sys.stderr)
        if self.eval_after is not None and self.is_main:
            say(f"held-out accuracy: {self.eval_before['accuracy']:.3f} -> {self.eval_after['accuracy']:.3f}  "
                f"({self.step} steps, {seconds:.0f} s)")
        evals = {k: v for k, v in (("eval_before", self.eval_before), ("eval_after", self.eval_after)) if v is not None}
        return {**evals, "train_seconds": seconds, "steps": self.step, "interrupted": self.interrupted,
                "exit_code": self.exits.exit_code if self.interrupted else 0, "model": model}
