"""``eval --task cassi|sr``: the task modules behind the CLI (synthetic cubes; Set5 and CAVE when the data is there)."""
import csv

import numpy as np
import pytest
import scipy.io
import torch

from lorun_fast.checkpoints import save_dun
from lorun_fast.cli import main
from lorun_fast.models import ModelConfig, build_dun
from lorun_fast.reference import CASSI

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def cubes(tmp_path):
    """Two smooth 32×32×28 cubes (.npy, H×W×B in [0, 1]) and a 32×32 mask .mat."""
    folder = tmp_path / "cubes"
    folder.mkdir()
    yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
    for i in range(2):
        bands = [0.5 + 0.4 * np.sin(3 * xx + 2 * yy * (i + 1) + 0.1 * b) for b in range(28)]
        np.save(folder / f"scene{i}.npy", np.stack(bands, axis=-1))
    mask = np.random.default_rng(0).random((32, 32))
    scipy.io.savemat(tmp_path / "mask.mat", {"mask": mask})
    return folder, tmp_path / "mask.mat"


def _rows(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def test_cassi_x0_and_gap_tv(cubes, tmp_path, capsys):
    folder, mask = cubes
    scores = {}
    for method in ("x0", "gap-tv"):
        out = tmp_path / method
        assert main(["eval", "--task", "cassi", "--method", method, "--images", str(folder), "--mask", str(mask),
                     "--gap-iterations", "20", "--out", str(out), "--quiet"] if method == "gap-tv" else
                    ["eval", "--task", "cassi", "--method", method, "--images", str(folder), "--mask", str(mask),
                     "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
        rows = _rows(out / "results.csv")
        assert [r["image"] for r in rows] == ["scene0", "scene1"] and rows[0]["height"] == "32"
        assert (out / "scene0.png").is_file() and (out / "scene0_spectra.png").is_file()
        scores[method] = np.mean([float(r["psnr_db"]) for r in rows])
    assert scores["gap-tv"] > scores["x0"] + 1.0


def test_cassi_checkpoint_is_recognised_by_its_recorded_task(cubes, tmp_path, capsys):
    folder, mask = cubes
    operator = CASSI(torch.from_numpy(scipy.io.loadmat(mask)["mask"]), 28, 2)
    model = build_dun(operator, ModelConfig(strategy="shared", num_stages=2,
                                            backbone_kwargs={"in_channels": 28, "channels": 2, "num_blocks": 1}))
    save_dun(model, tmp_path / "cassi.safetensors", {"task": "cassi"})
    assert main(["eval", "--checkpoint", str(tmp_path / "cassi.safetensors"), "--images", str(folder), "--mask",
                 str(mask), "--quiet"]) == 0, capsys.readouterr().err
    assert "scene1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "cassi.safetensors"), "--task", "cs", "--images",
                 str(folder)]) == 2
    assert "is a cassi model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--task", "cassi", "--method", "x0", "--phi", "x.mat"], "--phi: not an option of the cassi task"),
    (["--task", "cs", "--method", "gap-tv"], "--method gap-tv: the cs task offers model"),
    (["--task", "sr", "--method", "model"], "--method model: the sr task offers bicubic"),
    (["--task", "cassi", "--method", "model"], "--method model needs --checkpoint"),
])
def test_task_options_are_checked(cubes, capsys, argv, message):
    folder, mask = cubes
    assert main(["eval", "--images", str(folder), "--mask", str(mask), *argv] if "cassi" in argv else
                ["eval", "--images", str(folder), *argv]) == 2
    assert message in capsys.readouterr().err


def test_sr_bicubic_reproduces_set5(shared_data, capsys):
    assert main(["eval", "--task", "sr", "--method", "bicubic", "--scale", "4", "--images",
                 str(shared_data / "Set5"), "--quiet"]) == 0
    assert "mean PSNR 28.43 dB, mean SSIM 0.8111" in capsys.readouterr().out


def test_cassi_gap_tv_beats_x0_on_a_real_scene(shared_data, tmp_path, capsys):
    folder = tmp_path / "scene"
    folder.mkdir()
    (folder / "cloth_256.mat").symlink_to(shared_data / "cassi" / "cave" / "cloth_256.mat")
    means = {}
    for method in ("x0", "gap-tv"):
        assert main(["eval", "--task", "cassi", "--method", method, "--images", str(folder), "--quiet"]
                    + (["--gap-iterations", "30"] if method == "gap-tv" else [])) == 0
        means[method] = float(capsys.readouterr().out.split("mean PSNR ")[1].split(" dB")[0])
    assert means["gap-tv"] > means["x0"] + 2.0
