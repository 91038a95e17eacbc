"""Block compressive sensing (ISTA-Net convention) as a task: its operator from files or a seeded Gaussian Φ,
random gray crops measured on the fly, and the ISTA-Net evaluation protocol (:mod:`lorun_fast.evaluate`).

Records: ``{"ratio": 25}`` (ISTA-Net's Φ and Qinit under the data folder), ``{"phi": path, "qinit": path or
None}``, or ``{"gaussian_ratio": 0.25, "seed": 0}``; checkpoints written before tasks had names record exactly these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorun_fast.io import data_root, list_images, read_gray
from lorun_fast.reference import BlockCS

__all__ = ["TASK", "CSTask", "PatchSampler", "operator_from_task"]


def operator_from_task(task: dict) -> BlockCS:
    """The block-CS operator of a task dict: ``{"ratio": 25}`` (ISTA-Net's Φ and Qinit under the data folder),
    ``{"phi": path, "qinit": path or None}``, or ``{"gaussian_ratio": 0.25, "seed": 0}`` (a seeded Gaussian Φ)."""
    if not isinstance(task, dict):
        raise ValueError(f"task: expected a dict, got {type(task).__name__}")
    if task.get("phi"):
        return BlockCS.from_mat(task["phi"], task.get("qinit"))
    if task.get("gaussian_ratio") is not None:
        return BlockCS.gaussian(float(task["gaussian_ratio"]), seed=int(task.get("seed", 0)))
    if task.get("ratio") is not None:
        folder = data_root() / "cs_sampling"
        phi = folder / f"phi_0_{int(task['ratio'])}_1089.mat"
        qinit = folder / f"Initialization_Matrix_{int(task['ratio'])}.mat"
        if not phi.is_file():
            raise FileNotFoundError(f"ratio {task['ratio']}: no sampling matrix {phi} (set LORUN_DATA, or give "
                                    f"--phi / --gaussian)")
        return BlockCS.from_mat(phi, qinit if qinit.is_file() else None)
    raise ValueError(f"task: expected 'ratio', 'phi' or 'gaussian_ratio', got {sorted(task)}")


class PatchSampler:
    """Random crops (with the 8 flips/rotations) of images held in memory, a pure function of ``(seed, step)``."""

    def __init__(self, images: list[np.ndarray], crop: int, batch_size: int, seed: int = 0, augment: bool = True,
                 names: list[str] | None = None):
        if not images:
            raise ValueError("train images: none given")
        small = [(names[i] if names else str(i), im.shape) for i, im in enumerate(images)
                 if im.shape[0] < crop or im.shape[1] < crop]
        if small:
            raise ValueError(f"crop: {crop}×{crop} is larger than {len(small)} training image(s), e.g. "
                             f"{small[0][0]} of size {small[0][1][0]}×{small[0][1][1]}; use a smaller --crop")
        self.images, self.crop, self.batch_size, self.seed, self.augment = images, crop, batch_size, seed, augment

    @classmethod
    def from_folder(cls, folder, crop: int, batch_size: int, seed: int = 0, augment: bool = True) -> "PatchSampler":
        paths = list_images(folder)
        return cls([read_gray(p) for p in paths], crop, batch_size, seed, augment, [p.name for p in paths])

    def batch(self, step: int) -> torch.Tensor:
        """The global batch of ``step``: (batch_size, 1, crop, crop) float32 in [0, 1]."""
        rng = np.random.default_rng([self.seed, step])
        c = self.crop
        patches = []
        for index in rng.integers(len(self.images), size=self.batch_size):
            image = self.images[index]
            top = rng.integers(image.shape[0] - c + 1)
            left = rng.integers(image.shape[1] - c + 1)
            k = int(rng.integers(8))
            patch = image[top:top + c, left:left + c]
            if self.augment:
                patch = np.rot90(patch, k % 4)
                if k >= 4:
                    patch = patch[:, ::-1]
            patches.append(np.ascontiguousarray(patch))
        return torch.from_numpy(np.stack(patches)[:, None].astype(np.float32) / 255.0)


class CSTask:
    """Block CS: gray images, one channel."""

    name = "cs"
    default_crop = 66

    def record(self, config) -> dict:
        if config.phi:
            return {"phi": str(Path(config.phi).absolute()),
                    "qinit": str(Path(config.qinit).absolute()) if config.qinit else None}
        if config.gaussian_seed is not None:
            return {"gaussian_ratio": config.ratio / 100, "seed": config.gaussian_seed}
        return {"ratio": config.ratio}

    def operator(self, record: dict) -> BlockCS:
        return operator_from_task({k: v for k, v in record.items() if k != "task"})

    def training_operator(self, record: dict, config) -> BlockCS:
        return self.operator(record)

    def backbone_kwargs(self, backbone: str, kwargs: dict) -> dict:
        return dict(kwargs)

    def default_train_images(self) -> str:
        return str(data_root() / "Train400")

    def default_adapter_name(self, config) -> str:
        return f"cs{config.ratio}" if config.ratio is not None and not config.phi else "default"

    def sampler(self, config) -> PatchSampler:
        return PatchSampler.from_folder(config.train_images or self.default_train_images(), config.crop,
                                        config.batch_size, config.seed, config.augment)

    def rank_slice(self, batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        per = batch.shape[0] // world_size
        return batch[rank * per:(rank + 1) * per]

    def loss(self, model, train_model, batch: torch.Tensor, device, bf16: bool) -> torch.Tensor:
        """MSE of the reconstruction of crops zero-padded to whole blocks, on the crop."""
        x = batch.to(device)
        h, w = x.shape[-2:]
        hp, wp = model.operator.padded_size((h, w))
        with torch.no_grad():
            y = model.operator.A(F.pad(x, (0, wp - w, 0, hp - h)))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            x_hat = train_model(y, (hp, wp))
        return F.mse_loss(x_hat.float()[..., :h, :w], x)

    def validation_files(self, folder) -> list[Path]:
        return list_images(folder)

    def check(self, config, need) -> None:
        """The CS part of ``TrainConfig.validate``."""
        need(config.phi is not None or config.ratio is not None, "task: give a ratio (percent) or a phi file")
        need(config.ratio is None or 0 < config.ratio <= 100, f"ratio: expected a percentage in (0, 100], got "
                                                                f"{config.ratio}")
        need(config.gaussian_seed is None or config.ratio is not None, "gaussian_seed: needs a ratio")
        need(config.qinit is None or config.phi is not None, "qinit: needs phi")
        need(config.mask is None and not config.exclude, "mask, exclude: only the cassi task has them")
        need(config.degradation == "bicubic" and config.blur_sigma is None and config.blur_size is None,
             "degradation, blur_sigma, blur_size: only the sr task has them")

    def validate(self, model, paths, device: str, config):
        from lorun_fast.evaluate import evaluate_cs

        return evaluate_cs(model, paths, device=device)


TASK = CSTask()
