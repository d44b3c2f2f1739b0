"""scaling.py: long runs, several GPUs and bigger models. None of it changes what a GRPO step computes.

    metrics      OUTPUT_DIR/metrics.jsonl, a record per step and per evaluation, and the line printed per step
    dashboards   --report_to tensorboard | wandb: every number of every metrics.jsonl record, under the same key
    torchrun     data parallelism over K processes whose summed gradient is the single-process gradient of the
                 whole step (the normalisers are summed first); only rank 0 writes, prints, evaluates and saves
    LoRA         --lora_r: low-rank adapters through peft; the KL term's reference is the model with them off
harness.Run calls the first three; grpo_step calls step_totals and sum_gradients_over_ranks (no-ops in one process).
It is the lowest of our modules (it imports none of them), so it also holds what every module above shares: the
ConfigError that bad input raises, say(), and the standard streams that never stop a save (guard_std_streams).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch

# ======================================================================================================================
# 0. What every module shares: the one-line error, and output that cannot stop a run
# ======================================================================================================================


class ConfigError(ValueError):
    """Bad user input (a flag or a data file), or a file the run cannot write. The CLI prints it as one line and
    exits 2; raised before any model loads wherever the input allows."""


def say(message: str = "", file=None) -> None:
    """print(), flushed, that never raises. A closed or broken stdout (`| head`, a `| tee` killed with its process
    group) must not stop a save on the way out."""
    try:
        print(message, file=file or sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def say_on_rank_zero(message: str = "", file=None) -> None:
    """say() in the first process only: under torchrun (RANK set) one copy of the line, not one per process."""
    if os.environ.get("RANK", "0") == "0":
        say(message, file)


class SafeStream:
    """sys.stdout or sys.stderr that never raises. The first write or flush that fails (the reader of a pipe has
    gone: `2>&1 | head -2`, a `| tee` killed before us; or the stream is closed) points the stream, and its file
    descriptor, at /dev/null for the rest of the process. What a library prints on the save path (transformers'
    "Writing model shards" bar, a warning) then cannot turn a checkpoint into a BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream if stream is not None else open(os.devnull, "w")  # `2>&-` leaves sys.stderr None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._to_devnull()

    def _to_devnull(self) -> None:
        try:  # the descriptor too: C code, logging handlers that hold the old stream, and its flush at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        self._stream = open(os.devnull, "w")

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the wrapped stream's
        return getattr(self._stream, name)


def guard_std_streams() -> None:
    """Make sys.stdout and sys.stderr SafeStreams, once per process. Writes that succeed are unchanged."""
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), SafeStream):
            setattr(sys, name, SafeStream(getattr(sys, name)))


# ======================================================================================================================
# 1. metrics.jsonl: one record per step and per evaluation, and the printed line
# ======================================================================================================================


class MetricsLog:
    """Prints one line per step with fixed keys and appends the same record to OUTPUT_DIR/metrics.jsonl."""

    STEP_KEYS = [("reward", "reward", "{:.3f}"), ("accuracy", "acc", "{:.3f}"), ("zero_std_frac", "zero_std", "{:.2f}"),
                 ("completion_len", "len", "{:.1f}"), ("truncated_frac", "trunc", "{:.2f}"), ("kl", "kl", "{:.4f}"),
                 ("clip_frac", "clip", "{:.3f}"), ("entropy", "ent", "{:.2f}"), ("grad_norm", "gnorm", "{:.3f}"),
                 ("step_s", "s", "{:.1f}"), ("tokens_per_s", "tok/s", "{:.0f}")]

    def __init__(self, output_dir: Path, extra_keys=(), resume_step: Optional[int] = None, reporter=None):
        """A new log, or with resume_step the existing one cut back to the records of steps <= resume_step (a run
        killed after its last checkpoint may have logged steps that the resumed run will redo). reporter: a
        TensorBoard or wandb logger that gets every record too, or None."""
        self.reporter = reporter
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():
            for line_no, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
                try:
                    if line.strip() and json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError) as err:
                    raise ConfigError(f"--resume: {self.path}:{line_no} is not a metrics record "
                                      f"({type(err).__name__}); delete that line, then --resume again") from None
        self.path.write_text("".join(line + "\n" for line in kept))
        self.keys = list(self.STEP_KEYS) + list(extra_keys)

    def write(self, record: dict) -> None:
        # NaN and inf are not JSON: write them as null, so that every line parses with a strict reader
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as err:  # a full disk: one line; the run's exit path still tries to save the checkpoint
            raise ConfigError(f"could not write {self.path} ({err.strerror or err}): free some space, then --resume"
                              ) from None
        if self.reporter is not None:
            self.reporter.log(record)

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()

    def step(self, record: dict) -> None:
        self.write(record)
        parts = [f"step {record['step']:>4}"]
        for key, short, fmt in self.keys:
            value = record.get(key)
            parts.append(f"{short} " + ("-" if value is None else fmt.format(value)))
        say(" | ".join(parts))


def step_record(step: int, ro, stats: Optional[dict], extra: dict, seconds: float, lr: float, zero_std_frac: float,
                accuracy: bool) -> dict:
    """The step's RL signals, as metrics.jsonl has them (the README's table of logged keys). In GRPO the loss is
    about 0 by construction (the ratio is 1 with one pass): reward, zero_std and the held-out accuracy show progress.
    ro: grpo_mini's scored Rollout; stats: grpo_mini.accumulate_gradients' (None for a skipped step)."""
    record = {
        "step": step, "reward": ro.rewards.mean().item(),
        "accuracy": (ro.rewards > 0).float().mean().item() if accuracy else None,  # right = reward > 0
        "zero_std_frac": zero_std_frac,
        "completion_len": ro.lengths.mean().item(), "truncated_frac": ro.truncated.float().mean().item(),
        **{key: stats and stats[key] for key in ("kl", "clip_frac", "clip_low", "clip_high", "ratio", "loss",
                                                 "grad_norm", "entropy", "is_ratio_mean", "is_ratio_min",
                                                 "is_ratio_max", "sampler_kl")},
        "step_s": seconds, "tokens_sampled": ro.completion_mask.sum().item(),
        "tokens_trained": stats["tokens_trained"] if stats else 0.0, "lr": lr, "skipped": stats is None,
        **extra,  # dynamic sampling's tokens_sampled (every group sampled) overrides the trained groups' count
    }
    record["tokens_per_s"] = record["tokens_sampled"] / seconds  # every generated token, kept or not
    return record


class SilentLog:
    """What ranks other than 0 log to: nothing."""
    path = None

    def write(self, record: dict) -> None:
        pass

    step = write
    close = lambda self: None  # noqa: E731


# ======================================================================================================================
# 2. Dashboards: TensorBoard and wandb (every number of a metrics.jsonl record, under its key, at its step)
# ======================================================================================================================


def scalars(record: dict) -> dict:
    """The plottable numbers of a record: ints and floats, not booleans, not None, not the step itself."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardReporter:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """wandb, offline unless you are logged in (WANDB_API_KEY set, or `wandb login` done), so that it works without an
    account; WANDB_MODE overrides. An offline run is uploaded later with `wandb sync OUTPUT_DIR/wandb/offline-run-*`."""

    def __init__(self, cfg, out_dir: Path):
        import wandb

        netrc = Path.home() / ".netrc"  # where `wandb login` keeps the key
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
            netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
        self.run = wandb.init(project="grpo-mini", name=out_dir.name, dir=str(out_dir), mode=mode,
                              config=dataclasses.asdict(cfg), resume="allow" if cfg.resume else None)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def make_reporter(cfg, out_dir: Path):
    if cfg.report_to == "tensorboard":
        return TensorBoardReporter(out_dir / "tensorboard")
    if cfg.report_to == "wandb":
        return WandbReporter(cfg, out_dir)
    return None


# ======================================================================================================================
# 3. Several GPUs with torchrun:   torchrun --nproc_per_node K grpo_mini.py ...   (NCCL on GPUs; gloo on CPUs)
# ======================================================================================================================
# Data parallelism: every rank holds the whole model. Each step's prompts are split across the K ranks (rank r takes
# prompts r, r + K, ...), each rank samples and scores its share, and the gradients are summed over ranks before the
# optimiser step, which then runs identically everywhere, so the weights stay equal. For the sum to be the
# single-process gradient, the loss's normalisers must be the step's: dapo's token count and grpo / dr_grpo's row
# count are summed over ranks first (step_totals). bnpo's is per micro-batch, so it is exact only within a process.
# Advantages stay per rank: GRPO's groups live on one rank, so group scaling is exact; --scale_rewards batch uses the
# rank's share as the batch, and SEED-GRPO and GFPO (per-prompt advantages; GFPO's difficulty record) are rank-local.
# Deliberately NOT torch's DistributedDataParallel wrapper: DDP's hooks assume one forward per backward and the same
# number of backward calls on every rank, but a step here runs two forwards per micro-batch (the shared prompt, then
# the completions) and skips rows whose advantage is 0, so ranks can differ in micro-batches. Summing the gradients
# once per step with all_reduce is the same collective DDP would run, with nothing to go out of step.
# Resume under torchrun continues correctly but not bit-exactly: the checkpoint holds rank 0's RNG state only.


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(cfg) -> tuple:
    """(rank, world size). Starts the process group when torchrun launched us with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not distributed():
        # PITFALL: torch.distributed.nn's functions take `group=group.WORLD` as a default argument, evaluated when
        # that module is first imported, and transformers imports it while loading a model. Imported after the
        # group exists, those defaults hold the group, so destroy_process_group() cannot free it: its gloo worker
        # threads outlive the Python code, and one that frees the last all-reduce's tensor while the interpreter
        # shuts down aborts the process ("terminate called without an active exception"). Imported first, the
        # defaults are None.
        import torch.distributed.nn  # noqa: F401
        use_nccl = cfg.device != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each process gets its own GPU (LOCAL_RANK); otherwise the device as chosen."""
    if distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(values: list, device: torch.device, op=None) -> list:
    """Sum a few numbers over all ranks (one collective); op=torch.distributed.ReduceOp.MAX takes their maximum."""
    backend_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=backend_device)
    torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def step_totals(ro, rows: list, device: torch.device) -> tuple:
    """(counts, has_gradient) for grpo_step: counts = (rows, completion tokens) of the whole step over every rank, or
    None in one process (the rollout's own); has_gradient: whether any rank trains any row."""
    if not distributed():
        return None, bool(rows)
    n_rows, n_tokens, ranks_with_rows = all_reduce_sum([ro.completion_ids.size(0), ro.completion_mask.sum().item(),
                                                        float(bool(rows))], device)
    return (n_rows, n_tokens), ranks_with_rows > 0


def sum_gradients_over_ranks(model, stats: Optional[dict], device: torch.device) -> Optional[dict]:
    """After every rank has accumulated its share: skip the step everywhere if any rank's loss was not finite,
    else sum every gradient over the ranks. A no-op in one process."""
    if not distributed():
        return stats
    if all_reduce_sum([float(stats is None)], device)[0] > 0:
        model.zero_grad(set_to_none=True)
        return None
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:  # a rank that trained no row still takes part
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
    return stats


def mean_record_over_ranks(record: dict, device: torch.device) -> dict:
    """The step's logged numbers over all ranks: tokens summed, *_min / *_max the min / max, everything else averaged
    over the ranks that have it (a rank that trained no token has no entropy; None where no rank has a value)."""
    keys = sorted(k for k, v in record.items() if (v is None or isinstance(v, (int, float)))
                  and not isinstance(v, bool) and k != "step")  # the same keys on every rank; values may be None
    have = [record[k] is not None for k in keys]
    totals = all_reduce_sum([record[k] if ok else 0.0 for k, ok in zip(keys, have)] + have, device)
    sums, counts = totals[:len(keys)], totals[len(keys):]
    extremes = [k for k in keys if k.endswith(("_min", "_max"))]
    signs = [-1.0 if k.endswith("_min") else 1.0 for k in extremes]  # min(x) = -max(-x): one MAX for both kinds
    peaks = all_reduce_sum([-math.inf if record[k] is None else s * record[k] for k, s in zip(extremes, signs)],
                           device, op=torch.distributed.ReduceOp.MAX)
    merged = {k: None if not n else t if k.startswith("tokens") else t / n for k, t, n in zip(keys, sums, counts)}
    merged.update({k: s * v if math.isfinite(v) else None for k, s, v in zip(extremes, signs, peaks)})
    return {**record, **merged}


# ======================================================================================================================
# 4. LoRA through peft
# ======================================================================================================================
# LoRA trains a low-rank update B @ A next to each chosen weight and freezes the weight itself. GRPO is unchanged.
# As in TRL, the reference model of the KL term is the same model with its adapters switched off (AdaptersOff: at
# the start of training that is exactly the policy, with no second copy of the weights), and saving writes the
# merged model (loadable with --model) and the adapter alone.


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def add_lora(model, cfg):
    """Wrap the model with LoRA adapters (peft); only they require gradients."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules if cfg.lora_target_modules == "all-linear" else [
        name.strip() for name in cfg.lora_target_modules.split(",") if name.strip()]
    try:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    except ValueError as err:  # e.g. a module name the model does not have
        raise ConfigError(f"--lora_target_modules {cfg.lora_target_modules}: {str(err).splitlines()[0]}") from None


class AdaptersOff:
    """The reference model for LoRA runs: calls the wrapped model with its adapters disabled."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def get_output_embeddings(self):  # the wrapped model's, for engine.projected_positions
        return self.model.get_output_embeddings()
