"""Training: tiny end-to-end runs, exact resume, checkpoints (base + adapter sets), failures, the CLI commands.

Everything here runs on made-up images and a seeded Gaussian Φ, so no shared data is needed.
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lorun_fast.checkpoints import (import_ista_net_plus, load_dun, load_lorun, load_model,
                                    save_adapters, save_base, save_dun)
from lorun_fast.cli import main
from lorun_fast.models import (ModelConfig, adapter_state, base_of, build_dun, lorun_from, make_per_stage,
                               shared_from_block, to_fast)
from lorun_fast.reference import BlockCS
from lorun_fast.tasks.cs import PatchSampler
from lorun_fast.train import MODEL_FIELDS, TrainConfig, Trainer, lr_at, read_log

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"channels": 2, "num_blocks": 1}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five smooth 8-bit gray images of odd sizes (upsampled noise, so a DUN has something to learn)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(48, 48), (50, 41), (40, 60), (45, 45), (66, 70)]):
        small = rng.random((size[0] // 6 + 2, size[1] // 6 + 2))
        img = Image.fromarray((small * 255).astype(np.uint8)).resize(size[::-1], Image.BICUBIC)
        img.save(folder / f"img{i}.png")
    return folder


def _config(images, **changes) -> TrainConfig:
    base = dict(strategy="lorun", num_stages=2, backbone_kwargs=TINY, ratio=25, gaussian_seed=0, steps=6,
                phase1_steps=3, crop=33, batch_size=2, train_images=str(images), checkpoint_every=0, log_every=1,
                lr=2e-3)
    base.update(changes)
    return TrainConfig.from_dict(base)  # the model fields flat, as config.json files before they were nested


def _same_weights(a, b) -> bool:
    """Same parameters, bit for bit (the operator's buffers may differ in dtype: the trainer runs in float32)."""
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------------------
def test_tiny_train_save_load_eval_end_to_end(images, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--out", str(run), "--strategy", "lorun", "--stages", "2", "--channels", "2", "--blocks", "1",
               "--gaussian", "0", "--ratio", "25", "--steps", "6", "--phase1-steps", "3", "--crop", "40",
               "--batch-size", "2", "--train-images", str(images), "--val-images", str(images), "--val-every", "3",
               "--val-limit", "2", "--log-every", "2", "--quiet", "--threads", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert {"config.json", "log.jsonl", "last.json", "base.safetensors", "adapters-cs25.safetensors",
            "model.safetensors", "summary.json"} <= {p.name for p in run.iterdir()}
    events = read_log(run / "log.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("val") == 2
    trains = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in trains] == [2, 4, 6] and [e["phase"] for e in trains] == [1, 2, 2]
    assert all(math.isfinite(e["loss"]) and abs(e["psnr"] + 10 * math.log10(e["loss"])) < 1e-9 for e in trains)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["parameters"]["trainable"] < summary["parameters"]["total"]

    # the single file and base + adapters are the same model; the operator comes from the recorded task
    out1, out2 = tmp_path / "eval1", tmp_path / "eval2"
    assert main(["eval", "--checkpoint", str(run / "model.safetensors"), "--images", str(images), "--out", str(out1),
                 "--quiet", "--device", "cpu"]) == 0
    assert main(["eval", "--checkpoint", str(run / "base.safetensors"), "--adapters",
                 str(run / "adapters-cs25.safetensors"), "--images", str(images), "--out", str(out2), "--quiet",
                 "--device", "cpu"]) == 0
    csv1, csv2 = (out1 / "results.csv").read_text(), (out2 / "results.csv").read_text()
    assert csv1.splitlines()[0].startswith("image,height,width,psnr_db,ssim")
    assert [r.split(",")[:5] for r in csv1.splitlines()] == [r.split(",")[:5] for r in csv2.splitlines()]
    assert len(list(out1.glob("*.png"))) == 5 and "mean PSNR" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["block", "shared"])
def test_block_and_shared_train_and_reload(images, tmp_path, strategy):
    config = _config(images, strategy=strategy, phase1_steps=None, steps=3)
    trainer = Trainer(config, tmp_path / strategy, device="cpu", quiet=True)
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["files"] == ["model.safetensors"]
    operator = BlockCS.gaussian(0.25, seed=0)
    loaded = load_dun(tmp_path / strategy / "model.safetensors", operator)
    assert loaded.strategy == strategy and _same_weights(loaded, trainer.model.cpu())
    expected_total = {"block": 2, "shared": 1}[strategy]
    assert len(loaded.denoisers) == expected_total


def test_training_lowers_the_loss(images, tmp_path):
    config = _config(images, strategy="shared", phase1_steps=None, steps=30, lr=5e-3, log_every=5)
    Trainer(config, tmp_path / "r", device="cpu", quiet=True).train()
    losses = [e["loss"] for e in read_log(tmp_path / "r" / "log.jsonl") if e["event"] == "train"]
    assert losses[-1] < losses[0]


def test_bfloat16_autocast_trains(images, tmp_path):
    config = _config(images, precision="bfloat16", steps=4, phase1_steps=2)
    trainer = Trainer(config, tmp_path / "r", device="cpu", quiet=True)
    before = {k: v.clone() for k, v in adapter_state(lorun_from(base_of(build_dun(
        BlockCS.gaussian(0.25), config.model_config("shared"))))).items()}
    summary = trainer.train()
    assert summary["steps"] == 4
    assert all(math.isfinite(e["loss"]) for e in read_log(tmp_path / "r" / "log.jsonl") if e["event"] == "train")
    after = adapter_state(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)


# ----------------------------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stops", [(2,), (3,), (1, 4, 5)])
def test_resume_matches_an_uninterrupted_run(images, tmp_path, stops):
    """Stops before, at and after the phase boundary (step 3): the final weights are bitwise those of one run."""
    config = _config(images)
    straight = Trainer(config, tmp_path / "straight", device="cpu", quiet=True)
    straight.train()
    for stop in stops:
        assert Trainer(config, tmp_path / "pieces", device="cpu", quiet=True).train(stop_at=stop) is None
    resumed = Trainer(config, tmp_path / "pieces", device="cpu", quiet=True)
    resumed.train()
    assert _same_weights(straight.model, resumed.model)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == straight.optimizer.state_dict()["state"][0]["step"]
    log = [e for e in read_log(tmp_path / "pieces" / "log.jsonl") if e["event"] == "train"]
    assert [e["step"] for e in log] == list(range(1, 7))  # nothing lost, nothing twice
    straight_log = [e for e in read_log(tmp_path / "straight" / "log.jsonl") if e["event"] == "train"]
    assert [e["loss"] for e in log] == [e["loss"] for e in straight_log]


def test_a_flat_config_json_from_before_the_model_was_nested_loads_and_resumes(images, tmp_path):
    config = _config(images)
    assert config.model == ModelConfig(strategy="lorun", num_stages=2, backbone_kwargs=TINY)
    straight = Trainer(config, tmp_path / "straight", device="cpu", quiet=True)
    straight.train()
    run = tmp_path / "pieces"
    assert Trainer(config, run, device="cpu", quiet=True).train(stop_at=2) is None
    nested = json.loads((run / "config.json").read_text())
    assert set(nested["model"]) == set(MODEL_FIELDS) and not set(MODEL_FIELDS) & set(nested.keys() - {"model"})
    flat = {**{k: v for k, v in nested.items() if k != "model"}, **nested["model"]}
    (run / "config.json").write_text(json.dumps(flat, indent=1) + "\n")  # the layout older runs wrote
    assert TrainConfig.from_dict(flat) == config
    with pytest.raises(ValueError, match="both at the top level and in 'model'"):
        TrainConfig.from_dict({**nested, "num_stages": 2})
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--device", "cpu"]) == 0
    resumed = Trainer(TrainConfig.from_dict(json.loads((run / "config.json").read_text())), run, device="cpu",
                      quiet=True)
    resumed.prepare(resume=True)
    assert resumed.step == config.steps and _same_weights(straight.model, resumed.model)


def test_cli_resume_and_refusal_to_overwrite(images, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--strategy", "shared", "--stages", "2", "--channels", "2", "--gaussian", "0",
            "--steps", "4", "--crop", "33", "--batch-size", "2", "--train-images", str(images), "--quiet"]
    assert main(args + ["--stop-at", "2"]) == 0
    assert json.loads((run / "last.json").read_text())["step"] == 2
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert main(args + ["--resume"]) == 0  # a finished run: nothing to do, no error


def test_failed_checkpoint_write_keeps_the_previous_one(images, tmp_path, monkeypatch):
    config = _config(images, checkpoint_every=2)
    run = tmp_path / "run"
    Trainer(config, run, device="cpu", quiet=True).train(stop_at=2)
    good = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    pointer = (run / "last.json").read_text()

    import lorun_fast.train as train_module

    def disk_full(obj):
        raise OSError("No space left on device")

    monkeypatch.setattr(train_module, "_torch_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        Trainer(config, run, device="cpu", quiet=True).train()
    assert (run / "last.json").read_text() == pointer
    assert all((run / "checkpoints" / name).read_bytes() == data for name, data in good.items())
    assert not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    resumed = Trainer(config, run, device="cpu", quiet=True)
    resumed.train()
    straight = Trainer(config, tmp_path / "straight", device="cpu", quiet=True)
    straight.train()
    assert _same_weights(resumed.model, straight.model)


def test_corrupt_run_files_give_clear_errors(images, tmp_path):
    config = _config(images)
    run = tmp_path / "run"
    Trainer(config, run, device="cpu", quiet=True).train(stop_at=2)
    last = json.loads((run / "last.json").read_text())
    state = run / last["state"]
    weights = run / last["weights"]
    state_bytes, weight_bytes = state.read_bytes(), weights.read_bytes()

    state.write_bytes(state_bytes[:100])
    with pytest.raises(ValueError, match="not a readable training state"):
        Trainer(config, run, device="cpu", quiet=True).train()
    state.write_bytes(state_bytes)
    weights.write_bytes(weight_bytes[: len(weight_bytes) // 2])
    with pytest.raises(ValueError, match=r"step-0000002\.safetensors is not a readable safetensors"):
        Trainer(config, run, device="cpu", quiet=True).train()
    weights.write_bytes(weight_bytes)
    (run / "last.json").write_text("{\"step\": 2, ")
    with pytest.raises(ValueError, match="last.json is corrupt"):
        Trainer(config, run, device="cpu", quiet=True).train()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: one base, several adapter sets
# ----------------------------------------------------------------------------------------------------------------
def _randomised(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_one_base_serves_several_adapter_sets(tmp_path):
    shared = _randomised(build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=2,
                                                                        backbone_kwargs=TINY)))
    save_base(shared, tmp_path / "base.safetensors")
    models = {}
    for ratio, seed in ((10, 1), (25, 2)):
        torch.manual_seed(seed)
        lorun = _randomised(lorun_from(shared, rank=1), seed)
        save_adapters(lorun, tmp_path / f"adapters-cs{ratio}.safetensors", f"cs{ratio}", {"gaussian_ratio": ratio / 100})
        models[ratio] = lorun
    for ratio, lorun in models.items():
        operator = BlockCS.gaussian(ratio / 100)
        loaded = load_lorun(tmp_path / "base.safetensors", tmp_path / f"adapters-cs{ratio}.safetensors", operator)
        y = operator.A(torch.rand(1, 1, 40, 45))
        lorun.operator = operator
        assert torch.equal(loaded(y, (40, 45)), lorun(y, (40, 45)))
        assert loaded.parameter_counts() == lorun.parameter_counts()
    # the base file on its own is the shared model
    assert _same_weights(load_dun(tmp_path / "base.safetensors", BlockCS.gaussian(0.25)), shared)
    # adapter files only hold the adapter set
    size = (tmp_path / "adapters-cs25.safetensors").stat().st_size
    assert size < (tmp_path / "base.safetensors").stat().st_size


def test_mismatched_adapters_and_bases_are_refused(tmp_path):
    operator = BlockCS.gaussian(0.25)
    shared = build_dun(operator, ModelConfig(strategy="shared", num_stages=2, backbone_kwargs=TINY))
    save_base(shared, tmp_path / "base.safetensors")
    save_adapters(lorun_from(shared), tmp_path / "adapters.safetensors")

    other = _randomised(build_dun(operator, ModelConfig(strategy="shared", num_stages=2, backbone_kwargs=TINY)), 5)
    save_base(other, tmp_path / "other_base.safetensors")
    with pytest.raises(ValueError, match="trained on another base"):
        load_lorun(tmp_path / "other_base.safetensors", tmp_path / "adapters.safetensors", operator)

    wider = build_dun(operator, ModelConfig(strategy="shared", num_stages=2, backbone_kwargs={"channels": 3,
                                                                                              "num_blocks": 1}))
    save_base(wider, tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match="is for backbone resunet .* the base is resunet"):
        load_lorun(tmp_path / "wider.safetensors", tmp_path / "adapters.safetensors", operator)

    with pytest.raises(ValueError, match="is an adapter set, not a model"):
        load_dun(tmp_path / "adapters.safetensors", operator)
    with pytest.raises(ValueError, match="not an adapter set"):
        load_lorun(tmp_path / "base.safetensors", tmp_path / "base.safetensors", operator)

    # an adapter set claiming rank 1 but holding rank-2 tensors: the shapes are reported
    lying = lorun_from(shared, rank=2)
    lying.config = ModelConfig(**{**lying.config.to_dict(), "rank": 1})
    save_adapters(lying, tmp_path / "lying.safetensors")
    with pytest.raises(ValueError, match=r"wrong shapes \[.*lora_A"):
        load_lorun(tmp_path / "base.safetensors", tmp_path / "lying.safetensors", operator)
    # a torn file
    data = (tmp_path / "adapters.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(data[:200])
    with pytest.raises(ValueError, match="torn.safetensors is not a readable safetensors"):
        load_lorun(tmp_path / "base.safetensors", tmp_path / "torn.safetensors", operator)


def _ista_block(tmp_path, phases=3, channels=4):
    state = {}
    generator = torch.Generator().manual_seed(0)
    shapes = {"conv_D": (channels, 1, 3, 3), "conv_G": (1, channels, 3, 3),
              **{n: (channels, channels, 3, 3) for n in ("conv1_forward", "conv2_forward", "conv1_backward",
                                                          "conv2_backward")}}
    for k in range(phases):
        state[f"module.fcs.{k}.lambda_step"] = torch.tensor([0.5 + 0.1 * k])
        state[f"module.fcs.{k}.soft_thr"] = torch.tensor([0.01 * (k + 1)])
        for name, shape in shapes.items():
            state[f"module.fcs.{k}.{name}"] = torch.randn(shape, generator=generator) * 0.2
    torch.save(state, tmp_path / "ista.pkl")
    return tmp_path / "ista.pkl"


def test_lorun_on_one_phase_of_a_block_model_with_per_stage_thresholds(tmp_path):
    operator = BlockCS.gaussian(0.25)
    block = import_ista_net_plus(_ista_block(tmp_path), operator)
    shared = shared_from_block(block, 1)
    assert torch.allclose(shared.rho, torch.full((3,), 0.6)) and shared.config.backbone == "ista_net_plus"
    torch.manual_seed(0)
    lorun = lorun_from(shared, per_stage=["soft_thr"])
    y = operator.A(torch.rand(2, 1, 66, 33))
    assert torch.equal(lorun(y, (66, 33)), shared(y, (66, 33)))  # B = 0, offsets 0: exactly the base
    counts = lorun.parameter_counts()
    assert counts["shared"] == shared.parameter_counts()["shared"]
    trainable = sum(p.numel() for p in lorun.parameters() if p.requires_grad)
    assert trainable == sum(counts["per_stage"]) == counts["trainable"]
    # a per-stage threshold changes only its stage
    with torch.no_grad():
        lorun.denoisers[0].parametrizations.soft_thr[0].delta[2] = 0.5
    x1 = lorun.stage(lorun.operator.init(y, (66, 33)), y, 1)
    x1_shared = shared.stage(shared.operator.init(y, (66, 33)), y, 1)
    assert torch.equal(x1, x1_shared)
    assert not torch.equal(lorun(y, (66, 33)), shared(y, (66, 33)))
    # saved and loaded as base + adapters, and in one file; the fast layers compute the same
    save_base(lorun, tmp_path / "base.safetensors")
    save_adapters(lorun, tmp_path / "adapters.safetensors")
    again = load_lorun(tmp_path / "base.safetensors", tmp_path / "adapters.safetensors", operator)
    assert torch.equal(again(y, (66, 33)), lorun(y, (66, 33)))
    save_dun(lorun, tmp_path / "one.safetensors")
    assert torch.equal(load_model(tmp_path / "one.safetensors", operator)(y, (66, 33)), lorun(y, (66, 33)))
    fast = to_fast(lorun, backend="merged")
    assert torch.allclose(fast(y, (66, 33)), lorun(y, (66, 33)), atol=1e-5)
    with pytest.raises(ValueError, match=r"'thr' is not a base parameter .*'soft_thr'"):
        make_per_stage(lorun_from(shared), ["thr"])


def test_train_phase2_on_a_block_base(images, tmp_path):
    pkl = _ista_block(tmp_path)
    config = _config(images, backbone="ista_net_plus", backbone_kwargs={"channels": 4}, num_stages=3, base=str(pkl),
                     base_phase=2, per_stage=["soft_thr"], steps=3, phase1_steps=None)
    trainer = Trainer(config, tmp_path / "run", device="cpu", quiet=True)
    trainer.train()
    base = load_dun(tmp_path / "run" / "base.safetensors", BlockCS.gaussian(0.25))
    assert base.denoisers[0].soft_thr.item() == pytest.approx(0.03)
    deltas = trainer.model.denoisers[0].parametrizations.soft_thr[0].delta
    assert deltas.shape == (3,) and bool((deltas != 0).any())
    with pytest.raises(ValueError, match="base_phase"):
        Trainer(_config(images, backbone="ista_net_plus", backbone_kwargs={"channels": 4}, num_stages=3,
                        base=str(pkl), phase1_steps=None), tmp_path / "r2", quiet=True).train()


# ----------------------------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------------------------
def test_cosine_schedule():
    assert lr_at(0, 0, 100, 1.0) == 1.0
    assert lr_at(99, 0, 100, 1.0, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(49, 0, 99, 1.0) == pytest.approx(0.5)
    assert lr_at(0, 0, 100, 1.0, warmup=4) == 0.25 and lr_at(3, 0, 100, 1.0, warmup=4) == 1.0
    assert lr_at(150, 100, 200, 2.0) < 2.0 and lr_at(100, 100, 200, 2.0) == 2.0


def test_sampler_is_a_function_of_seed_and_step(images):
    sampler = PatchSampler.from_folder(images, 35, 4, seed=3)
    a, b = sampler.batch(7), PatchSampler.from_folder(images, 35, 4, seed=3).batch(7)
    assert torch.equal(a, b) and a.shape == (4, 1, 35, 35) and a.dtype == torch.float32
    assert not torch.equal(a, sampler.batch(8))
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    with pytest.raises(ValueError, match=r"crop: 61×61 is larger than 4 training image\(s\), e.g. img0.png of size 48×48"):
        PatchSampler.from_folder(images, 61, 2)


@pytest.mark.parametrize("changes, message", [
    ({"strategy": "lorun", "phase1_steps": 6}, "phase1_steps"),
    ({"strategy": "shared", "phase1_steps": None, "base": "x.safetensors"}, "only the lorun strategy takes a base"),
    ({"precision": "float16"}, "precision"),
    ({"precision": "bfloat16", "backend": "merged"}, "bfloat16"),
    ({"steps": 0}, "steps"),
    ({"batch_size": 3, "_world": 2}, "not divisible"),
    ({"strategy": "block", "phase1_steps": None, "per_stage": ["soft_thr"]}, "per_stage"),
])
def test_bad_training_options(images, tmp_path, changes, message):
    world = changes.pop("_world", 1)
    with pytest.raises(ValueError, match=message):
        Trainer(_config(images, **changes), tmp_path / "r", world_size=world, quiet=True)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, config: dict, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        trainer = Trainer(TrainConfig.from_dict(config), run_dir, device="cpu", rank=rank, world_size=world_size,
                          quiet=True)
        grads = trainer.gradients()
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()
    # Both ranks are done here; now and then a worker aborts in the interpreter's teardown after this point ("terminate
    # called without an active exception", a C++ thread of torch's distributed stack), which mp.spawn reports as a
    # failed process although every result is written. Leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ddp_gradients(config: TrainConfig, run_dir, out, world_size: int) -> dict[str, torch.Tensor]:
    """The gradients DistributedDataParallel computes with ``world_size`` CPU processes (gloo) for the next step of
    the run in ``run_dir`` (see :meth:`Trainer.gradients`), saved by rank 0 to ``out`` (outside the run folder)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(world_size, _free_port(), config.to_dict(), str(run_dir), str(out)),
             nprocs=world_size, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_gradients(images, tmp_path):
    """torchrun's path: two gloo processes, each on half of the global batch, all-reduced by DDP, against one process
    on the whole batch. The run continues from a phase-1 checkpoint into phase 2 of lorun, so the seeded adapter
    initialisation, the frozen base and the resume all take part."""
    import shutil

    config = _config(images, batch_size=4, steps=4, phase1_steps=2)
    Trainer(config, tmp_path / "single", device="cpu", quiet=True).train(stop_at=2)
    shutil.copytree(tmp_path / "single", tmp_path / "ddp")
    expected = Trainer(config, tmp_path / "single", device="cpu", quiet=True).gradients()
    got = _ddp_gradients(config, tmp_path / "ddp", tmp_path / "ddp_gradients.pt", world_size=2)
    assert expected.keys() == got.keys() and any(".lora_A." in name for name in got)
    assert not any("base_layer" in name for name in got)  # the frozen base gets no gradient
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, words", [
    ("train", ["--strategy", "--phase1-steps", "--resume", "--precision", "torchrun"]),
    ("eval", ["--adapters", "--images", "results.csv"]),
    ("restore", ["--image", "--measurement", "--original"]),
    ("describe", ["--checkpoint", "--gamma", "per stage"]),
])
def test_every_command_has_help(capsys, command, words):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    assert all(word in text for word in words), text


def test_describe_counts_per_strategy_and_stage(capsys, tmp_path):
    assert main(["describe", "--channels", "4", "--stages", "3", "--json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["block"]["total"] == 3 * rows["shared"]["total"] - 2 * 3
    assert rows["shared"]["per_stage"] == [1, 1, 1]
    assert rows["lorun"]["shared"] == rows["shared"]["shared"] and rows["lorun"]["per_stage"][0] > 1
    assert main(["describe", "--backbone", "ista_net_plus", "--per-stage", "soft_thr"]) == 0
    text = capsys.readouterr().out
    assert "block" in text and "per stage" in text and "336,978" in text
    shared = build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=2, backbone_kwargs=TINY))
    save_base(shared, tmp_path / "base.safetensors")
    save_adapters(lorun_from(shared), tmp_path / "a.safetensors")
    assert main(["describe", "--checkpoint", str(tmp_path / "base.safetensors"), "--adapters",
                 str(tmp_path / "a.safetensors")]) == 0
    assert "lorun (2 stages)" in capsys.readouterr().out


def test_restore_one_image_and_a_saved_measurement(images, tmp_path, capsys):
    model = _randomised(build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=2,
                                                                      backbone_kwargs=TINY)))
    save_dun(model, tmp_path / "m.safetensors", {"gaussian_ratio": 0.25, "seed": 0})
    image = images / "img1.png"
    out = tmp_path / "rec.png"
    assert main(["restore", "--checkpoint", str(tmp_path / "m.safetensors"), "--image", str(image), "--out", str(out),
                 "--save-measurement", str(tmp_path / "y.npy"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and Image.open(out).size == Image.open(image).size
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (2, 2, 272)
    out2 = tmp_path / "rec2.png"
    assert main(["restore", "--checkpoint", str(tmp_path / "m.safetensors"), "--measurement", str(tmp_path / "y.npy"),
                 "--size", "50", "41", "--original", str(image), "--out", str(out2), "--device", "cpu"]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))


@pytest.mark.parametrize("argv, message", [
    (["restore", "--checkpoint", "{ckpt}", "--out", "{tmp}/r.png"], "one of the arguments --image --measurement"),
    (["restore", "--checkpoint", "{ckpt}", "--image", "{tmp}/none.png", "--out", "{tmp}/r.png"], "none.png"),
    (["restore", "--checkpoint", "{ckpt}", "--image", "{img}", "--out", "{tmp}/r.jpg"], "expected a .png"),
    (["restore", "--checkpoint", "{tmp}/nope.safetensors", "--image", "{img}", "--out", "{tmp}/r.png"],
     "nope.safetensors"),
    (["eval", "--checkpoint", "{ckpt}", "--images", "{ckpt}"], "is not an image"),
    (["eval", "--checkpoint", "{tmp}/x.pkl", "--adapters", "{ckpt}", "--images", "{imgs}", "--ratio", "25"],
     "needs a lorun_fast base"),
    (["train", "--out", "{tmp}/run", "--train-images", "{tmp}/nothing", "--gaussian", "0"], "nothing"),
    (["train", "--out", "{tmp}/run", "--train-images", "{imgs}", "--gaussian", "0", "--strategy", "shared",
      "--base", "{ckpt}"], "only the lorun strategy"),
    (["train", "--out", "{tmp}/run", "--train-images", "{imgs}", "--gaussian", "0", "--crop", "500",
      "--steps", "2", "--stages", "1", "--channels", "2"], "crop: 500×500 is larger"),
    (["train", "--out", "{tmp}/run", "--train-images", "{imgs}", "--ratio", "33", "--steps", "2"], "ratio 33"),
    (["describe", "--adapters", "{ckpt}"], "--adapters needs --checkpoint"),
])
def test_cli_errors_are_clear(images, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("LORUN_DATA", str(tmp_path / "no_data"))
    model = build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=1, backbone_kwargs=TINY))
    save_dun(model, tmp_path / "m.safetensors", {"gaussian_ratio": 0.25, "seed": 0})
    fill = {"ckpt": str(tmp_path / "m.safetensors"), "tmp": str(tmp_path), "img": str(images / "img0.png"),
            "imgs": str(images)}
    try:
        rc = main([a.format(**fill) for a in argv])
    except SystemExit as exit_info:  # argparse's own usage errors
        rc = exit_info.code
    assert rc == 2
    assert message in capsys.readouterr().err
