"""What every trainer shares: processes and devices, global batches and gradient accumulation,
AdamW, gradient clipping, EMA, mixed precision, atomic checkpoints and resume, logging.

A trainer builds its networks, turns each into a `Part` (`TrainingLoop.add_part`: its AdamW, its
EMA, how it runs: DistributedDataParallel or FSDP, compiled or not) and hands `TrainingLoop.run`
a step function `step(step, micro_batches) -> {term: scalar tensor}`. Inside it,
`accumulate(part, micro_batches, loss_fn)` runs forward and backward over this process's
micro-batches and `update(part)` clips, steps AdamW and the EMA; a trainer with two networks
(a tokenizer and its discriminator) calls the pair once per network, in the order it alternates
them. The loop does the rest: reading micro-batches, logging each term, stopping on a
non-finite term, checkpoints, resume.

Reproducibility: every random draw of a step comes from `draw_generator(step, micro_batch)`,
seeded by (seed, step, the micro-batch's place in the global batch) alone, and the data order
from the seed (`softvq_fast.data.StreamSampler`). So a resumed run repeats the straight run
exactly, and the draws of a step do not depend on the number of processes as long as the
micro-batch size is the same (2 processes x 4 samples = 1 process x 2 micro-batches of 4).

Processes: under torchrun (WORLD_SIZE > 1) each process joins the default group (NCCL on GPUs,
gloo on the CPU) on its LOCAL_RANK's GPU; gradients are averaged over the processes
(DistributedDataParallel, or FSDP with `fsdp=True`), and only rank 0 writes logs, samples and
checkpoints, which hold the full (unsharded) state, so a run resumes on any number of processes.

Also shared: `in_runtime` (check the settings, run in this process's runtime), `check_adamw`,
`WarmupCosine` (the authors' learning-rate schedule by update), `prepare_run_folder` (a resumed
run must match the configuration its folder holds), the backend probes of a training step
(`attention_backend`, `linear_backend`, `slow_backend_warnings`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from softvq_fast import distributed
from softvq_fast.data import mix_seed
from softvq_fast.models import fields

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "log.jsonl"
PRECISIONS = ("auto", "bf16", "fp32")
# A rank that waits at a collective while rank 0 writes a checkpoint or a sample grid.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
T = TypeVar("T")


class SetupError(ValueError):
    """An input or setting that cannot train, found before the first step; `argument` names the
    option at fault ("latents", "model", "out", ...)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what is kept."""


class NonFiniteLossError(TrainingError):
    """A loss term (or a gradient norm) became inf or nan; `step` and `term` name the first one."""

    def __init__(self, step: int, term: str, value: float, checkpoint: Path | None) -> None:
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite {term} = {value} at step {step}: the run stopped, {kept} (lower the "
                         "learning rate or check the data before resuming: a resumed run repeats the same steps)")
        self.step, self.term, self.value = step, term, value


# ------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class LoopSettings:
    """What the loop itself needs; a trainer's configuration extends it (keyword-only fields, so
    a subclass adds required ones and gives these defaults).

    global_batch: samples per optimiser step over all processes; each process takes
        global_batch / world_size of them, in micro-batches of `micro_batch` (default: all at
        once) whose gradients accumulate.
    precision: "bf16" runs the forward passes under bfloat16 autocast (weights, gradients,
        optimiser state and EMA stay float32), "fp32" does not, "auto" is bf16 on GPUs.
    fsdp: shard weights, gradients and AdamW state over the processes (torch's fully_shard)
        instead of replicating them (DistributedDataParallel). Use it when a model with its
        training state does not fit one GPU: float32 training holds about 20 bytes per
        parameter (weights 4, gradients 4, AdamW moments 8, EMA 4) before activations, so
        SiT-XL (675M parameters, about 14 GB) fits an 80 GB GPU and trains faster replicated;
        FSDP pays an all-gather of each unit's weights in every forward and backward.
    checkpoint_every / log_every: in steps; the last step is always logged and checkpointed.
    keep_checkpoints: how many of the newest checkpoints stay on disk.
    """

    out: Path
    steps: int
    global_batch: int
    micro_batch: int | None = None
    seed: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "auto"
    compile: bool = False
    fsdp: bool = False
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 100
    device: str | None = None
    progress: bool = True

    def check(self) -> None:
        """FieldError (a ValueError) naming the first setting that cannot run."""
        for name in ("steps", "global_batch", "checkpoint_every", "keep_checkpoints", "log_every"):
            fields.integer(name, getattr(self, name))
        fields.optional_integer("micro_batch", self.micro_batch)
        fields.integer("seed", self.seed, minimum=0)
        fields.real("grad_clip", self.grad_clip, above=0)
        fields.real("ema_decay", self.ema_decay, at_least=0, below=1)
        fields.text("precision", self.precision, PRECISIONS)
        for name in ("compile", "fsdp", "progress"):
            fields.boolean(name, getattr(self, name))


def check_adamw(lr: float, betas: Any, weight_decay: float) -> None:
    """FieldError naming the first AdamW setting that cannot train."""
    fields.real("lr", lr, above=0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise fields.FieldError("betas", f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        fields.real(f"betas[{index}]", beta, at_least=0, below=1)
    fields.real("weight_decay", weight_decay, at_least=0)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits: `rank_batch` samples per process in `micro_batches`
    micro-batches of `micro_batch`."""

    global_batch: int
    world_size: int
    micro_batch: int

    @classmethod
    def make(cls, global_batch: int, world_size: int, micro_batch: int | None) -> "BatchPlan":
        if global_batch % world_size:
            raise SetupError("global_batch", f"{global_batch} is not divisible by the {world_size} processes")
        rank_batch = global_batch // world_size
        micro_batch = micro_batch or rank_batch
        if rank_batch % micro_batch:
            raise SetupError("micro_batch", f"{micro_batch} does not divide the per-process batch {rank_batch} "
                                            f"(global_batch {global_batch} over {world_size} processes)")
        return cls(global_batch, world_size, micro_batch)

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def micro_batches(self) -> int:
        return self.rank_batch // self.micro_batch


@dataclass(frozen=True)
class WarmupCosine:
    """A learning-rate schedule by update: `at(t)` is the rate of the update that follows t
    updates (t = step - 1). A linear warm-up from `warmup_lr` towards `base` over `warmup_steps`
    (at(t) = warmup_lr + t (base - warmup_lr) / warmup_steps), then a half cosine from `base` to
    `min_lr` over `total_steps` counted from update 0 (the warm-up included), `min_lr` after.
    This is timm's CosineLRScheduler stepped per update, as the authors build it
    (create_scheduler_v2(sched="cosine", step_on_epochs=False)). cosine=False: `base` throughout."""

    base: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    cosine: bool = True

    def at(self, t: int) -> float:
        if not self.cosine:
            return self.base
        if t < self.warmup_steps:
            return self.warmup_lr + t * (self.base - self.warmup_lr) / self.warmup_steps
        if t >= self.total_steps:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base - self.min_lr) * (1 + math.cos(math.pi * t / self.total_steps))


# ------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Runtime:
    """This process: its rank among `world_size`, its device, and whether it started the
    process group (and so ends it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start_runtime(device: str | torch.device | None = None) -> Runtime:
    """Join torchrun's process group when WORLD_SIZE > 1 (unless the caller already did): NCCL on
    GPUs, gloo on the CPU, on `device` as `softvq_fast.distributed.process_device` resolves it."""
    resolved = distributed.process_device(device)
    owns = distributed.join_process_group("nccl" if resolved.type == "cuda" else "gloo", COLLECTIVE_TIMEOUT, resolved)
    rank, world = distributed.rank_and_world()
    return Runtime(rank, world, distributed.local_rank(), resolved, owns)


def in_runtime(settings: LoopSettings, train: Callable[[Runtime], T]) -> T:
    """settings.check(), then train(runtime) in this process's runtime (`start_runtime` on
    settings.device), closed after: the process group ends if this call started it."""
    settings.check()
    runtime = start_runtime(settings.device)
    try:
        return train(runtime)
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------ parts
@dataclass
class Part:
    """One trained network. `module` is the network as built (FSDP shards it in place; its
    parameter names are the checkpoint's), `runner` what forward passes call (the
    DistributedDataParallel and torch.compile wrappers), `ema` a float32 copy in eval mode
    updated after each step (None: no EMA)."""

    name: str
    module: nn.Module
    runner: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    ema: nn.Module | None
    grad_clip: float | None

    def trained_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]


def _full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP) gathered to a plain tensor; other tensors as they are."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


# ------------------------------------------------------------------------------------ the loop
@dataclass
class _Pending:
    """Per-step loss terms kept on the device until the next log (no synchronisation per step)."""

    steps: list[int] = field(default_factory=list)
    terms: list[dict[str, torch.Tensor]] = field(default_factory=list)


class TrainingLoop:
    """See the module docstring. `config` is the trainer's whole configuration (JSON-able): it
    goes into every checkpoint; `data_size` is the number of items of the data stream (recorded
    as the data position's frame of reference)."""

    def __init__(self, settings: LoopSettings, runtime: Runtime, *, config: dict[str, Any], data_size: int) -> None:
        settings.check()
        self.settings, self.runtime, self.config, self.data_size = settings, runtime, config, data_size
        self.plan = BatchPlan.make(settings.global_batch, runtime.world_size, settings.micro_batch)
        if settings.fsdp and not runtime.distributed:
            raise SetupError("fsdp", "shards the model over the processes of a torchrun launch; one process trains "
                                     "without it")
        self.parts: dict[str, Part] = {}
        self.extra_state: dict[str, Any] = {}  # objects with state_dict() / load_state_dict()
        self.step = 0
        self.out = Path(settings.out)
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        self.last_checkpoint: Path | None = None
        self._pending = _Pending()
        self._log_file = None
        self._tensorboard = None
        precision = settings.precision
        if precision == "auto":
            precision = "bf16" if runtime.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    # ---------------------------------------------------------------- building
    def add_part(
        self, name: str, module: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0, decay_vectors: bool = True, ema: bool = True,
        fsdp_units: Iterable[nn.Module] = (),
    ) -> Part:
        """Move `module` to the device and prepare it to train: EMA copy (before any wrapping),
        FSDP (each of `fsdp_units`, then the whole) or DistributedDataParallel over the
        processes, torch.compile, AdamW over the parameters that require a gradient.
        decay_vectors=False: no weight decay for 1-D parameters and biases (two AdamW parameter
        groups, as the authors' param_groups_weight_decay builds them for the tokenizer)."""
        module = module.to(self.runtime.device).train()
        ema_module = copy.deepcopy(module).float().eval().requires_grad_(False) if ema else None
        runner: Callable[..., Any] = module
        if self.settings.fsdp:
            from torch.distributed.fsdp import fully_shard

            for target in [m for m in (module, ema_module) if m is not None]:
                units = list(fsdp_units) if target is module else _matching_units(module, fsdp_units, target)
                for unit in units:
                    fully_shard(unit)
                fully_shard(target)
        elif self.runtime.distributed:
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            runner = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
        if self.settings.compile:
            runner = torch.compile(runner)
        optimizer = torch.optim.AdamW(_parameter_groups(module, weight_decay, decay_vectors), lr=lr, betas=betas,
                                      weight_decay=weight_decay)
        part = Part(name, module, runner, optimizer, ema_module, self.settings.grad_clip)
        self.parts[name] = part
        return part

    @staticmethod
    def set_lr(part: Part, lr: float) -> None:
        """The learning rate of every parameter group of `part`'s optimiser."""
        for group in part.optimizer.param_groups:
            group["lr"] = lr

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when the precision says so, else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    def draw_generator(self, step: int, micro_batch: int) -> torch.Generator:
        """The generator of every random draw for this process's `micro_batch`-th micro-batch of
        `step`, on the device: seeded by (seed, step, the micro-batch's place in the global batch)."""
        place = self.runtime.rank * self.plan.micro_batches + micro_batch
        return torch.Generator(device=self.runtime.device).manual_seed(mix_seed(self.settings.seed, step, place))

    # ---------------------------------------------------------------- a step
    def accumulate(
        self, part: Part, micro_batches: list[Any], loss_fn: Callable[[Callable[..., Any], Any, int], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """For each micro-batch m: terms = loss_fn(part.runner, batch, m), scalars averaged over
        the micro-batch, "loss" the one to minimise (run it under `self.autocast()`); backward
        of loss / micro_batches, gradients averaged over the processes after the last one only.
        A loss_fn that returns no "loss" (nothing to train at this step) is only evaluated.
        Returns each term averaged over this process's batch, detached."""
        totals: dict[str, torch.Tensor] = {}
        count = len(micro_batches)
        for index, batch in enumerate(micro_batches):
            with self._gradient_sync(part, index == count - 1):
                terms = loss_fn(part.runner, batch, index)
                if "loss" in terms:
                    (terms["loss"] / count).backward()
            for name, value in terms.items():
                value = value.detach().float() / count
                totals[name] = totals[name] + value if name in totals else value
        return totals

    def _gradient_sync(self, part: Part, sync: bool) -> contextlib.AbstractContextManager:
        if sync:
            if hasattr(part.module, "set_requires_gradient_sync"):
                part.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if hasattr(part.module, "set_requires_gradient_sync"):  # FSDP: reduce-scatter after the last only
            part.module.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        runner = getattr(part.runner, "_orig_mod", part.runner)
        return runner.no_sync() if isinstance(runner, DistributedDataParallel) else contextlib.nullcontext()

    def update(self, part: Part) -> dict[str, torch.Tensor]:
        """Clip the gradient norm, step AdamW, clear the gradients, update the EMA. Returns
        {"grad_norm/<part>": the norm before clipping}."""
        trained = part.trained_parameters()
        norm = torch.nn.utils.clip_grad_norm_(trained, part.grad_clip if part.grad_clip else math.inf)
        part.optimizer.step()
        part.optimizer.zero_grad(set_to_none=True)
        if part.ema is not None:
            self._update_ema(part)
        return {f"grad_norm/{part.name}": _full(norm).detach().float()}

    @torch.no_grad()
    def _update_ema(self, part: Part) -> None:
        decay = self.settings.ema_decay
        ema = list(part.ema.parameters())
        current = [p.detach().float() for p in part.module.parameters()]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, current, alpha=1.0 - decay)

    # ---------------------------------------------------------------- running
    def run(self, step_fn: Callable[[int, list[Any]], dict[str, torch.Tensor]], batches: Iterator[Any],
            hooks: Iterable[Callable[[int], None]] = (), *, progress_terms: Sequence[str] = ("loss",),
            unit: str = "samples") -> None:
        """Steps self.step + 1 .. settings.steps: read this process's micro-batches, call
        step_fn(step, micro_batches) (step counts from 1; it returns the step's terms: a step may
        leave out terms that others report, the same ones on every process), log every
        log_every steps, checkpoint every checkpoint_every, call each hook(step) after the step.
        Raises NonFiniteLossError when a term became inf or nan (checked at each log and before
        each checkpoint, so no checkpoint holds a non-finite state). The progress bar shows the
        `progress_terms` of the last log and `unit`s per second."""
        settings = self.settings
        started, started_step = time.perf_counter(), self.step
        bar = None
        if self.runtime.is_main and settings.progress:
            from tqdm import tqdm

            bar = tqdm(total=settings.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        try:
            while self.step < settings.steps:
                micro_batches = [next(batches) for _ in range(self.plan.micro_batches)]
                step = self.step + 1
                terms = step_fn(step, micro_batches)
                self._pending.steps.append(step)
                self._pending.terms.append(terms)
                self.step = step
                last = step == settings.steps
                if step % settings.log_every == 0 or step % settings.checkpoint_every == 0 or last:
                    elapsed = time.perf_counter() - started
                    record = self._flush(samples_per_s=(step - started_step) * settings.global_batch / max(elapsed, 1e-9))
                    if bar is not None:
                        shown = {name: f"{record[name]:.4f}" for name in progress_terms if name in record}
                        bar.set_postfix({**shown, f"{unit}/s": f"{record['samples_per_s']:.1f}"})
                if step % settings.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                for hook in hooks:
                    hook(step)
        finally:
            if bar is not None:
                bar.close()

    def _flush(self, *, samples_per_s: float) -> dict[str, Any]:
        """Average the pending terms over the processes, stop on a non-finite one, log the mean
        of each term since the last log (over the steps that reported it)."""
        pending, self._pending = self._pending, _Pending()
        # The step function's order (e.g. its loss before the gradient norms), terms that only
        # later steps report after those of the first.
        names = list(dict.fromkeys(name for terms in pending.terms for name in terms))
        present = torch.tensor([[name in terms for name in names] for terms in pending.terms], dtype=torch.bool)
        means: list[float] = []
        if names:
            device = next(value for terms in pending.terms for value in terms.values()).device
            absent = torch.zeros((), device=device)
            values = torch.stack([torch.stack([terms[name].float() if name in terms else absent for name in names])
                                  for terms in pending.terms])
            if self.runtime.distributed:
                dist.all_reduce(values)
                values /= self.runtime.world_size
            values = values.cpu()
            finite = torch.isfinite(values) | ~present
            if not finite.all():
                row, column = (~finite).nonzero()[0].tolist()
                error = NonFiniteLossError(pending.steps[row], names[column], values[row, column].item(),
                                           self.last_checkpoint)
                self.log_event("non_finite", step=error.step, term=error.term, value=str(error.value))
                raise error
            means = ((values * present).sum(0) / present.sum(0)).tolist()
        record = {"step": self.step, **dict(zip(names, means)), "samples_per_s": samples_per_s,
                  "lr": {name: part.optimizer.param_groups[0]["lr"] for name, part in self.parts.items()}}
        if self.runtime.is_main:
            self._write_log(record)
            if self._tensorboard is not None:
                for name in names:
                    self._tensorboard.add_scalar(name, record[name], self.step)
                self._tensorboard.add_scalar("samples_per_s", samples_per_s, self.step)
        return record

    # ---------------------------------------------------------------- logging
    def open_logs(self, resumed: bool) -> None:
        """Rank 0: open log.jsonl for appending (a resumed run first drops the records of steps
        after its checkpoint, which the interrupted run logged and lost) and TensorBoard when
        installed."""
        if not self.runtime.is_main:
            return
        path = self.out / LOG_NAME
        if resumed and path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
            _write_text_atomic(path, "".join(line + "\n" for line in kept))
        self._log_file = open(path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self._tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if resumed else None)

    def log_event(self, event: str, **fields: Any) -> None:
        """Rank 0: one JSON line {"event": ..., "step": ..., fields}."""
        if self.runtime.is_main:
            self._write_log({"event": event, "step": self.step, **fields})

    def log_metrics(self, event: str, values: dict[str, float], **fields: Any) -> None:
        """Rank 0: one JSON line {"event": ..., "step": ..., values, fields}, and each value to
        TensorBoard as "<event>/<name>"."""
        if not self.runtime.is_main:
            return
        self._write_log({"event": event, "step": self.step, **values, **fields})
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(f"{event}/{name}", value, self.step)

    def _write_log(self, record: dict[str, Any]) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step-{step:09d}.pt"

    def checkpoints(self) -> list[Path]:
        """The finished checkpoints of the run folder, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*.pt") if p.name[5:-3].isdigit())

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """`module`'s unsharded state on the CPU (a collective under FSDP: every rank calls it; rank
        0's holds the tensors)."""
        return get_model_state_dict(module, options=FULL_STATE)

    def state(self) -> dict[str, Any]:
        """The full training state (collectives under FSDP and across processes: every rank calls
        it); rank 0's holds the tensors."""
        parts = {}
        for name, part in self.parts.items():
            parts[name] = {
                "model": self.full_state_dict(part.module),
                "optimizer": get_optimizer_state_dict(part.module, part.optimizer, options=FULL_STATE),
                "ema": self.full_state_dict(part.ema) if part.ema is not None else None,
            }
        rng = _rng_state()
        if self.runtime.distributed:
            gathered: list[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": json.dumps(self.config, sort_keys=True),
            "parts": parts,
            "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()},
            "rng": gathered,
            "world_size": self.runtime.world_size,
            # The data stream is a function of the seed: its position is the samples consumed.
            "data": {"samples": self.step * self.settings.global_batch, "items": self.data_size,
                     "epoch": self.step * self.settings.global_batch // max(self.data_size, 1),
                     "seed": self.settings.seed},
        }

    def save_checkpoint(self) -> Path | None:
        """Write the state at self.step atomically (temporary name, fsync, rename), then delete
        all but the newest keep_checkpoints. A write that fails (disk full, permissions) leaves
        the earlier checkpoints as they were, is reported on stderr and in the log, and training
        goes on (the next checkpoint tries again). Returns the path, or None when not written."""
        state = self.state()
        path = None
        if self.runtime.is_main:
            path = self.checkpoint_path(self.step)
            try:
                write_atomic(path, lambda f: torch.save(state, f))
            except (OSError, RuntimeError) as exc:  # torch.save wraps write errors in RuntimeError
                kept = f"the previous one, {self.last_checkpoint}, is intact" if self.last_checkpoint else "there is no earlier one"
                message = f"checkpoint at step {self.step} could not be written to {path} ({exc}); {kept}"
                print(f"warning: {message}; training continues", file=sys.stderr)
                self.log_event("checkpoint_failed", path=str(path), error=str(exc))
                path = None
            else:
                self.last_checkpoint = path
                self.log_event("checkpoint", path=str(path))
                for old in self.checkpoints()[: -self.settings.keep_checkpoints]:
                    old.unlink(missing_ok=True)
        self.runtime.barrier()
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore every part, the extra state, the step and this process's RNG states from a
        checkpoint of this run (every process reads the file)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for damaged archives
            raise TrainingError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); delete it to "
                                "resume from the one before") from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
        missing = sorted(set(self.parts) - set(state["parts"]))
        if missing:
            raise TrainingError(f"{path}: holds no state for {', '.join(missing)}")
        for name, part in self.parts.items():
            saved = state["parts"][name]
            set_model_state_dict(part.module, saved["model"], options=FULL_STATE)
            set_optimizer_state_dict(part.module, part.optimizer, saved["optimizer"], options=FULL_STATE)
            if part.ema is not None:
                if saved["ema"] is None:
                    raise TrainingError(f"{path}: holds no EMA of {name}")
                set_model_state_dict(part.ema, saved["ema"], options=FULL_STATE)
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state["extra"][name])
        if state["world_size"] == self.runtime.world_size:
            _set_rng_state(state["rng"][self.runtime.rank])
        self.step = state["step"]
        self.last_checkpoint = path


def _parameter_groups(module: nn.Module, weight_decay: float, decay_vectors: bool) -> list[dict[str, Any]]:
    """AdamW's parameter groups over the parameters that require a gradient: one, or (without
    decay_vectors) the 1-D parameters and biases without weight decay, then the rest with it."""
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if decay_vectors:
        return [{"params": [p for _, p in trained]}]
    exempt = [p.ndim <= 1 or name.endswith(".bias") for name, p in trained]
    return [{"params": [p for (_, p), no in zip(trained, exempt) if no], "weight_decay": 0.0},
            {"params": [p for (_, p), no in zip(trained, exempt) if not no], "weight_decay": weight_decay}]


def _matching_units(module: nn.Module, units: Iterable[nn.Module], copy_of_module: nn.Module) -> list[nn.Module]:
    """The submodules of `copy_of_module` at the names `units` have in `module`."""
    names = {id(m): name for name, m in module.named_modules()}
    copies = dict(copy_of_module.named_modules())
    return [copies[names[id(unit)]] for unit in units]


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0


def _rng_state() -> dict[str, Any]:
    """The global generators' states: torch's CPU and this process's CUDA device, Python's, NumPy's."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))


# ------------------------------------------------------------------------------------ run folder
RUN_CONFIG = "config.json"


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """"key.path: old -> new" for every leaf where two nested JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in config_differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def prepare_run_folder(out: Path, config: dict[str, Any], *, resume: bool, runtime: Runtime) -> Path | None:
    """Check the run folder before anything is written: a folder holding a run is refused without
    `resume`, and with it unless its config.json equals `config` (SetupError naming what
    differs). Then rank 0 writes config.json. Returns the newest checkpoint to resume from."""
    path = out / RUN_CONFIG
    if out.exists() and not out.is_dir():
        raise SetupError("out", f"{out} exists and is not a folder")
    checkpoint = None
    if path.exists():
        if not resume:
            raise SetupError("out", f"{out} holds a run ({RUN_CONFIG}); resume it or choose another folder")
        try:
            previous = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SetupError("out", f"{path} cannot be read ({exc})") from None
        changes = config_differences(previous, json.loads(json.dumps(config)))
        if changes:
            raise SetupError("out", f"{out} holds a run with another configuration ({'; '.join(changes)}); "
                                    "use another folder")
        checkpoints = sorted((out / CHECKPOINT_DIR).glob("step-*.pt"))
        checkpoint = checkpoints[-1] if checkpoints else None
    runtime.barrier()  # every rank has read the folder before rank 0 writes to it
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    runtime.barrier()
    return checkpoint


# ------------------------------------------------------------------------------------ backends
def attention_backend(attn: nn.Module, batch: int, tokens: int, device: torch.device,
                      autocast_dtype: torch.dtype | None) -> str:
    """The backend softvq_fast.nn.transformer.Attention `attn` picks for a training step on
    `batch` sequences of `tokens` (q, k, v in the autocast dtype, needing gradients); the op's
    NoBackendError when the backend it was set to cannot train."""
    from softvq_fast.ops.attention import BACKENDS, AttentionInputs

    inputs = AttentionInputs(device, autocast_dtype or torch.float32, True, batch, attn.num_heads, tokens, tokens,
                             attn.head_dim, True)
    return BACKENDS.select(inputs, attn.backend).name


def linear_backend(layer: nn.Module, rows: int, device: torch.device) -> str:
    """The backend softvq_fast.nn.linear.Linear `layer` picks for `rows` input rows (a micro-batch's
    tokens: `auto` may choose by size) that need a gradient."""
    from softvq_fast.ops.linear import select_backend

    # one row expanded: the choice reads the size, not the values
    x = torch.empty(1, layer.weight.shape[1], device=device, requires_grad=True).expand(rows, -1)
    weight = torch.empty(layer.weight.shape, device=device)
    with torch.enable_grad():
        return select_backend(x, weight, backend=layer.linear_backend).name


# On a GPU these mean a fast path is missing (a package, a dtype); on the CPU they are the fast paths.
SLOW_ON_CUDA = {"attention": {"math"}, "layernorm_modulate": {"reference"}, "soft_vq": {"reference"}}


def slow_backend_warnings(backends: dict[str, str], device: torch.device) -> list[str]:
    """A warning for each op of `backends` ({op: backend}) running its slow fallback on a GPU."""
    if device.type != "cuda":
        return []
    return [f"{op} runs on its {name} backend, the slow fallback on GPUs (see `softvq-fast env` for why the "
            f"fast ones cannot run here)" for op, name in backends.items() if name in SLOW_ON_CUDA.get(op, ())]


# ------------------------------------------------------------------------------------ files
def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) into a temporary file beside `path`, flushed to disk, then renamed over `path`
    (and the folder synced): a crash or a failed write leaves the old `path` or the new one,
    never part of one. The temporary file is removed when the write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def settings_dict(settings: Any) -> dict[str, Any]:
    """A dataclass of settings as JSON-able values (paths as strings, tuples as lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in asdict(settings).items()}
