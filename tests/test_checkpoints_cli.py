"""lorun_fast's own DUN checkpoints and the eval command on made-up data (no shared data needed)."""
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from lorun_fast.checkpoints import load_any_dun, load_dun, save_dun
from lorun_fast.cli import main
from lorun_fast.models import ModelConfig, build_dun
from lorun_fast.reference import BlockCS

TINY = ModelConfig(strategy="lorun", num_stages=2, backbone="resunet",
                   backbone_kwargs={"channels": 4, "num_blocks": 1}, rank=2)


def _randomise(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("strategy", ["block", "shared", "lorun"])
def test_save_load_roundtrip(tmp_path, strategy):
    operator = BlockCS.gaussian(0.25, seed=1)
    config = ModelConfig(**{**TINY.to_dict(), "strategy": strategy})
    model = _randomise(build_dun(operator, config))
    path = tmp_path / "model.safetensors"
    save_dun(model, path)
    loaded = load_any_dun(path, operator)
    assert loaded.config == config
    y = operator.A(torch.rand(1, 1, 40, 50))
    assert torch.equal(model(y, (40, 50)), loaded(y, (40, 50)))


def test_load_reports_mismatch_and_keeps_good_file(tmp_path):
    operator = BlockCS.gaussian(0.25)
    path = tmp_path / "model.safetensors"
    save_dun(build_dun(operator, TINY), path)
    good = path.read_bytes()
    other = build_dun(operator, ModelConfig(**{**TINY.to_dict(), "rank": 3}))
    other.config = TINY  # claims rank 2 but holds rank-3 adapters
    save_dun(other, tmp_path / "lying.safetensors")
    with pytest.raises(ValueError, match="wrong shapes"):
        load_dun(tmp_path / "lying.safetensors", operator)
    (tmp_path / "broken.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_dun(tmp_path / "broken.safetensors", operator)
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp*"))


def _cs_files(tmp_path, width=1089, m=109):
    phi = np.linalg.qr(np.random.default_rng(0).standard_normal((1089, m)))[0].T[:, :width]
    scipy.io.savemat(tmp_path / "phi.mat", {"phi": phi})
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name, size in (("a", (40, 40)), ("b", (33, 70))):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(images / f"{name}.png")
    model = build_dun(BlockCS.gaussian(0.1), ModelConfig(strategy="shared", num_stages=2, backbone="ista_net_plus",
                                                         backbone_kwargs={"channels": 4}))
    save_dun(model, tmp_path / "model.safetensors")
    return tmp_path / "phi.mat", images, tmp_path / "model.safetensors"


def test_eval_command_writes_table_csv_and_pngs(tmp_path, capsys):
    phi, images, checkpoint = _cs_files(tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--phi", str(phi), "--images", str(images),
               "--out", str(out), "--quiet", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert {"a.png", "b.png", "results.csv"} <= {p.name for p in out.iterdir()}
    assert Image.open(out / "b.png").size == (70, 33)
    assert "mean PSNR" in printed and "33x70" in printed


@pytest.mark.parametrize("change, message", [
    ({"--checkpoint": "missing.safetensors"}, "missing.safetensors"),
    ({"--images": "no_such_folder"}, "no_such_folder"),
    ({"--phi": "nothing.mat"}, "nothing.mat"),
])
def test_eval_command_bad_paths(tmp_path, capsys, change, message):
    phi, images, checkpoint = _cs_files(tmp_path)
    args = {"--checkpoint": str(checkpoint), "--phi": str(phi), "--images": str(images)}
    args.update({k: str(tmp_path / v) for k, v in change.items()})
    rc = main(["eval", *[item for pair in args.items() for item in pair], "--quiet"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_eval_command_rejects_wrong_matrix_width(tmp_path, capsys):
    phi, images, checkpoint = _cs_files(tmp_path, width=1000)
    rc = main(["eval", "--checkpoint", str(checkpoint), "--phi", str(phi), "--images", str(images), "--quiet"])
    assert rc == 2
    assert "phi: expected width 1089" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "eval" in capsys.readouterr().out
