"""``eval --task cassi|sr``: the task modules behind the CLI (synthetic cubes; Set5 and CAVE when the data is there)."""
import csv
import json

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


# ----------------------------------------------------------------------------------------------------------------
# CASSI end to end: train → resume → eval, the fused model, restore, bad input
# ----------------------------------------------------------------------------------------------------------------
def _cassi_train(folder, mask, out, *extra):
    return main(["train", "--task", "cassi", "--out", str(out), "--train-images", str(folder), "--mask", str(mask),
                 "--exclude", "", "--strategy", "lorun", "--stages", "2", "--channels", "2", "--steps", "4",
                 "--phase1-steps", "2", "--crop", "16", "--batch-size", "2", "--quiet", "--threads", "1",
                 "--device", "cpu", "--checkpoint-every", "1", *extra])


def test_cassi_train_resume_eval_round_trip(cubes, tmp_path, capsys):
    from safetensors.torch import load_file

    folder, mask = cubes
    assert _cassi_train(folder, mask, tmp_path / "whole") == 0, capsys.readouterr().err
    assert _cassi_train(folder, mask, tmp_path / "split", "--stop-at", "3") == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["task_name"] == "cassi" and config["backbone_kwargs"]["in_channels"] == 28
    capsys.readouterr()
    run = tmp_path / "whole"
    assert main(["eval", "--checkpoint", str(run / "base.safetensors"), "--adapters",
                 str(run / "adapters-cassi.safetensors"), "--images", str(folder), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "scene0" in printed.out and "mean PSNR" in printed.out
    assert "scene0.npy: " in printed.err and "hwb detected" in printed.err  # what was read is said
    assert main(["describe", "--checkpoint", str(run / "model.safetensors")]) == 0
    assert "'in_channels': 28" in capsys.readouterr().out


def test_cassi_fused_model_matches_reference():
    """to_fast on a CASSI LoRun DUN: fused CASSI gradient steps and fused convolutions (Triton interpreter on a
    CPU) against the float64 reference."""
    from lorun_fast import FusedLoRunConv, to_fast

    torch.manual_seed(3)
    operator = CASSI(torch.rand(24, 24, dtype=torch.float64) + 0.1, 28, 2)
    model = build_dun(operator, ModelConfig(strategy="lorun", num_stages=2,
                                            backbone_kwargs={"in_channels": 28, "channels": 4, "num_blocks": 1}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    y = operator.A(torch.rand(1, 28, 24, 24, dtype=torch.float64).float())
    expected = model.double()(y.double(), (24, 24))
    fast = to_fast(model, backend="triton", input_precision="ieee").to(torch.float32)
    assert type(fast.operator).__name__ == "FastCASSI" and fast.operator.backend == "triton"
    assert "triton" in {m.backend for m in fast.modules() if isinstance(m, FusedLoRunConv)}
    out = fast(y, (24, 24))
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-4


def test_cassi_restore_writes_cube_preview_and_spectra(cubes, tmp_path, capsys):
    folder, mask = cubes
    out = tmp_path / "rec.npy"
    assert main(["restore", "--task", "cassi", "--method", "gap-tv", "--image", str(folder / "scene0.npy"),
                 "--mask", str(mask), "--out", str(out), "--plot", str(tmp_path / "spectra.png"),
                 "--save-measurement", str(tmp_path / "y.npy")]) == 0, capsys.readouterr().err
    assert np.load(out).shape == (32, 32, 28) and (tmp_path / "rec.png").is_file()
    assert (tmp_path / "spectra.png").is_file() and np.load(tmp_path / "y.npy").shape == (32, 32 + 54)
    assert "PSNR" in capsys.readouterr().out
    assert main(["restore", "--task", "cassi", "--method", "x0", "--measurement", str(tmp_path / "y.npy"),
                 "--mask", str(mask), "--out", str(tmp_path / "rec2.mat")]) == 0
    assert scipy.io.loadmat(tmp_path / "rec2.mat")["cube"].shape == (32, 32, 28)


def test_cassi_bad_input(cubes, tmp_path, capsys):
    folder, mask = cubes
    np.save(tmp_path / "short.npy", np.zeros((32, 40)))
    assert main(["restore", "--task", "cassi", "--method", "x0", "--measurement", str(tmp_path / "short.npy"),
                 "--mask", str(mask), "--out", str(tmp_path / "r.npy")]) == 2
    assert "has shape (32, 40); the mask (32, 32) with 28 bands and step 2 measures (32, 86)" in \
        capsys.readouterr().err
    ten = tmp_path / "ten"
    ten.mkdir()
    np.save(ten / "c.npy", np.random.default_rng(0).random((32, 32, 10)))
    assert main(["eval", "--task", "cassi", "--method", "x0", "--images", str(ten), "--mask", str(mask)]) == 2
    assert "c.npy" in capsys.readouterr().err
    bhw = tmp_path / "bhw"
    bhw.mkdir()
    np.save(bhw / "c.npy", np.moveaxis(np.load(folder / "scene0.npy"), -1, 0))
    assert main(["eval", "--task", "cassi", "--method", "x0", "--images", str(bhw), "--mask", str(mask),
                 "--quiet"]) == 0
    assert "bhw detected" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    cube = np.load(folder / "scene0.npy")
    cube[1, 2, 3] = np.nan
    np.save(bad / "c.npy", cube)
    assert main(["eval", "--task", "cassi", "--method", "x0", "--images", str(bad), "--mask", str(mask)]) == 2
    assert "c.npy" in capsys.readouterr().err
    assert main(["train", "--task", "cassi", "--out", str(tmp_path / "r"), "--ratio", "25"]) == 2
    assert "--ratio: not an option of the cassi task" in capsys.readouterr().err


def test_a_checkpoint_the_method_would_ignore_is_refused(cubes, tmp_path, capsys):
    folder, mask = cubes
    operator = CASSI(torch.from_numpy(scipy.io.loadmat(mask)["mask"]), 28, 2)
    model = build_dun(operator, ModelConfig(strategy="shared", num_stages=1,
                                            backbone_kwargs={"in_channels": 28, "channels": 2, "num_blocks": 1}))
    save_dun(model, tmp_path / "m.safetensors", {"task": "cassi"})
    assert main(["eval", "--task", "cassi", "--method", "gap-tv", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--images", str(folder), "--mask", str(mask)]) == 2
    assert "--method gap-tv: reconstructs without a model" in capsys.readouterr().err
