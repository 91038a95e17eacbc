"""Training DUNs for any task (:mod:`lorun_fast.tasks`: block CS, CASSI, SR): the ``block``, ``shared`` and ``lorun``
strategies (docs/design.md, §5; the run folder and its guarantees: docs/training.md).

``lorun`` trains in two phases:

1. the base: by default the weight-tied (``shared``) K-stage DUN trained on the task for ``phase1_steps`` steps,
   or a given checkpoint (``base``: a lorun_fast ``shared``/``base`` file, or one phase of a ``block`` model such as
   a published ISTA-Net+ pickle, chosen with ``base_phase``);
2. the base is frozen and only the per-stage adapters, the step sizes ``rho`` and any ``per_stage`` base parameters
   are trained, end to end through all K stages.

Everything is MSE on random crops measured on the fly, as the task's plug-in defines them: gray crops of an image
folder (Train400 by default) zero-padded to whole 33×33 blocks for CS; 28-band crops of CAVE scenes measured with
a random crop of the mask for CASSI. Adam with a cosine schedule per phase, gradient clipping, float32 or bfloat16
autocast.

The data are a pure function of ``(seed, step)``, learning rates of the step, and the adapters' initialisation of
the seed, so a run stopped at any step and resumed (:meth:`Trainer.train` on the same folder) ends with exactly the
weights an uninterrupted run ends with. Under ``torchrun`` (DistributedDataParallel, gloo on CPUs, NCCL on GPUs)
every rank draws the same global batch and takes its slice: the averaged gradients are those of one process on the
whole batch.

A run folder holds::

    config.json                       the TrainConfig
    log.jsonl                         one JSON object per line: train / val / phase / resume / done events
    last.json                         points at the newest complete checkpoint (written last, atomically)
    checkpoints/step-NNNNNNN.safetensors  the model being trained (kind "model")
    checkpoints/step-NNNNNNN.state.pt     optimizer state, step, phase, RNG state, training time
    base.safetensors                  lorun: the frozen base (a complete shared DUN)
    adapters-<name>.safetensors       lorun: the trained adapter set
    model.safetensors                 the final model in one file
    summary.json                      steps, training time, parameter counts, last validation

Why one module of ~800 lines: the trainer's phases, checkpoints, resume and validation are kept together because
bit-exact resume depends on all of them at once (RNG state, optimizer state, phase boundaries and the log).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorun_fast.checkpoints import (import_ista_net_plus, load_dun, save_adapters, save_base, save_dun)
from lorun_fast.io import (TEMP_NAME, atomic_write_bytes, atomic_write_text, check_file_name, check_writable_folder,
                          remove_stale_temps)
from lorun_fast.models import (ModelConfig, base_of, build_dun, dataclass_from_dict, lorun_from, shared_from_block,
                               to_fast)
from lorun_fast.names import PRECISIONS, STRATEGIES, TRAIN_BACKENDS
from lorun_fast.reference import BlockCS, DUN
from lorun_fast.reference.lora_conv import check_alpha
from lorun_fast.tasks import TASK_NAMES, get_task

__all__ = ["TrainConfig", "Trainer", "lr_at", "run_training", "read_log", "check_run_folder", "base_architecture",
           "RUN_FILES"]

STATE_FORMAT = 1
#: The fields of the model part of a TrainConfig (``TrainConfig.model``); config.json files written before it was
#: nested hold them at the top level.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def _default_model() -> ModelConfig:
    return ModelConfig(backbone_kwargs={"channels": 16, "num_blocks": 1})


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run folder."""

    # the model: strategy, stages, backbone and the LoRA settings (for lorun, of phase 2)
    model: ModelConfig = field(default_factory=_default_model)
    # the task (lorun_fast.tasks): "cs", "cassi" or "sr"
    task_name: str = "cs"
    # cs: ISTA-Net's matrices for `ratio` (default), explicit files, or a seeded Gaussian Φ at `ratio`
    ratio: int | None = 25
    phi: str | None = None
    qinit: str | None = None
    gaussian_seed: int | None = None
    # cassi: the mask file (default: the shared one) and training-folder scenes left out (held out for testing)
    mask: str | None = None
    exclude: list = field(default_factory=list)
    # sr: the scale and the degradation ("bicubic", or "gaussian" blur of blur_sigma on blur_size² + decimation)
    scale: int = 4
    degradation: str = "bicubic"
    blur_sigma: float | None = None
    blur_size: int | None = None
    # lorun: the base (phase 1) — trained here for phase1_steps, or read from a checkpoint
    base: str | None = None
    base_phase: int | None = None
    steps: int = 1000
    phase1_steps: int | None = None
    # data
    train_images: str | None = None
    val_images: str | None = None
    val_every: int = 0
    val_limit: int | None = None
    crop: int = 66
    batch_size: int = 8
    augment: bool = True
    # optimisation
    lr: float = 1e-3
    lr_phase2: float | None = None
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    precision: str = "float32"
    backend: str = "auto"
    # bookkeeping
    log_every: int = 10
    checkpoint_every: int = 100
    adapter_name: str | None = None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The config of ``data``: ``to_dict``'s layout, or the flat one of config.json files written before the model
        fields were nested (``strategy``, ``num_stages``, ... at the top level); missing model fields take the
        defaults of ``TrainConfig().model``."""
        data = dict(data)
        flat = {name: data.pop(name) for name in MODEL_FIELDS if name in data}
        model = data.pop("model", {})
        if isinstance(model, ModelConfig):
            model = model.to_dict()
        if not isinstance(model, dict):
            raise ValueError(f"train config: model: expected a dict of model fields, got {type(model).__name__}")
        if flat and model:
            raise ValueError(f"train config: the model fields {sorted(flat)} are given both at the top level and in "
                             f"'model'; give them in 'model'")
        model = ModelConfig.from_dict({**_default_model().to_dict(), **model, **flat})
        return dataclass_from_dict(cls, {**data, "model": model}, "train config")

    # -- derived values -------------------------------------------------------------------------------------------
    def task(self) -> dict:
        """The task record every checkpoint of the run carries (see :mod:`lorun_fast.tasks`)."""
        return get_task(self.task_name).record(self)

    def resolved_phase1_steps(self) -> int:
        """Steps of phase 1: all of them for block/shared; for lorun ``phase1_steps`` (default half the steps, 0
        when a base is given)."""
        if self.model.strategy != "lorun":
            return self.steps
        if self.base:
            return 0
        return self.steps // 2 if self.phase1_steps is None else self.phase1_steps

    def resolved_adapter_name(self) -> str:
        if self.adapter_name:
            return self.adapter_name
        return get_task(self.task_name).default_adapter_name(self)

    def model_config(self, strategy: str | None = None) -> ModelConfig:
        """The model a phase builds: ``model`` as the task sees it (its input channels), with ``strategy`` (default
        the run's); the LoRA-only settings (rank, alpha, per_stage) are dropped for a strategy other than lorun."""
        strategy = strategy or self.model.strategy
        lorun = strategy == "lorun"
        kwargs = get_task(self.task_name).backbone_kwargs(self.model.backbone, self.model.backbone_kwargs)
        return dataclasses.replace(self.model, strategy=strategy, backbone_kwargs=kwargs,
                                   rank=self.model.rank if lorun else None, alpha=self.model.alpha if lorun else None,
                                   per_stage=self.model.per_stage if lorun else (),
                                   ranks=self.model.ranks if lorun else {})

    def validate(self) -> "TrainConfig":
        def need(ok, message):
            if not ok:
                raise ValueError(message)

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        model = self.model
        need(isinstance(model, ModelConfig), f"model: expected a ModelConfig, got {type(model).__name__}")
        need(model.strategy in STRATEGIES, f"strategy: expected one of {STRATEGIES}, got {model.strategy!r}")
        check_alpha(model.alpha)
        need(finite(model.gamma) and 0 < model.gamma <= 100, f"gamma: expected a percentage in (0, 100], got "
                                                              f"{model.gamma!r}")
        need(model.rank is None
             or (isinstance(model.rank, int) and not isinstance(model.rank, bool) and model.rank >= 1),
             f"rank: expected a positive int, got {model.rank!r}")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
             f"seed: expected an int ≥ 0, got {self.seed!r}")
        need(finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay: expected a finite number ≥ 0, got {self.weight_decay!r}")
        for name in ("lr", "lr_phase2"):
            value = getattr(self, name)
            need((value is None and name == "lr_phase2") or (finite(value) and value > 0),
                 f"{name}: expected a finite number > 0, got {value!r}")
        need(finite(self.min_lr_ratio), f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        need(self.grad_clip is None or finite(self.grad_clip),
             f"grad_clip: expected a finite number ≥ 0, got {self.grad_clip!r}")
        if self.adapter_name is not None:
            check_file_name(self.adapter_name, "adapter_name")
        need(not (self.val_every and not self.val_images),
             f"val_every: {self.val_every} needs val_images (a folder to validate on)")
        need(not (self.val_images and not self.val_every),
             "val_images: needs val_every > 0 (validate every N steps and at the end)")
        need(self.base_phase is None or (isinstance(self.base_phase, int) and self.base_phase >= 0),
             f"base_phase: expected an int ≥ 0, got {self.base_phase!r}")
        need(bool(model.targets) and all(isinstance(t, str) and t for t in model.targets),
             f"targets: expected one or more layer-name patterns, got {list(model.targets)!r}")
        for name in ("num_stages", "steps", "batch_size", "crop", "log_every"):
            value = getattr(model if name == "num_stages" else self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name}: expected a positive int, got {value!r}")
        for name in ("val_every", "checkpoint_every", "warmup_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name}: expected an int ≥ 0, got {value!r}")
        need(self.crop >= 8, f"crop: expected at least 8 pixels, got {self.crop}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip is None or self.grad_clip >= 0, f"grad_clip: expected ≥ 0, got {self.grad_clip}")
        need(self.precision in PRECISIONS, f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        need(self.backend in TRAIN_BACKENDS, f"backend: expected one of {TRAIN_BACKENDS}, got {self.backend!r}")
        need(not (self.precision == "bfloat16" and self.backend in ("merged", "triton")),
             "backend: the fused LoRA layers run in one dtype; with bfloat16 autocast use backend 'auto' or "
             "'reference'")
        need(self.task_name in TASK_NAMES, f"task_name: expected one of {TASK_NAMES}, got {self.task_name!r}")
        need(isinstance(self.exclude, (list, tuple)) and all(isinstance(e, str) for e in self.exclude),
             f"exclude: expected a list of scene names, got {self.exclude!r}")
        get_task(self.task_name).check(self, need)
        if model.strategy != "lorun":
            need(self.base is None, f"base: only the lorun strategy takes a base, not {model.strategy!r}")
            need(not model.per_stage, "per_stage: only the lorun strategy has per-stage base parameters")
            need(self.phase1_steps is None, "phase1_steps: only lorun has two phases")
        else:
            if self.base:
                need(self.phase1_steps in (None, 0), "phase1_steps: with a given base there is no phase 1")
            else:
                p1 = self.resolved_phase1_steps()
                need(0 < p1 < self.steps, f"phase1_steps: lorun needs 0 < phase1_steps < steps ({self.steps}), "
                                          f"got {p1} (or give a base)")
        need(self.base_phase is None or self.base, "base_phase: needs a base")
        if self.val_images is not None and self.val_every:
            need(self.val_limit is None or self.val_limit >= 1, "val_limit: expected ≥ 1")
        ModelConfig(**{**self.model_config().to_dict()})  # the model part is valid
        return self


def lr_at(step: int, start: int, end: int, lr: float, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """The learning rate of global ``step`` in a phase spanning steps [start, end): linear warm-up over ``warmup``
    steps, then a cosine from ``lr`` down to ``lr·min_ratio`` at the phase's last step."""
    t, total = step - start, max(1, end - start)
    warmup = min(warmup, total - 1)
    if t < warmup:
        return lr * (t + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (t - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------------
def read_log(path) -> list[dict]:
    """The events of a ``log.jsonl`` (a torn last line, from a crash mid-write, is skipped)."""
    events = []
    path = Path(path)
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


@contextlib.contextmanager
def _seeded(seed: int, stream: int):
    """Run a block under torch's global generator seeded from (seed, stream), restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))
        yield


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# The run folder: what a run may write, delete and resume
# ----------------------------------------------------------------------------------------------------------------
#: The files a run writes at the top of its folder; nothing else there is ever written or deleted.
RUN_FILES = re.compile(r"config\.json|log\.jsonl|last\.json|summary\.json|model\.safetensors|base\.safetensors"
                       r"|adapters-[A-Za-z0-9][A-Za-z0-9._+-]*\.safetensors")
#: The files a run writes in ``checkpoints/``.
CHECKPOINT_FILES = re.compile(r"step-\d{7}\.(?:safetensors|state\.pt)")


def _own_temp(name: str, owned: re.Pattern) -> bool:
    match = TEMP_NAME.match(name)
    return bool(match and owned.fullmatch(match.group("target")))


def _foreign_entries(run_dir: Path) -> list[str]:
    """Entries of a run folder that a run did not write (relative names)."""
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name == "checkpoints" and entry.is_dir() and not entry.is_symlink():
            foreign += [f"checkpoints/{e.name}" for e in sorted(entry.iterdir())
                        if not (e.is_file() and (CHECKPOINT_FILES.fullmatch(e.name)
                                                 or _own_temp(e.name, CHECKPOINT_FILES)))]
        elif not (entry.is_file() and (RUN_FILES.fullmatch(entry.name) or _own_temp(entry.name, RUN_FILES))):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def check_run_folder(run_dir, resume: bool) -> str:
    """What a run may do in ``run_dir``: ``"new"`` (missing or empty, or only a killed run's temp files),
    ``"restart"`` (``resume`` of a run that never reached a checkpoint: start over with its config.json) or
    ``"resume"`` (continue from ``last.json``). Anything else is refused, naming what is in the way: a run never
    writes into a folder holding files it did not write, and never over a run without being asked to resume it."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {run_dir}: exists and is not a folder")
    foreign = _foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise FileExistsError(f"run folder {run_dir}: holds files a training run did not write ({shown}); a run "
                              f"writes only into a new or empty folder, or into its own earlier run with --resume. "
                              f"Choose another folder")
    kept = [e.name for e in run_dir.iterdir() if not _own_temp(e.name, RUN_FILES)
            and not (e.name == "checkpoints" and not any(CHECKPOINT_FILES.fullmatch(c.name) for c in e.iterdir()))]
    if not kept:
        return "new"
    if not (run_dir / "config.json").is_file():
        raise FileExistsError(f"run folder {run_dir}: holds files named as a run names its own "
                              f"({', '.join(sorted(kept))}) but no config.json: they are not a run this command can "
                              f"continue (a user's files, or a run whose settings were deleted — its checkpoints "
                              f"still evaluate with eval --checkpoint). Choose another folder")
    if not resume:
        raise FileExistsError(f"run folder {run_dir}: already holds a training run; pass --resume to continue it, "
                              f"or choose another folder")
    return "resume" if (run_dir / "last.json").is_file() else "restart"


def read_recorded_config(run_dir) -> "TrainConfig":
    """The ``config.json`` of a run folder, with errors that name the file."""
    path = Path(run_dir) / "config.json"
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"resume: {path} cannot be read ({err})") from err
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"resume: {path} is corrupt ({type(err).__name__}: {err})") from err


def base_architecture(path) -> ModelConfig:
    """The ModelConfig of a ``--base`` file without building its operator: a lorun_fast file's recorded config, or
    an ISTA-Net+ pickle's (its channel width and phase count are read from the tensors)."""
    from lorun_fast.checkpoints import _config_from, read_header

    path = Path(path)
    if path.suffix == ".safetensors":
        metadata, _ = read_header(path)
        return _config_from(path, metadata)
    return import_ista_net_plus(path, BlockCS.gaussian(0.01)).config


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------
class Trainer:
    """One training run in ``run_dir`` (see the module docstring for the layout).

    ``rank``/``world_size`` > 1 need an initialised ``torch.distributed`` process group; only rank 0 writes files.
    """

    def __init__(self, config: TrainConfig, run_dir, *, device: str | torch.device | None = None, rank: int = 0,
                 world_size: int = 1, quiet: bool = False):
        self.config = config.validate()
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = rank, world_size
        self.distributed = world_size > 1
        if config.batch_size % world_size:
            raise ValueError(f"batch_size: {config.batch_size} is not divisible by the {world_size} processes")
        self.quiet = quiet or rank != 0
        if config.backend == "triton" and self.device.type != "cuda":
            from lorun_fast.kernels.settings import interpreting

            if not interpreting():
                raise ValueError(f"backend: 'triton' needs a CUDA device, but this run is on {self.device}; use "
                                 f"'auto' (merged on a CPU) or 'merged'")
        self.plugin = get_task(config.task_name)
        self.task = config.task()
        self.operator = self.plugin.training_operator(self.task, config)
        self.sampler = self.plugin.sampler(config)
        self.val_images = None
        if config.val_images and config.val_every:
            self.val_images = self.plugin.validation_files(config.val_images)[: config.val_limit]
        self.phase1_steps = config.resolved_phase1_steps()
        if config.model.strategy == "lorun" and config.base:
            self._load_base()  # a bad base (phase, stages, architecture, NaN) fails before the run folder is touched
        self.step = 0
        self.phase = 0
        self.model: DUN | None = None
        self.train_seconds = 0.0
        self.stop_requested = False
        self.last_val: dict | None = None

    # -- phases --------------------------------------------------------------------------------------------------
    def phase_range(self, phase: int) -> tuple[int, int]:
        if self.config.model.strategy != "lorun":
            return 0, self.config.steps
        return (0, self.phase1_steps) if phase == 1 else (self.phase1_steps, self.config.steps)

    def phase_lr(self, phase: int) -> float:
        if phase == 2 and self.config.lr_phase2 is not None:
            return self.config.lr_phase2
        return self.config.lr

    def lr(self, step: int) -> float:
        start, end = self.phase_range(self.phase)
        return lr_at(step, start, end, self.phase_lr(self.phase), self.config.warmup_steps, self.config.min_lr_ratio)

    def _load_base(self) -> DUN:
        """The frozen base of a lorun run given ``base``: a shared DUN."""
        cfg = self.config
        path = Path(cfg.base)
        if path.suffix == ".safetensors":
            model = load_dun(path, self.operator)
        else:
            model = import_ista_net_plus(path, self.operator)
        if model.strategy == "block":
            if cfg.base_phase is None:
                raise ValueError(f"base: {path} is a {model.num_stages}-stage block model; choose the stage to use "
                                 f"as the shared base with base_phase (--base-phase 0..{model.num_stages - 1})")
            if cfg.base_phase >= model.num_stages:
                raise ValueError(f"base_phase (--base-phase): {cfg.base_phase} is not a stage of {path}, which has "
                                 f"{model.num_stages} (0..{model.num_stages - 1})")
            model = shared_from_block(model, cfg.base_phase, cfg.model.num_stages)
        elif model.strategy == "lorun":
            model = base_of(model)
        elif cfg.base_phase is not None:
            raise ValueError(f"base_phase: {path} holds a shared DUN, which has no phases to choose from")
        if model.num_stages != cfg.model.num_stages:
            raise ValueError(f"base: {path} has {model.num_stages} stages; the run asks for {cfg.model.num_stages}")
        found = (model.config.backbone, model.config.backbone_kwargs)
        if found != (cfg.model.backbone, cfg.model.backbone_kwargs):
            raise ValueError(f"base: {path} is a {found[0]} {found[1]}; the run's config says {cfg.model.backbone} "
                             f"{cfg.model.backbone_kwargs} (take the base's: lorun_fast.train.base_architecture)")
        return model

    def _install(self, model: DUN, phase: int) -> None:
        """Make ``model`` the one being trained: device, fast layers, DDP, a fresh Adam over its trainable part."""
        cfg = self.config
        model = model.to(self.device, torch.float32).train()
        if model.strategy == "lorun" and cfg.backend != "reference" and cfg.precision == "float32":
            model = to_fast(model, backend=cfg.backend).train()
        self.model, self.phase = model, phase
        self.train_model = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.phase_lr(phase), weight_decay=cfg.weight_decay)

    def _enter_phase2(self, base: DUN) -> None:
        cfg = self.config
        with _seeded(cfg.seed, 2):
            m = cfg.model
            lorun = lorun_from(base_of(base), rank=m.rank, gamma=m.gamma, alpha=m.alpha, targets=m.targets,
                               per_stage=m.per_stage, ranks=m.ranks)
        if self.rank == 0:
            save_base(lorun, self.run_dir / "base.safetensors", self.task)
        self._install(lorun, 2)
        self._log({"event": "phase", "phase": 2, "step": self.step,
                   "parameters": self.model.parameter_counts()})

    def _initial_model(self) -> None:
        cfg = self.config
        if cfg.model.strategy == "lorun" and cfg.base:
            self._enter_phase2(self._load_base())
            return
        strategy = "shared" if cfg.model.strategy == "lorun" else cfg.model.strategy
        with _seeded(cfg.seed, 1):
            model = build_dun(self.operator, cfg.model_config(strategy))
        self._install(model, 1)
        self._log({"event": "phase", "phase": 1, "step": 0, "parameters": self.model.parameter_counts()})

    # -- one step ------------------------------------------------------------------------------------------------
    def local_batch(self, step: int):
        """This rank's slice of the global batch of ``step``."""
        return self.plugin.rank_slice(self.sampler.batch(step), self.rank, self.world_size)

    def loss(self, step: int) -> torch.Tensor:
        """MSE of the reconstruction of this rank's slice of the batch of ``step`` (the task's loss)."""
        bf16 = self.config.precision == "bfloat16"
        return self.plugin.loss(self.model, self.train_model, self.local_batch(step), self.device, bf16)

    def gradients(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """The (all-reduced) gradients of the batch of ``step`` (default: the next step) for the run in ``run_dir``
        as the training loop would compute them next (a fresh run, or the one its last checkpoint continues)."""
        if self.model is None:
            self.prepare(resume=True)
        step = self.step if step is None else step
        if self.config.model.strategy == "lorun" and self.phase == 1 and step >= self.phase1_steps:
            self._enter_phase2(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(step).backward()
        return {name: p.grad.detach().clone() for name, p in self.model.named_parameters() if p.grad is not None}

    def _train_step(self) -> tuple[float, float]:
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.step)
        loss.backward()
        clip = self.config.grad_clip if self.config.grad_clip else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(norm):
            raise FloatingPointError(f"step {self.step}: the gradient norm is {norm} (loss {float(loss):.3g}); lower "
                                     f"--lr or set --grad-clip")
        self.optimizer.step()
        return float(loss.detach()), norm

    # -- files ---------------------------------------------------------------------------------------------------
    def _log(self, event: dict) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        event = {**event, "time": round(time.time(), 3)}
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
            handle.flush()

    def has_checkpoint(self) -> bool:
        return (self.run_dir / "last.json").is_file()

    def save_checkpoint(self) -> None:
        """Weights, then optimizer/RNG state, then ``last.json`` pointing at both: each write is atomic and the
        pointer moves last, so a crash at any moment leaves the previous checkpoint complete and in use."""
        if self.rank != 0:
            return
        folder = self.run_dir / "checkpoints"
        tag = f"step-{self.step:07d}"
        save_dun(self.model, folder / f"{tag}.safetensors", self.task)
        state = {"format": STATE_FORMAT, "step": self.step, "phase": self.phase,
                 "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "train_seconds": self.train_seconds, "last_val": json.dumps(self.last_val)}
        atomic_write_bytes(folder / f"{tag}.state.pt", _torch_bytes(state))
        atomic_write_text(self.run_dir / "last.json", json.dumps(
            {"step": self.step, "phase": self.phase, "weights": f"checkpoints/{tag}.safetensors",
             "state": f"checkpoints/{tag}.state.pt"}, indent=1) + "\n")
        for old in folder.glob("step-*"):
            if not old.name.startswith(tag + "."):
                old.unlink(missing_ok=True)

    def _resume(self) -> None:
        pointer = self.run_dir / "last.json"
        try:
            last = json.loads(pointer.read_text(encoding="utf-8"))
            weights, state_path = self.run_dir / last["weights"], self.run_dir / last["state"]
            if not (CHECKPOINT_FILES.fullmatch(weights.name) and CHECKPOINT_FILES.fullmatch(state_path.name)
                    and weights.parent == state_path.parent == self.run_dir / "checkpoints"):
                raise KeyError("weights/state must name files in checkpoints/")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"resume: {pointer} is corrupt ({type(err).__name__}: {err})") from err
        model = load_dun(weights, self.operator)
        if not state_path.is_file():
            raise FileNotFoundError(f"resume: {state_path} (named by {pointer}) does not exist")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:
            from lorun_fast.checkpoints import safe_load_error

            raise ValueError(f"resume: {state_path} is not a readable training state ({safe_load_error(err)})") \
                from err
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("step") != last["step"]:
            raise ValueError(f"resume: {state_path} does not belong to step {last['step']} of {pointer}")
        strategy = self.config.model.strategy
        expected = "lorun" if state["phase"] == 2 else ("shared" if strategy == "lorun" else strategy)
        if model.strategy != expected:
            raise ValueError(f"resume: {weights} holds a {model.strategy!r} DUN; phase {state['phase']} of this run "
                             f"trains a {expected!r} one")
        self.step = int(state["step"])
        self._install(model, int(state["phase"]))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"resume: the optimizer state in {state_path} does not fit the model ({err})") from err
        torch.set_rng_state(state["torch_rng"])
        self.train_seconds = float(state["train_seconds"])
        self.last_val = json.loads(state.get("last_val", "null"))
        if self.rank == 0:  # events after the checkpoint are redone: drop them from the log
            kept = [e for e in read_log(self.run_dir / "log.jsonl") if e.get("step", 0) < self.step
                    or (e.get("step", 0) == self.step and e.get("event") != "phase")]
            atomic_write_text(self.run_dir / "log.jsonl", "".join(json.dumps(e) + "\n" for e in kept))
        self._log({"event": "resume", "step": self.step, "phase": self.phase})

    def _check_recorded_config(self) -> None:
        recorded = read_recorded_config(self.run_dir).to_dict()
        current = self.config.to_dict()
        changed = [f"{k}: recorded {recorded[k]!r}, given {current[k]!r}" for k in current if recorded.get(k) != current[k]]
        if changed:
            raise ValueError(f"resume: {self.run_dir / 'config.json'} records another run ({'; '.join(changed)}); "
                             f"resume with the recorded config")

    def _clean_and_probe(self, kind: str) -> None:
        """Remove what a kill left behind (this run's own temp files and checkpoint files no pointer names), then
        prove the run and checkpoint folders writable before any step is spent."""
        folder = self.run_dir / "checkpoints"
        remove_stale_temps(self.run_dir, RUN_FILES)
        remove_stale_temps(folder, CHECKPOINT_FILES)
        if kind == "resume" and folder.is_dir():
            try:
                last = json.loads((self.run_dir / "last.json").read_text(encoding="utf-8"))
                named = {Path(last["weights"]).name, Path(last["state"]).name}
            except (OSError, ValueError, KeyError, TypeError):
                named = None  # _resume reports the corrupt pointer; delete nothing on a guess
            for entry in folder.iterdir() if named else ():
                if CHECKPOINT_FILES.fullmatch(entry.name) and entry.name not in named:
                    entry.unlink(missing_ok=True)
        check_writable_folder(self.run_dir, "run folder")
        check_writable_folder(folder, "checkpoint folder")

    def prepare(self, resume: bool = True) -> None:
        """Resume from ``run_dir``'s last checkpoint when there is one (and ``resume``), else start fresh.

        Refuses a folder holding anything a run did not write, and an earlier run unless ``resume`` (see
        :func:`check_run_folder`)."""
        if self.rank == 0:
            kind = check_run_folder(self.run_dir, resume)
            if kind != "new":
                self._check_recorded_config()
            self._clean_and_probe(kind)
        else:  # rank 0 is writing config.json and log.jsonl meanwhile; last.json only comes after the first steps
            kind = "resume" if resume and self.has_checkpoint() else "new"
        if kind == "resume":
            self._resume()
            return
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.json", json.dumps(self.config.to_dict(), indent=1) + "\n")
            (self.run_dir / "log.jsonl").unlink(missing_ok=True)
        self._log({"event": "start", "config": self.config.to_dict(), "task": self.task,
                   "world_size": self.world_size, "device": str(self.device), "torch": torch.__version__})
        self._initial_model()

    def validate(self) -> dict | None:
        """Mean PSNR/SSIM with the ISTA-Net protocol on the validation images (rank 0)."""
        if self.rank != 0 or not self.val_images:
            return None
        from lorun_fast.evaluate import mean_scores

        results = self.plugin.validate(self.model, self.val_images, str(self.device), self.config)
        self.model.train()
        psnr, ssim = mean_scores(results)
        self.last_val = {"step": self.step, "psnr": psnr, "ssim": ssim}
        self._log({"event": "val", **self.last_val, "images": len(results)})
        return self.last_val

    def _finish(self) -> dict:
        cfg = self.config
        summary = {"strategy": cfg.model.strategy, "steps": self.step, "train_seconds": self.train_seconds,
                   "phase1_steps": self.phase1_steps if cfg.model.strategy == "lorun" else None,
                   "parameters": self.model.parameter_counts(), "last_val": self.last_val, "files": ["model.safetensors"]}
        if self.rank == 0:
            save_dun(self.model, self.run_dir / "model.safetensors", self.task)
            if self.model.strategy == "lorun":
                name = f"adapters-{cfg.resolved_adapter_name()}.safetensors"
                save_adapters(self.model, self.run_dir / name, cfg.resolved_adapter_name(), self.task)
                summary["files"] += ["base.safetensors", name]
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        self._log({"event": "done", "step": self.step, "train_seconds": self.train_seconds})
        return summary

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None, resume: bool = True) -> dict | None:
        """Train to ``config.steps`` (returns the summary) or until ``stop_at`` / ``stop_requested`` (saves a
        checkpoint and returns None)."""
        cfg = self.config
        if self.model is None:
            self.prepare(resume)
        if self.step >= cfg.steps:
            if self.rank == 0 and not (self.run_dir / "summary.json").is_file():
                return self._finish()
            return json.loads((self.run_dir / "summary.json").read_text()) if self.rank == 0 else None
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.quiet, desc=f"{cfg.model.strategy}", unit="step",
                   dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                if cfg.model.strategy == "lorun" and self.phase == 1 and self.step >= self.phase1_steps:
                    self._enter_phase2(self.model)
                start = time.perf_counter()
                loss, norm = self._train_step()
                self.train_seconds += time.perf_counter() - start
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    if self.distributed:
                        import torch.distributed as dist

                        total = torch.tensor([loss], device=self.device)
                        dist.all_reduce(total)
                        loss = float(total) / self.world_size
                    psnr = -10 * math.log10(max(loss, 1e-12))
                    event = {"event": "train", "step": self.step, "phase": self.phase, "loss": loss, "psnr": psnr,
                             "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                             "train_seconds": round(self.train_seconds, 3)}
                    self._log(event)
                    bar.set_postfix(phase=self.phase, loss=f"{loss:.2e}", psnr=f"{psnr:.2f}", lr=f"{event['lr']:.1e}")
                if cfg.val_every and self.step % cfg.val_every == 0 and self.step < cfg.steps:
                    val = self.validate()
                    if val is not None:
                        bar.write(f"step {self.step}: validation PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}")
                phase_end = cfg.model.strategy == "lorun" and self.phase == 1 and self.step == self.phase1_steps
                if self.distributed:  # a signal may reach the ranks at different steps: stop together
                    import torch.distributed as dist

                    flag = torch.tensor([float(self.stop_requested)], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    self.stop_requested = bool(flag.item())
                stop = self.stop_requested or (stop_at is not None and self.step >= stop_at)
                periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if periodic or phase_end or stop or self.step == cfg.steps:
                    self.save_checkpoint()
                if stop and self.step < cfg.steps:
                    self._log({"event": "stopped", "step": self.step})
                    return None
        finally:
            bar.close()
        if cfg.val_every and self.val_images:
            self.validate()
        return self._finish()


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def run_training(config: TrainConfig, run_dir, *, device: str | None = None, resume: bool = False,
                 stop_at: int | None = None, quiet: bool = False, install_signal_handlers: bool = False):
    """Train in this process, or as one rank of ``torchrun`` (it sets WORLD_SIZE, RANK and LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world_size > 1
    if distributed:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        else:
            device = "cpu"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        trainer = Trainer(config, run_dir, device=device, rank=rank, world_size=world_size, quiet=quiet)
        if install_signal_handlers:
            import signal

            def request_stop(signum, frame):
                trainer.stop_requested = True

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, request_stop)
        return trainer, trainer.train(stop_at=stop_at, resume=resume)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
