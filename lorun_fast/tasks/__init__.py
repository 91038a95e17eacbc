"""Task plug-ins: everything task-specific about one restoration problem lives in one module.

Each module (``cs``, ``cassi``, ``sr``) defines ``TASK``, an object with:

- ``name``: the task's name (what ``--task`` takes and what checkpoints record as ``{"task": name, ...}``);
- ``record(config)``: the task record a training run writes into its checkpoints (files, ratios, mask, ...);
- ``operator(record)`` / ``training_operator(record, config)``: the degradation operator for evaluation and for
  the training crops;
- ``backbone_kwargs(backbone, kwargs)``: the backbone's input channels (1 for gray images, 28 for CASSI cubes);
- ``sampler(config)``: training batches, a pure function of ``(seed, step)``;
- ``rank_slice(batch, rank, world_size)`` and ``loss(model, train_model, batch, device, bf16)``;
- ``validate(model, paths, device)``: the task's evaluation protocol on held-out files (``ImageResult`` rows);
- ``default_crop``, ``default_train_images()`` and ``default_adapter_name(config)``.

CS checkpoints written before tasks existed record no ``"task"``: they are ``cs``.
"""
from __future__ import annotations

import importlib

__all__ = ["TASK_NAMES", "task_name_of", "get_task", "operator_from_record"]

#: Tasks that train, evaluate and restore end to end.
TASK_NAMES = ("cs", "cassi", "sr")


def task_name_of(record: dict | None) -> str:
    """The task a checkpoint's record names (``cs`` for records from before tasks had names)."""
    if record is None:
        return "cs"
    if not isinstance(record, dict):
        raise ValueError(f"task: expected a dict, got {type(record).__name__}")
    return record.get("task", "cs")


def get_task(name: str):
    """The ``TASK`` object of task ``name``."""
    if name not in TASK_NAMES:
        raise ValueError(f"task: expected one of {TASK_NAMES}, got {name!r}")
    return importlib.import_module(f"lorun_fast.tasks.{name}").TASK


def operator_from_record(record: dict):
    """The evaluation operator of a checkpoint's task record."""
    return get_task(task_name_of(record)).operator(record)
