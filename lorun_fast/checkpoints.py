"""Reading DUN checkpoints: published ISTA-Net+ pickles and lorun_fast's own safetensors files."""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from lorun_fast.models import ModelConfig, build_dun
from lorun_fast.reference import DUN, ISTANetPlusPhase, Operator

__all__ = ["load_torch_state_dict", "import_ista_net_plus", "load_dun", "save_dun", "load_any_dun", "CONFIG_KEY"]

CONFIG_KEY = "lorun_fast.config"
_ISTA_CONVS = ("conv_D", "conv1_forward", "conv2_forward", "conv1_backward", "conv2_backward", "conv_G")
_ISTA_KEY = re.compile(r"fcs\.(\d+)\.(\w+)")


def load_torch_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from a torch pickle (legacy or zip), loaded safely on the CPU, ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"checkpoint: {path} is not a readable torch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {path} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


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
    model.config = ModelConfig(strategy="block", num_stages=len(denoisers), backbone="ista_net_plus",
                               backbone_kwargs={"channels": channels})
    return model


def save_dun(model: DUN, path) -> None:
    """One safetensors file: every parameter of the DUN (not the operator's data) and its config as JSON."""
    from safetensors.torch import save

    from lorun_fast.io import atomic_write_bytes

    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("model: has no ModelConfig (build it with lorun_fast.models.build_dun)")
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    atomic_write_bytes(path, save(tensors, metadata={CONFIG_KEY: json.dumps(config.to_dict())}))


def load_dun(path, operator: Operator) -> DUN:
    """A DUN from ``save_dun``'s file; says which tensors are missing, unexpected or of the wrong shape."""
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
    if CONFIG_KEY not in metadata:
        raise ValueError(f"checkpoint: {path} has no {CONFIG_KEY!r} metadata; was it written by lorun_fast?")
    model = build_dun(operator, ModelConfig.from_dict(json.loads(metadata[CONFIG_KEY])))
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint: {path} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])
    return model


def load_any_dun(path, operator: Operator) -> DUN:
    """``load_dun`` for ``.safetensors`` files, ``import_ista_net_plus`` for torch pickles."""
    if Path(path).suffix == ".safetensors":
        return load_dun(path, operator)
    return import_ista_net_plus(path, operator)
