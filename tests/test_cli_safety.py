"""The CLI and API as a hostile but honest user meets them: nothing the user owns is ever overwritten, and no bad
input passes silently or as a raw traceback.

CLI cases run ``python -m lorun_fast`` in a subprocess and assert its exit code and message; file-safety cases
assert the user's files are byte-identical afterwards. Everything runs on made-up data (no shared data needed).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from lorun_fast.checkpoints import save_dun
from lorun_fast.models import ModelConfig, build_dun
from lorun_fast.reference import CASSI, BlockCS, LoRAConv2d, SuperResolution

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"channels": 2, "num_blocks": 1}
GAUSSIAN_25 = {"gaussian_ratio": 0.25, "seed": 0}


def run_cli(*args, timeout=180, **popen):
    """``python -m lorun_fast ARGS`` as a user runs it: no Triton interpreter, one thread, no shared data."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", LORUN_DATA="/nonexistent")
    return subprocess.run([sys.executable, "-m", "lorun_fast", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **popen)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images, a tiny shared-DUN checkpoint recording a Gaussian 25% task, and a 10% Φ file."""
    root = tmp_path_factory.mktemp("safety")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (40, 44)), ("b", (36, 50))):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(images / f"{name}.png")
    model = build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=1, backbone_kwargs=TINY))
    save_dun(model, root / "model.safetensors", GAUSSIAN_25)
    phi = np.linalg.qr(rng.standard_normal((1089, 109)))[0].T
    scipy.io.savemat(root / "phi10.mat", {"phi": phi})
    return {"root": root, "images": images, "ckpt": root / "model.safetensors", "phi10": root / "phi10.mat"}


def _train_args(files, out, *extra):
    return ["train", "--out", out, "--strategy", "shared", "--stages", "1", "--channels", "2", "--gaussian", "0",
            "--steps", "4", "--crop", "33", "--batch-size", "1", "--train-images", files["images"], "--quiet",
            "--threads", "1", "--device", "cpu", *extra]


# ----------------------------------------------------------------------------------------------------------------
# Data loss: never
# ----------------------------------------------------------------------------------------------------------------
def test_eval_refuses_the_image_folder_as_out(files):
    before = snapshot(files["images"])
    result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--out", files["images"],
                     "--quiet")
    assert result.returncode == 2 and "is the --images folder" in result.stderr, result.stderr
    assert snapshot(files["images"]) == before


def test_restore_refuses_to_write_over_its_inputs(files, tmp_path):
    image = tmp_path / "f.png"
    image.write_bytes((files["images"] / "a.png").read_bytes())
    ckpt_bytes = files["ckpt"].read_bytes()
    result = run_cli("restore", "--checkpoint", files["ckpt"], "--image", image, "--out", image)
    assert result.returncode == 2 and "would overwrite the input" in result.stderr, result.stderr
    link = tmp_path / "link.png"
    link.symlink_to(image)
    result = run_cli("restore", "--checkpoint", files["ckpt"], "--image", image, "--out", link)
    assert result.returncode == 2 and "--image" in result.stderr
    result = run_cli("restore", "--checkpoint", files["ckpt"], "--image", image, "--out", tmp_path / "r.png",
                     "--save-measurement", files["ckpt"])
    assert result.returncode == 2 and "--save-measurement" in result.stderr and "--checkpoint" in result.stderr
    assert image.read_bytes() == (files["images"] / "a.png").read_bytes() and files["ckpt"].read_bytes() == ckpt_bytes


def test_train_refuses_a_folder_of_the_users_files(files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"my own model")
    (out / "log.jsonl").write_text("my notes\n")
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    result = run_cli(*_train_args(files, out))
    assert result.returncode == 2 and "notes.txt" in result.stderr and "did not write" in result.stderr
    (out / "notes.txt").unlink()
    before.pop("notes.txt")
    result = run_cli(*_train_args(files, out))  # a run's file names, but no run: still not ours
    assert result.returncode == 2 and "no config.json" in result.stderr, result.stderr
    assert snapshot(out) == before


def test_same_stem_inputs_get_distinct_outputs_and_rows(files, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    Image.fromarray(255 - pixels).save(images / "a.tif")
    Image.fromarray(pixels).save(images / "c.png")
    out = tmp_path / "out"
    result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", images, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"a.png.png", "a.tif.png", "c.png", "results.csv"}
    rows = [line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]]
    assert rows == ["a.png", "a.tif", "c"]


def test_stale_temp_files_of_the_run_are_cleaned_on_resume(files, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*_train_args(files, out, "--stop-at", "2")).returncode == 0
    stale = [out / ".last.json.0123456789ab.tmp", out / "checkpoints" / ".step-0000002.safetensors.aaaaaaaaaaaa.tmp",
             out / "checkpoints" / "step-0000001.state.pt"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    result = run_cli("train", "--out", out, "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004.safetensors",
                                                                       "step-0000004.state.pt"]


def test_unwritable_checkpoint_folder_fails_before_the_first_step(files, tmp_path, monkeypatch):
    from lorun_fast import io as lio
    from lorun_fast.train import TrainConfig, Trainer

    real = lio._create_temp_beside

    def refuse_checkpoints(target):
        if target.parent.name == "checkpoints":
            raise PermissionError(13, "Permission denied")
        return real(target)

    monkeypatch.setattr(lio, "_create_temp_beside", refuse_checkpoints)
    config = TrainConfig(model=ModelConfig(strategy="shared", num_stages=1, backbone_kwargs=TINY), ratio=25,
                         gaussian_seed=0, steps=3, crop=33, batch_size=1, train_images=str(files["images"]))
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    monkeypatch.setattr(Trainer, "_train_step", lambda self: pytest.fail("a step ran before the folder was checked"))
    with pytest.raises(PermissionError, match="checkpoint folder .*checkpoints: cannot write there"):
        trainer.train()


def test_eval_out_that_is_a_file_or_holds_the_users_files_fails_before_compute(files, tmp_path):
    occupied = tmp_path / "out"
    occupied.mkdir()
    (occupied / "a.png").write_bytes(b"the user's own picture")
    result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--out", occupied,
                     "--quiet")
    assert result.returncode == 2 and "a.png" in result.stderr and "mean PSNR" not in result.stdout
    assert (occupied / "a.png").read_bytes() == b"the user's own picture"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--out", a_file / "sub",
                     "--quiet")
    assert result.returncode == 2 and "--out" in result.stderr and ".tmp" not in result.stderr, result.stderr
    # a second evaluation may replace what the first one wrote
    out = tmp_path / "again"
    for _ in range(2):
        result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--out", out, "--quiet")
        assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and not os.path.ismount("/sys"),
                    reason="needs a read-only /sys")
def test_eval_out_on_a_read_only_file_system_fails_before_compute(files):
    probe = Path("/sys/lorun-fast-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here")
    result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--out", probe / "out",
                     "--quiet")
    assert result.returncode == 2 and "cannot write there" in result.stderr and "mean PSNR" not in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Silent wrong results: refused, or an explicit and printed choice
# ----------------------------------------------------------------------------------------------------------------
def _poisoned_checkpoint(tmp_path, value=float("nan"), dtype=None):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    source = Path(tmp_path).parent / "src.safetensors"
    model = build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=1, backbone_kwargs=TINY))
    save_dun(model, source, GAUSSIAN_25)
    tensors = load_file(source)
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    name = "denoisers.0.head.weight"
    if dtype is None:
        tensors[name][0, 0, 0, 0] = value
    else:
        tensors[name] = tensors[name].to(dtype)
    path = Path(tmp_path) / "poisoned.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path, name


def test_nan_weights_are_refused_at_load(files, tmp_path):
    path, name = _poisoned_checkpoint(tmp_path)
    result = run_cli("eval", "--checkpoint", path, "--images", files["images"], "--quiet")
    assert result.returncode == 2 and "poisoned.safetensors" in result.stderr and name in result.stderr
    assert "non-finite" in result.stderr and "mean PSNR" not in result.stdout


def test_integer_tensors_are_refused_not_cast(files, tmp_path):
    path, name = _poisoned_checkpoint(tmp_path, dtype=torch.int64)
    result = run_cli("eval", "--checkpoint", path, "--images", files["images"], "--quiet")
    assert result.returncode == 2 and name in result.stderr and "int64" in result.stderr


def test_non_finite_output_is_an_error_not_a_number(files, monkeypatch):
    from lorun_fast.evaluate import evaluate_cs
    from lorun_fast.io import list_images
    from lorun_fast.checkpoints import load_dun

    model = load_dun(files["ckpt"], BlockCS.gaussian(0.25))
    with torch.no_grad():
        model.rho.fill_(float("inf"))  # as a broken model in memory would be
    with pytest.raises(FloatingPointError, match="a.png: .*non-finite"):
        evaluate_cs(model, list_images(files["images"]))


def test_a_task_contradicting_the_recorded_one_needs_force(files):
    args = ["eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--phi", files["phi10"], "--quiet"]
    result = run_cli(*args)
    assert result.returncode == 2 and "contradicts" in result.stderr and "--force-task" in result.stderr
    result = run_cli(*args, "--force-task")
    assert result.returncode == 0 and "warning:" in result.stderr and "--force-task" in result.stderr


@pytest.mark.parametrize("alpha", ["0", "-1", "nan", "inf"])
def test_alpha_must_be_finite_and_positive(files, tmp_path, alpha):
    result = run_cli(*_train_args(files, tmp_path / "run", "--strategy", "lorun", "--alpha", alpha))
    assert result.returncode == 2 and "--alpha" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan"), float("inf"), True])
def test_alpha_is_checked_by_the_api(alpha):
    with pytest.raises(ValueError, match="alpha: expected a finite number > 0"):
        LoRAConv2d(torch.nn.Conv2d(4, 4, 3), 2, alpha=alpha)


def test_a_rank_above_the_layer_is_clamped_with_a_warning_or_refused():
    result = run_cli("describe", "--channels", "4", "--rank", "100", "--stages", "9", "--json")
    assert result.returncode == 0, result.stderr
    assert "warning: rank 100 is above what 22 layer(s)" in result.stderr
    assert "head (1→4 3×3: rank 4)" in result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert rows["lorun"]["total"] < 1.5 * rows["block"]["total"]  # was 62× before the clamp
    with pytest.raises(ValueError, match=r"rank: 7 is above 6, the most a LoRA update of this 4→6 3×3 layer"):
        LoRAConv2d(torch.nn.Conv2d(4, 6, 3), 2, rank=7)
    with pytest.raises(ValueError, match=r"rank: 5 is above 4"):
        LoRAConv2d(torch.nn.Conv2d(8, 4, 1), 2, rank=5)


@pytest.mark.parametrize("extra, message", [
    (["--phi", "{phi10}"], "not allowed with argument --gaussian"),
    (["--ratio", "10", "--phi", "{phi10}", "--strategy", "shared"], "--ratio and --phi"),
    (["--rank", "2", "--gamma", "20"], "not allowed with argument"),
    (["--val-every", "2"], "--val-every: 2 needs --val-images"),
    (["--val-images", "{images}"], "--val-images: needs --val-every > 0"),
    (["--seed", "-1"], "--seed: expected ≥ 0"),
    (["--weight-decay", "-1"], "--weight-decay: expected ≥ 0"),
    (["--adapter-name", "../../escape", "--strategy", "lorun"], "--adapter-name: expected a plain name"),
    (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device meta: expected cpu, cuda or cuda:N"),
])
def test_contradictory_or_bad_train_options(files, tmp_path, extra, message):
    fill = {k: str(v) for k, v in files.items()}
    args = _train_args(files, tmp_path / "run")
    if "--ratio" in extra:  # --ratio with --phi, without the --gaussian that a ratio may go with
        at = args.index("--gaussian")
        del args[at:at + 2]
    result = run_cli(*args, *[e.format(**fill) for e in extra])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path.parent.parent / "escape").exists()


def test_triton_backend_on_a_cpu_is_refused_before_training(files, tmp_path):
    result = run_cli(*_train_args(files, tmp_path / "run", "--strategy", "lorun", "--backend", "triton"))
    assert result.returncode == 2 and "--backend: 'triton' needs a CUDA device" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_base_contradicting_the_architecture_options(files, tmp_path):
    args = [str(a) for a in _train_args(files, tmp_path / "run", "--strategy", "lorun", "--base", files["ckpt"],
                                        "--steps", "2")]
    wrong = list(args)
    wrong[wrong.index("--channels") + 1] = "8"
    result = run_cli(*wrong)
    assert result.returncode == 2 and "--channels 8 contradicts --base" in result.stderr, result.stderr
    result = run_cli(*args)  # the same width as the base: fine
    assert result.returncode == 0, result.stderr


def test_resume_names_each_ignored_option_and_needs_config(files, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*_train_args(files, out, "--stop-at", "2")).returncode == 0
    result = run_cli("train", "--out", out, "--resume", "--lr", "0.5", "--crop", "34", "--quiet", "--stop-at", "3")
    assert result.returncode == 0, result.stderr
    assert "--lr 0.5 is not used: the run records lr=0.001" in result.stderr
    assert "--crop 34 is not used: the run records crop=33" in result.stderr
    (out / "config.json").unlink()
    before = snapshot(out)
    result = run_cli("train", "--out", out, "--resume", "--quiet")
    assert result.returncode == 2 and "no config.json" in result.stderr
    assert snapshot(out) == before


def test_garbage_last_json_is_named(files, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*_train_args(files, out, "--stop-at", "2")).returncode == 0
    (out / "last.json").write_text("{garbage")
    result = run_cli("train", "--out", out, "--resume", "--quiet")
    assert result.returncode == 2 and "last.json" in result.stderr and "corrupt" in result.stderr


def test_residual_is_validated_the_same_way_on_every_backend():
    from lorun_fast import FusedLoRunConv

    x = torch.randn(2, 4, 9, 7)
    for backend in ("merged", "reference"):
        layer = FusedLoRunConv(4, 6, 3, padding=1, num_stages=2, rank=2, backend=backend)
        with pytest.raises(ValueError, match=r"residual: expected the output's shape \(2, 6, 9, 7\)"):
            layer(x, 0, residual=torch.zeros(1, 6, 9, 7))  # would broadcast
        with pytest.raises(TypeError, match="residual: dtype torch.float64"):
            layer(x, 0, residual=torch.zeros(2, 6, 9, 7, dtype=torch.float64))  # would promote
        assert layer(x, 0, residual=torch.zeros(2, 6, 9, 7)).shape == (2, 6, 9, 7)


def test_complex_and_non_finite_matrices_are_refused(files, tmp_path):
    phi = scipy.io.loadmat(files["phi10"])["phi"]
    scipy.io.savemat(tmp_path / "complex.mat", {"phi": phi * (1 + 1j)})
    bad = phi.copy()
    bad[3, 4] = np.nan
    scipy.io.savemat(tmp_path / "nan.mat", {"phi": bad})
    for name, message in (("complex.mat", "is complex"), ("nan.mat", "non-finite")):
        result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--phi",
                         tmp_path / name, "--force-task", "--quiet")
        assert result.returncode == 2 and name in result.stderr and message in result.stderr, result.stderr
    result = run_cli("eval", "--checkpoint", files["ckpt"], "--images", files["images"], "--phi", tmp_path,
                     "--quiet")
    assert result.returncode == 2 and "is a folder" in result.stderr
    with pytest.raises(ValueError, match="phi: holds 1 non-finite"):
        BlockCS(torch.from_numpy(bad))


def test_operators_refuse_zero_non_finite_and_non_integer_arguments():
    with pytest.raises(ValueError, match="mask: is zero everywhere"):
        CASSI(torch.zeros(8, 8), 4, 2)
    with pytest.raises(ValueError, match="kernel: is zero everywhere"):
        SuperResolution(torch.zeros(3, 3), 2)
    with pytest.raises(ValueError, match="mask: holds 1 non-finite"):
        CASSI(torch.tensor([[1.0, float("inf")], [0.5, 1.0]]), 4, 2)
    with pytest.raises(TypeError, match="step: expected an int, got float 2.5"):
        CASSI(torch.rand(8, 8), 4, 2.5)
    with pytest.raises(TypeError, match="num_bands: expected an int, got float 2.0"):
        CASSI(torch.rand(8, 8), 2.0, 2)
    with pytest.raises(TypeError, match=r"phi: expected a torch.Tensor, got numpy.ndarray"):
        BlockCS(np.zeros((272, 1089)))


# ----------------------------------------------------------------------------------------------------------------
# Raw tracebacks and misleading messages: clear errors naming the argument or file
# ----------------------------------------------------------------------------------------------------------------
def test_api_misuse_gets_clear_errors():
    from lorun_fast.models import to_fast
    from lorun_fast.reference import ResUNet

    operator = BlockCS.gaussian(0.25)
    model = build_dun(operator, ModelConfig(strategy="shared", num_stages=1, backbone_kwargs=TINY))
    y = operator.A(torch.rand(1, 1, 40, 40))
    with pytest.raises(TypeError, match=r"y: dtype torch.float64 does not match the model's parameters"):
        model(y.double(), (40, 40))
    with pytest.raises(ValueError, match=r"size: expected \(H, W\), two positive ints, got \(99,\)"):
        model(y, (99,))
    with pytest.raises(TypeError, match="model: expected a DUN"):
        to_fast(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"x: expected \(N, 1, H, W\) with H, W ≥ 1, got \(1, 1, 0, 0\)"):
        ResUNet(1, channels=2)(torch.zeros(1, 1, 0, 0))


def _interrupt(process, wait_for):
    deadline = time.monotonic() + 120
    while not wait_for() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def test_ctrl_c_gives_one_line_and_exit_130(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    for delay in (0.3, 0.8, 1.5):  # during the imports, the set-up and the training loop
        start = time.monotonic()
        argv = _train_args(files, tmp_path / f"run{delay}", "--steps", "20000")
        train = subprocess.Popen([sys.executable, "-m", "lorun_fast", *map(str, argv)], stderr=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
        code, err = _interrupt(train, lambda: time.monotonic() - start > delay)
        assert code == 130 and "Traceback" not in err and "interrupted" in err, (delay, code, err)

    images = tmp_path / "many"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)).save(images / f"{i:02d}.png")
    out = tmp_path / "out"
    evaluation = subprocess.Popen([sys.executable, "-m", "lorun_fast", "eval", "--checkpoint", str(files["ckpt"]),
                                   "--images", str(images), "--out", str(out), "--quiet"],
                                  stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    code, err = _interrupt(evaluation, lambda: out.is_dir() and any(out.glob("*.png")))
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted after") and (out / "results.csv").is_file()
    # what the interrupted run wrote is recognisably an evaluation's: a rerun into the same folder may replace it
    done = [line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]]
    assert done and all((out / f"{name}.png").is_file() for name in done)


def test_adapter_names_cannot_leave_the_run_folder():
    from lorun_fast.train import TrainConfig

    with pytest.raises(ValueError, match="adapter_name: expected a plain name"):
        TrainConfig(adapter_name="../../escape").validate()


@pytest.mark.parametrize("case", ["tiny_image", "bad_strategy", "random_pickle", "empty_npy", "string_npy",
                                  "nan_npy"])
def test_bad_files_are_named(files, tmp_path, case):
    ckpt = files["ckpt"]
    out = tmp_path / "r.png"
    if case == "tiny_image":
        Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(tmp_path / "dot.png")
        result = run_cli("restore", "--checkpoint", ckpt, "--image", tmp_path / "dot.png", "--out", out)
        assert result.returncode == 2 and "dot.png" in result.stderr and "too small" in result.stderr
        assert not out.exists()
        result = run_cli("eval", "--checkpoint", ckpt, "--images", tmp_path, "--quiet")
        assert result.returncode == 2 and "dot.png" in result.stderr and "too small" in result.stderr
        return
    if case == "bad_strategy":
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(ckpt), framework="pt") as handle:
            metadata = handle.metadata()
        config = json.loads(metadata["lorun_fast.config"])
        metadata["lorun_fast.config"] = json.dumps({**config, "strategy": "bogus"})
        save_file(load_file(ckpt), tmp_path / "bogus.safetensors", metadata=metadata)
        result = run_cli("eval", "--checkpoint", tmp_path / "bogus.safetensors", "--images", files["images"],
                         "--quiet")
        assert result.returncode == 2 and "bogus.safetensors" in result.stderr and "strategy" in result.stderr
        return
    if case == "random_pickle":
        (tmp_path / "random.pkl").write_bytes(np.random.default_rng(0).bytes(2000))
        result = run_cli("eval", "--checkpoint", tmp_path / "random.pkl", "--images", files["images"], "--phi",
                         files["phi10"], "--quiet")
        assert result.returncode == 2 and "random.pkl" in result.stderr
        assert "will likely succeed" not in result.stderr and "weights_only=False, which" in result.stderr
        return
    arrays = {"empty_npy": np.zeros((0, 0, 272)), "string_npy": np.array([["a", "b"]]),
              "nan_npy": np.full((2, 2, 272), np.nan)}
    np.save(tmp_path / "y.npy", arrays[case])
    result = run_cli("restore", "--checkpoint", ckpt, "--measurement", tmp_path / "y.npy", "--out", out)
    assert result.returncode == 2 and "--measurement" in result.stderr and "--size" not in result.stderr, \
        result.stderr
    assert not out.exists()


def test_base_phase_out_of_range_and_nan_base_are_named(files, tmp_path):
    from lorun_fast.checkpoints import save_dun as save

    block = build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="block", num_stages=3, backbone_kwargs=TINY))
    save(block, tmp_path / "block.safetensors", GAUSSIAN_25)
    args = _train_args(files, tmp_path / "run", "--strategy", "lorun", "--base", tmp_path / "block.safetensors",
                       "--base-phase", "7", "--steps", "2")
    result = run_cli(*args)
    assert result.returncode == 2 and "--base-phase" in result.stderr and "7" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched
    path, name = _poisoned_checkpoint(tmp_path)
    result = run_cli(*_train_args(files, tmp_path / "run2", "--strategy", "lorun", "--base", path, "--steps", "2"))
    assert result.returncode == 2 and name in result.stderr and "lower --lr" not in result.stderr, result.stderr


def test_a_bug_surfaces_as_a_traceback_and_user_errors_as_one_line(monkeypatch, capsys):
    import lorun_fast.cli as cli

    for error, status in ((TypeError("an internal mistake"), None), (KeyError("a missing entry"), None),
                          (cli.CLIError("bad option"), 2), (FileNotFoundError("x.png"), 2),
                          (ValueError("bad value"), 2), (FloatingPointError("diverged"), 2)):
        def command(args, error=error):
            raise error

        monkeypatch.setattr(cli, "cmd_describe", command)
        if status is None:
            with pytest.raises(type(error)):
                cli.main(["describe"])
        else:
            assert cli.main(["describe"]) == status
            assert capsys.readouterr().err == f"error: {error}\n"


def test_a_mat_file_without_the_key_is_a_user_error(tmp_path, capsys):
    from lorun_fast.cli import main

    scipy.io.savemat(tmp_path / "phi.mat", {"other": np.eye(3)})
    assert main(["train", "--out", str(tmp_path / "run"), "--phi", str(tmp_path / "phi.mat"), "--train-images",
                 str(tmp_path), "--quiet", "--device", "cpu"]) == 2
    assert "has no key 'phi'" in capsys.readouterr().err


def test_the_command_line_choices_are_the_library_names():
    from lorun_fast import names
    from lorun_fast.models import BACKBONES
    from lorun_fast.reference import STRATEGIES
    from lorun_fast.reference.bicubic import SUPPORTED_SCALES
    from lorun_fast.reference.operators import MissingKeyError

    assert names.STRATEGIES == STRATEGIES and names.BACKBONE_NAMES == tuple(BACKBONES)
    assert names.SR_SCALES == SUPPORTED_SCALES
    assert issubclass(MissingKeyError, KeyError) and issubclass(MissingKeyError, ValueError)
