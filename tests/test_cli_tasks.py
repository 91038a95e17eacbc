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


def _cassi_checkpoint(mask, path, num_stages):
    """A small untrained CASSI DUN saved with its task record."""
    operator = CASSI(torch.from_numpy(scipy.io.loadmat(mask)["mask"]), 28, 2)
    model = build_dun(operator, ModelConfig(strategy="shared", num_stages=num_stages,
                                            backbone_kwargs={"in_channels": 28, "channels": 2, "num_blocks": 1}))
    save_dun(model, path, {"task": "cassi"})


def test_cassi_checkpoint_is_recognised_by_its_recorded_task(cubes, tmp_path, capsys):
    folder, mask = cubes
    _cassi_checkpoint(mask, tmp_path / "cassi.safetensors", num_stages=2)
    assert main(["eval", "--checkpoint", str(tmp_path / "cassi.safetensors"), "--images", str(folder), "--mask",
                 str(mask), "--quiet"]) == 0, capsys.readouterr().err
    assert "scene1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "cassi.safetensors"), "--task", "cs", "--images",
                 str(folder)]) == 2
    assert "is a cassi model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--task", "cassi", "--method", "x0", "--phi", "x.mat"], "--phi: not an option of the cassi task"),
    (["--task", "cs", "--method", "gap-tv"], "--method gap-tv: the cs task offers model"),
    (["--task", "sr", "--method", "model"], "--method model needs --checkpoint (or use --method bicubic)"),
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
    assert config["task_name"] == "cassi" and config["model"]["backbone_kwargs"]["in_channels"] == 28
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
    _cassi_checkpoint(mask, tmp_path / "m.safetensors", num_stages=1)
    assert main(["eval", "--task", "cassi", "--method", "gap-tv", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--images", str(folder), "--mask", str(mask)]) == 2
    assert "--method gap-tv: reconstructs without a model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# SR end to end
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def hr_images(tmp_path):
    """Smooth 8-bit HR images: two gray 48×48 (training) and one RGB 52×44 (testing; not a multiple of 4)."""
    from PIL import Image

    folder, test = tmp_path / "hr", tmp_path / "test"
    folder.mkdir()
    test.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        small = rng.random((10, 10))
        Image.fromarray((small * 255).astype(np.uint8)).resize((48, 48), Image.BICUBIC).save(folder / f"g{i}.png")
    colour = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(colour).resize((44, 52), Image.BICUBIC).save(test / "c.png")
    return folder, test


def _sr_train(folder, out, *extra):
    return main(["train", "--task", "sr", "--scale", "4", "--out", str(out), "--train-images", str(folder),
                 "--strategy", "lorun", "--stages", "2", "--channels", "2", "--steps", "4", "--phase1-steps", "2",
                 "--crop", "32", "--batch-size", "2", "--quiet", "--threads", "1", "--device", "cpu",
                 "--checkpoint-every", "1", *extra])


def test_sr_train_resume_eval_restore(hr_images, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    folder, test = hr_images
    assert _sr_train(folder, tmp_path / "whole") == 0, capsys.readouterr().err
    assert _sr_train(folder, tmp_path / "split", "--stop-at", "3") == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    run = tmp_path / "whole"
    assert (run / "adapters-sr_x4.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--images", str(test), "--quiet"]) == 0
    assert "c " in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--images", str(test), "--scale", "2"]) == 2
    assert "is a ×4 model" in capsys.readouterr().err
    out = tmp_path / "c_x4.png"
    assert main(["restore", "--checkpoint", str(run / "model.safetensors"), "--image", str(test / "c.png"),
                 "--degrade", "--out", str(out)]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert Image.open(out).mode == "RGB" and Image.open(out).size == (44, 52)


def test_sr_fused_model_matches_reference():
    """to_fast on an SR LoRun DUN: Triton convolutions and the fused bicubic step (interpreter on a CPU)."""
    from lorun_fast import FusedLoRunConv, to_fast
    from lorun_fast.operators import FastBicubicSR
    from lorun_fast.reference.bicubic import BicubicSR

    torch.manual_seed(4)
    model = build_dun(BicubicSR(2), ModelConfig(strategy="lorun", num_stages=2,
                                                backbone_kwargs={"channels": 4, "num_blocks": 1}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    y = torch.rand(1, 1, 12, 10)
    expected = model.double()(y.double(), (24, 20))
    fast = to_fast(model, backend="triton", input_precision="ieee").to(torch.float32)
    assert "triton" in {m.backend for m in fast.modules() if isinstance(m, FusedLoRunConv)}
    assert isinstance(fast.operator, FastBicubicSR) and fast.operator.backend == "triton"
    out = fast(y, (24, 20))
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-4


def test_sr_gaussian_degradation_train_eval_restore(hr_images, tmp_path, capsys):
    """The Gaussian blur + decimation option: recorded by training, used by eval and restore, and a contradicting
    option is refused."""
    from lorun_fast.checkpoints import task_of

    folder, test = hr_images
    run = tmp_path / "g"
    assert _sr_train(folder, run, "--degradation", "gaussian", "--blur-sigma", "1.2") == 0, capsys.readouterr().err
    model = run / "model.safetensors"
    assert task_of(model) == {"task": "sr", "scale": 4, "degradation": "gaussian", "blur_sigma": 1.2,
                              "blur_size": 9}
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(model), "--images", str(test), "--quiet"]) == 0
    assert "c " in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(model), "--images", str(test), "--degradation", "bicubic"]) == 2
    assert "--degradation bicubic: " in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(model), "--images", str(test), "--blur-sigma", "2"]) == 2
    assert "is a model of Gaussian blur σ = 1.2 (9×9, circular)" in capsys.readouterr().err
    assert main(["restore", "--checkpoint", str(model), "--image", str(test / "c.png"), "--degrade", "--out",
                 str(tmp_path / "c.png")]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert main(["eval", "--task", "sr", "--method", "bicubic", "--degradation", "gaussian", "--blur-size", "4",
                 "--images", str(test)]) == 2
    assert "--blur-size: expected an odd positive int, got 4" in capsys.readouterr().err
    assert main(["train", "--task", "cassi", "--out", str(tmp_path / "x"), "--blur-sigma", "1"]) == 2
    assert "--blur-sigma: not an option of the cassi task" in capsys.readouterr().err


def test_sr_bad_input(hr_images, tmp_path, capsys):
    from PIL import Image

    folder, test = hr_images
    lr = tmp_path / "lr.png"
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(lr)
    assert main(["restore", "--task", "sr", "--method", "bicubic", "--scale", "4", "--image", str(lr), "--original",
                 str(test / "c.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert "LR 10×10 times 4 is 40×40, but --original" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--task", "sr", "--method", "bicubic", "--scale", "5", "--images", str(test)])
    assert "invalid choice: 5" in capsys.readouterr().err
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tiny / "t.png")
    assert main(["eval", "--task", "sr", "--method", "bicubic", "--scale", "4", "--images", str(tiny)]) == 2
    assert "t.png" in capsys.readouterr().err
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((48, 48), 1000, dtype=np.uint16)).save(deep / "d.png")
    assert main(["eval", "--task", "sr", "--method", "bicubic", "--images", str(deep)]) == 2
    assert "d.png" in capsys.readouterr().err
    assert main(["train", "--task", "sr", "--out", str(tmp_path / "r"), "--crop", "30", "--train-images",
                 str(folder)]) == 2
    assert "--crop: expected a multiple of the scale 4" in capsys.readouterr().err


def test_bicubic_and_adjoint_starts_agree_on_set5(shared_data):
    """x0 for SR, both candidates measured: MATLAB bicubic upscaling of the LR, and Aᵀy normalised by Aᵀ1 (what
    the operator alone gives). They score the same (the normalised adjoint of the antialiased ×1/s bicubic is,
    away from the borders, the ×s bicubic): the DUN starts from bicubic, the SR literature's usual start."""
    from lorun_fast.reference.bicubic import BicubicSR
    from lorun_fast.tasks.sr import degrade_bicubic, modcrop, read_hr, sr_input, sr_scores, y_channel

    operator = BicubicSR(4)
    psnrs = {"bicubic": [], "adjoint": []}
    for path in sorted((shared_data / "Set5").glob("*.png")):
        hr = modcrop(read_hr(path), 4)
        y = torch.from_numpy(sr_input(degrade_bicubic(hr, 4)))[None, None]
        size = hr.shape[:2]
        starts = {"bicubic": operator.init(y, size),
                  "adjoint": operator.A_adjoint(y, size) / operator.A_adjoint(torch.ones_like(y), size)}
        for name, x in starts.items():
            psnrs[name].append(sr_scores(np.clip(x[0, 0].numpy() * 255, 0, 255), y_channel(hr), 4).psnr)
    assert np.mean(psnrs["bicubic"]) == pytest.approx(28.43, abs=0.01)
    assert abs(np.mean(psnrs["bicubic"]) - np.mean(psnrs["adjoint"])) < 0.01
