"""DUN checkpoints: published ISTA-Net+ pickles and lorun_fast's own safetensors files.

lorun_fast writes three kinds of safetensors files, each with its :class:`ModelConfig` as JSON metadata
(``lorun_fast.config``) and its kind (``lorun_fast.kind``):

- ``model``: every parameter of one DUN (:func:`save_dun` / :func:`load_dun`);
- ``base``: a complete ``shared`` DUN whose denoiser is the frozen base of LoRun models (:func:`save_base`); it
  loads and evaluates on its own, as the weight-tied model;
- ``adapters``: one adapter set of a ``lorun`` DUN — the LoRA A/B of every stage, the step sizes ``rho`` and any
  per-stage base parameters — with the SHA-256 of the base it was trained on (:func:`save_adapters`). One base
  serves any number of adapter sets (one per CS ratio, say): :func:`load_lorun` puts them together.

Every write is atomic (:mod:`lorun_fast.io`): a crash mid-write leaves the previous file as it was.
Optional task metadata (``lorun_fast.task``: the CS ratio, matrix files or Gaussian seed) lets ``eval`` and
``restore`` rebuild the operator without being told.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from lorun_fast.models import ModelConfig, StagedDUN, build_dun
from lorun_fast.reference import DUN, ISTANetPlusPhase, Operator

__all__ = ["load_torch_state_dict", "import_ista_net_plus", "load_dun", "save_dun", "load_any_dun", "CONFIG_KEY",
           "KIND_KEY", "TASK_KEY", "BASE_HASH_KEY", "save_base", "save_adapters", "load_adapters", "load_lorun",
           "load_model", "read_header", "base_fingerprint", "task_of", "check_tensors", "safe_load_error"]

CONFIG_KEY = "lorun_fast.config"
KIND_KEY = "lorun_fast.kind"
TASK_KEY = "lorun_fast.task"
BASE_HASH_KEY = "lorun_fast.base_sha256"
NAME_KEY = "lorun_fast.adapter_name"
KINDS = ("model", "base", "adapters")
_ISTA_CONVS = ("conv_D", "conv1_forward", "conv2_forward", "conv1_backward", "conv2_backward", "conv_G")
_ISTA_KEY = re.compile(r"fcs\.(\d+)\.(\w+)")


def load_torch_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from a torch pickle (legacy or zip), loaded safely on the CPU, ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint: {path} is not a readable torch checkpoint of tensors "
                         f"({safe_load_error(err)}); it is never loaded with weights_only=False, which would run "
                         f"code from the file") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {path} does not hold a state dict of tensors")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    check_tensors(path, state)
    return state


def safe_load_error(err: BaseException) -> str:
    """The type and first line of a ``torch.load`` failure, without torch's advice to retry with
    ``weights_only=False`` (that would execute whatever the file holds)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line and "weights-only" not in line.lower()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors a model cannot hold as they are: integer, bool or complex ones (a copy into a float
    parameter would cast them silently) and non-finite values (they would give NaN reconstructions)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint: {path} tensor {name!r} has dtype {tensor.dtype}; expected floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"checkpoint: {path} tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of "
                             f"{tensor.numel()}")


def import_ista_net_plus(path, operator: Operator) -> DUN:
    """A ``block``-strategy DUN of ISTA-Net+ phases holding a published ISTA-Net+ checkpoint.

    The checkpoint's ``fcs.k.lambda_step`` becomes ``rho[k]``; ``soft_thr`` and the six convolutions go to the
    k-th denoiser. The number of phases and the channel width are read from the file.
    """
    state = load_torch_state_dict(path)
    phases: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _ISTA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"checkpoint: {path} has key {key!r}, which is not an ISTA-Net+ key 'fcs.<k>.<name>'")
        phases.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not phases or sorted(phases) != list(range(len(phases))):
        raise ValueError(f"checkpoint: {path} has phases {sorted(phases)}; expected 0..K-1")
    expected = set(_ISTA_CONVS) | {"lambda_step", "soft_thr"}
    channels = phases[0].get("conv_D", torch.empty(0, 1, 3, 3)).shape[0]
    shapes = {"conv_D": (channels, 1, 3, 3), "conv_G": (1, channels, 3, 3),
              **{name: (channels, channels, 3, 3) for name in _ISTA_CONVS[1:5]}}
    denoisers = []
    for k in range(len(phases)):
        phase = phases[k]
        if set(phase) != expected:
            raise ValueError(f"checkpoint: {path} phase {k} has {sorted(phase)}; expected {sorted(expected)}")
        for name, shape in shapes.items():
            if tuple(phase[name].shape) != shape:
                raise ValueError(f"checkpoint: {path} fcs.{k}.{name} has shape {tuple(phase[name].shape)}; "
                                 f"expected {shape}")
        for name in ("lambda_step", "soft_thr"):
            if phase[name].numel() != 1:
                raise ValueError(f"checkpoint: {path} fcs.{k}.{name} should hold one number, got shape "
                                 f"{tuple(phase[name].shape)}")
        denoiser = ISTANetPlusPhase(channels=channels, block_size=getattr(operator, "block_size", 33))
        with torch.no_grad():
            denoiser.soft_thr.copy_(phase["soft_thr"].reshape(()))
            for name in _ISTA_CONVS:
                getattr(denoiser, name).weight.copy_(phase[name])
        denoisers.append(denoiser)
    model = DUN(operator, denoisers, len(denoisers), "block", step_init=0.0)
    with torch.no_grad():
        model.rho.copy_(torch.stack([phases[k]["lambda_step"].reshape(()) for k in range(len(phases))]))
    model.__class__ = StagedDUN  # same computation; StagedDUN is what build_dun makes
    model.collect_adapters()
    model.config = ModelConfig(strategy="block", num_stages=len(denoisers), backbone="ista_net_plus",
                               backbone_kwargs={"channels": channels})
    return model


def _write(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    from lorun_fast.io import atomic_write_bytes

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _metadata(config: ModelConfig, kind: str, task: dict | None, extra: dict | None = None) -> dict[str, str]:
    metadata = {CONFIG_KEY: json.dumps(config.to_dict()), KIND_KEY: kind}
    if task is not None:
        metadata[TASK_KEY] = json.dumps(task)
    metadata.update(extra or {})
    return metadata


def _config_of(model: DUN) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("model: has no ModelConfig (build it with lorun_fast.models.build_dun)")
    return config


def save_dun(model: DUN, path, task: dict | None = None) -> None:
    """One safetensors file: every parameter of the DUN (not the operator's data) and its config as JSON."""
    config = _config_of(model)
    _write(dict(model.named_parameters()), path, _metadata(config, "model", task))


def base_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a base denoiser's tensors (``rho`` excluded: the step
    sizes belong to each adapter set)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if name == "rho":
            continue
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_base(model: DUN, path, task: dict | None = None) -> str:
    """The shared base of a ``lorun`` (or ``shared``) DUN as a complete ``shared`` DUN file; returns its
    fingerprint (what :func:`save_adapters` records)."""
    from lorun_fast.models import base_of

    shared = base_of(model)
    tensors = dict(shared.named_parameters())
    _write(tensors, path, _metadata(_config_of(shared), "base", task))
    return base_fingerprint(tensors)


def save_adapters(model: DUN, path, name: str | None = None, task: dict | None = None) -> None:
    """One adapter set of a ``lorun`` DUN (LoRA A/B per stage, ``rho``, per-stage offsets) with the fingerprint of
    its base; the base itself goes to :func:`save_base`."""
    from lorun_fast.models import adapter_state, base_state

    config = _config_of(model)
    extra = {BASE_HASH_KEY: base_fingerprint(base_state(model))}
    if name:
        extra[NAME_KEY] = name
    _write(adapter_state(model), path, _metadata(config, "adapters", task, extra))


def read_header(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a lorun_fast safetensors file, with errors that name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise ValueError(f"checkpoint: {path} is not a readable safetensors file ({type(err).__name__}: {err})") \
            from err
    check_tensors(path, tensors)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"checkpoint: {path} has no {CONFIG_KEY!r} metadata; was it written by lorun_fast?")
    kind = metadata.get(KIND_KEY, "model")
    if kind not in KINDS:
        raise ValueError(f"checkpoint: {path} is of unknown kind {kind!r}; expected one of {KINDS}")
    try:
        json.loads(metadata[CONFIG_KEY])
        if TASK_KEY in metadata:
            json.loads(metadata[TASK_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint: {path} has corrupt JSON metadata ({err})") from err
    return metadata, tensors


def _config_from(path, metadata: dict[str, str]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint: {path} has an invalid config ({err})") from err


def _copy_checked(path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        def show(items):
            return f"{items[:5]}{f' and {len(items) - 5} more' if len(items) > 5 else ''}"
        raise ValueError(f"checkpoint: {path} does not match {what}: missing {show(missing)}, "
                         f"unexpected {show(unexpected)}, wrong shapes {show(wrong)}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])


def task_of(path) -> dict | None:
    """The task metadata of a lorun_fast file (None for other files or when absent)."""
    if Path(path).suffix != ".safetensors":
        return None
    metadata, _ = read_header(path)
    return json.loads(metadata[TASK_KEY]) if TASK_KEY in metadata else None


def load_dun(path, operator: Operator) -> DUN:
    """A DUN from a ``model`` or ``base`` file; says which tensors are missing, unexpected or of the wrong shape."""
    metadata, tensors = read_header(path)
    if metadata.get(KIND_KEY) == "adapters":
        raise ValueError(f"checkpoint: {path} is an adapter set, not a model; load it on its base "
                         f"(eval --checkpoint BASE --adapters {Path(path).name})")
    config = _config_from(path, metadata)
    try:
        model = build_dun(operator, config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint: {path} has a config that builds no model ({err})") from err
    _copy_checked(path, tensors, dict(model.named_parameters()), "its config")
    return model


def load_adapters(base: DUN, path) -> DUN:
    """A ``lorun`` DUN: the ``shared`` DUN ``base`` (frozen) plus the adapter set in ``path``. Refuses adapters
    trained on another base (by fingerprint) or for another backbone or stage count, saying which."""
    from lorun_fast.models import adapter_state, base_state, lorun_from

    metadata, tensors = read_header(path)
    if metadata.get(KIND_KEY) != "adapters":
        raise ValueError(f"adapters: {path} is a {metadata.get(KIND_KEY, 'model')!r} file, not an adapter set")
    config = _config_from(path, metadata)
    base_config = getattr(base, "config", None)
    if base.strategy != "shared":
        raise ValueError(f"adapters: the base must be a 'shared' DUN, got strategy {base.strategy!r}")
    if base_config is not None and (config.backbone, config.backbone_kwargs, config.num_stages) != \
            (base_config.backbone, base_config.backbone_kwargs, base_config.num_stages):
        raise ValueError(f"adapters: {path} is for backbone {config.backbone} {config.backbone_kwargs} with "
                         f"{config.num_stages} stages; the base is {base_config.backbone} "
                         f"{base_config.backbone_kwargs} with {base_config.num_stages} stages")
    try:
        model = lorun_from(base, rank=config.rank, gamma=config.gamma, alpha=config.alpha, targets=config.targets,
                           per_stage=config.per_stage, ranks=config.ranks)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapters: {path} has a config that builds no model on this base ({err})") from err
    expected_hash = metadata.get(BASE_HASH_KEY)
    if expected_hash is not None:
        actual = base_fingerprint(base_state(model))
        if actual != expected_hash:
            raise ValueError(f"adapters: {path} was trained on another base (base SHA-256 {expected_hash[:12]}…, "
                             f"this base {actual[:12]}…)")
    wanted = {name: p for name, p in model.named_parameters() if name in adapter_state(model)}
    _copy_checked(path, tensors, wanted, "the adapters of its config on this base")
    return model


def load_lorun(base_path, adapters_path, operator: Operator) -> DUN:
    """A ``lorun`` DUN from a base file (or any file holding a ``shared`` DUN) and one adapter set."""
    return load_adapters(load_dun(base_path, operator), adapters_path)


def load_model(path, operator: Operator, adapters=None) -> DUN:
    """Any checkpoint: a lorun_fast file, a published ISTA-Net+ pickle, or a base plus an adapter set."""
    if adapters is not None:
        if Path(path).suffix != ".safetensors":
            raise ValueError(f"checkpoint: {path}: --adapters needs a lorun_fast base (.safetensors)")
        return load_lorun(path, adapters, operator)
    return load_any_dun(path, operator)


def load_any_dun(path, operator: Operator) -> DUN:
    """``load_dun`` for ``.safetensors`` files, ``import_ista_net_plus`` for torch pickles."""
    if Path(path).suffix == ".safetensors":
        return load_dun(path, operator)
    return import_ista_net_plus(path, operator)
