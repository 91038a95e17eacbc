"""The published ISTA-Net+ checkpoints, imported and evaluated by the project's own CLI on Set11."""
import csv

import numpy as np
import pytest
import torch

from lorun_fast.checkpoints import import_ista_net_plus, load_torch_state_dict
from lorun_fast.cli import main
from lorun_fast.reference import DUN, BlockCS

# Mean PSNR / SSIM of the published reconstruction code on these files (fp32), as the data folder records them.
PUBLISHED = {10: (26.49, 0.8036), 25: (32.44, 0.9237), 40: (36.02, 0.9579)}
PSNR_TOL, SSIM_TOL = 0.02, 0.001


def _files(root, ratio):
    return (root / "ista_net_plus" / f"ratio_{ratio}" / "net_params_200.pkl",
            root / "cs_sampling" / f"phi_0_{ratio}_1089.mat",
            root / "cs_sampling" / f"Initialization_Matrix_{ratio}.mat")


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("ratio", sorted(PUBLISHED))
def test_published_checkpoint_reproduces_set11(shared_data, ratio, tmp_path, capsys):
    checkpoint, phi, qinit = _files(shared_data, ratio)
    out = tmp_path / "rec"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--phi", str(phi), "--qinit", str(qinit),
               "--images", str(shared_data / "Set11"), "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 11 and len(list(out.glob("*.png"))) == 11
    mean_psnr = np.mean([float(r["psnr_db"]) for r in rows])
    mean_ssim = np.mean([float(r["ssim"]) for r in rows])
    expected_psnr, expected_ssim = PUBLISHED[ratio]
    assert abs(mean_psnr - expected_psnr) <= PSNR_TOL, printed
    assert abs(mean_ssim - expected_ssim) <= SSIM_TOL, printed
    assert "mean" in printed and "Monarch" in printed


@pytest.mark.data
def test_import_maps_every_tensor(shared_data):
    checkpoint, phi, qinit = _files(shared_data, 25)
    model = import_ista_net_plus(checkpoint, BlockCS.from_mat(phi, qinit))
    state = load_torch_state_dict(checkpoint)
    assert isinstance(model, DUN) and model.strategy == "block" and model.num_stages == 9
    assert model.parameter_counts()["total"] == sum(t.numel() for t in state.values()) == 336978
    for k in range(9):
        assert model.rho[k].item() == state[f"fcs.{k}.lambda_step"].item()
        assert torch.equal(model.denoisers[k].conv1_forward.weight, state[f"fcs.{k}.conv1_forward"])
        assert model.denoisers[k].soft_thr.item() == state[f"fcs.{k}.soft_thr"].item()


def _state(phases=2, channels=4):
    state = {}
    for k in range(phases):
        state[f"module.fcs.{k}.lambda_step"] = torch.tensor([0.5])
        state[f"module.fcs.{k}.soft_thr"] = torch.tensor([0.01])
        state[f"module.fcs.{k}.conv_D"] = torch.randn(channels, 1, 3, 3)
        for name in ("conv1_forward", "conv2_forward", "conv1_backward", "conv2_backward"):
            state[f"module.fcs.{k}.{name}"] = torch.randn(channels, channels, 3, 3)
        state[f"module.fcs.{k}.conv_G"] = torch.randn(1, channels, 3, 3)
    return state


def test_import_any_phase_count_and_width(tmp_path):
    path = tmp_path / "net.pkl"
    torch.save(_state(phases=3, channels=5), path)
    model = import_ista_net_plus(path, BlockCS.gaussian(0.1))
    assert model.num_stages == 3 and model.denoisers[0].conv_D.weight.shape == (5, 1, 3, 3)
    y = model.operator.A(torch.rand(1, 1, 66, 33))
    assert model(y).shape == (1, 1, 66, 33)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("module.fcs.1.conv_G"), "phase 1"),
    (lambda s: s.update({"module.fcs.0.conv_D": torch.randn(4, 2, 3, 3)}), "fcs.0.conv_D"),
    (lambda s: s.update({"module.head.weight": torch.randn(1)}), "head.weight"),
    (lambda s: s.update({"module.fcs.3.soft_thr": torch.tensor([0.1])}), "phases"),
])
def test_import_rejects_mismatched_checkpoints(tmp_path, damage, message):
    state = _state()
    damage(state)
    path = tmp_path / "bad.pkl"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message):
        import_ista_net_plus(path, BlockCS.gaussian(0.1))


def test_import_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        import_ista_net_plus(tmp_path / "nope.pkl", BlockCS.gaussian(0.1))
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x02not a pickle at all" * 10)
    with pytest.raises(ValueError, match="corrupt.pkl"):
        import_ista_net_plus(corrupt, BlockCS.gaussian(0.1))
