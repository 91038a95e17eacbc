"""Heterogeneous adapter batches: one base, several adapter sets, each sample naming its set (and so its Φ)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorun_fast import FusedLoRunConv
from lorun_fast.adapter_sets import AdapterSets, load_adapter_sets, read_manifest
from lorun_fast.checkpoints import save_adapters, save_base
from lorun_fast.models import ModelConfig, build_dun, lorun_from, make_per_stage
from lorun_fast.reference import BlockCS, LoRAConv2d
from lorun_fast.testing import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("single_thread")

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = (33, 66)


def _randomise(model, seed, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".delta"):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
        model.rho.mul_(1 + 0.05 * seed)


def _sets(backbone="resunet", ratios=(0.25, 0.10, 0.40), gammas=(25, 10, 50), per_stage=()):
    """Lorun DUNs on one shared base: one per CS ratio (its own seeded Gaussian Φ), with different ranks."""
    kwargs = {"channels": 4, "num_blocks": 1} if backbone == "resunet" else {"channels": 4}
    base_op = BlockCS.gaussian(ratios[0], seed=0)
    torch.manual_seed(0)
    shared = build_dun(base_op, ModelConfig(strategy="shared", num_stages=3, backbone=backbone,
                                            backbone_kwargs=kwargs))
    models = {}
    for i, (ratio, gamma) in enumerate(zip(ratios, gammas)):
        model = lorun_from(shared, gamma=gamma, per_stage=per_stage)
        model.operator = BlockCS.gaussian(ratio, seed=i)
        _randomise(model, seed=i + 1)
        models[f"cs{round(ratio * 100)}"] = model.double()
    return models


def _measure(models, names, seed=0):
    x = torch.rand(len(names), 1, *SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [models[n].operator.A(x[i:i + 1]) for i, n in enumerate(names)]


NAMES = ["cs10", "cs25", "cs10", "cs40", "cs25", "cs10"]


def test_mixed_batch_equals_each_set_alone():
    models = _sets()
    sets = AdapterSets(models, backend="merged")
    ys = _measure(models, NAMES)
    reference = sets.reference(ys, NAMES, SIZE)
    # the reference is exactly each set's own DUN on its samples
    for name in set(NAMES):
        picked = [i for i, n in enumerate(NAMES) if n == name]
        assert torch.equal(reference[picked], models[name](torch.cat([ys[i] for i in picked]), SIZE))
    assert_close_to_reference("mixed batch", sets(ys, NAMES, SIZE), reference, torch.float64)
    with torch.no_grad():  # the cached inference path
        assert_close_to_reference("mixed batch, no grad", sets(ys, NAMES, SIZE), reference, torch.float64)
        assert_close_to_reference("one set", sets(ys[:1], NAMES[:1], SIZE), reference[:1], torch.float64)


def test_mixed_batch_gradients_equal_each_set_alone():
    models = _sets()
    sets = AdapterSets(models, backend="merged")
    ys = _measure(models, NAMES)
    target = torch.rand(len(NAMES), 1, *SIZE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    F.mse_loss(sets(ys, NAMES, SIZE), target, reduction="sum").backward()
    for g, name in enumerate(sets.names):
        picked = [i for i, n in enumerate(NAMES) if n == name]
        model = models[name]
        model.zero_grad()
        out = model(torch.cat([ys[i] for i in picked]), SIZE)
        F.mse_loss(out, target[picked], reduction="sum").backward()
        assert_close_to_reference(f"{name}: d rho", sets.rho.grad[g], model.rho.grad, torch.float64)
        combined = {n: m for n, m in sets.denoiser.named_modules() if isinstance(m, FusedLoRunConv)}
        for layer_name, layer in zip(model.lora_names, [m for m in model.denoisers[0].modules()
                                                         if isinstance(m, LoRAConv2d)]):
            for k in range(model.num_stages):
                v = str(g * model.num_stages + k)
                assert_close_to_reference(f"{name} {layer_name} stage {k}: dA",
                                          combined[layer_name].lora_A[v].weight.grad,
                                          layer.lora_A[str(k)].weight.grad, torch.float64)
                assert_close_to_reference(f"{name} {layer_name} stage {k}: dB",
                                          combined[layer_name].lora_B[v].weight.grad,
                                          layer.scaling * layer.lora_B[str(k)].weight.grad, torch.float64)


def test_sets_with_per_stage_thresholds_run_set_by_set():
    """ISTA-Net+ phases with per-stage θ_k (offsets that are not per sample): the denoiser runs set by set."""
    models = _sets(backbone="ista_net_plus", gammas=(10, 25, 10), per_stage=("soft_thr",))
    sets = AdapterSets(models, backend="merged")
    assert sets._offsets
    ys = _measure(models, NAMES)
    assert_close_to_reference("ista sets", sets(ys, NAMES, SIZE), sets.reference(ys, NAMES, SIZE), torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a whole DUN in the Triton interpreter takes minutes; "
                    "the layer test below runs the indexed kernel in the interpreter")
def test_mixed_batch_on_the_fused_kernel():
    models = _sets()
    ys = _measure(models, NAMES)
    with torch.no_grad():
        reference = AdapterSets(models).reference(ys, NAMES, SIZE)
    sets = AdapterSets(copy.deepcopy(models), backend="triton", input_precision="ieee").to(TRITON_DEVICE,
                                                                                          torch.float32)
    with torch.no_grad():
        got = sets([y.to(TRITON_DEVICE, torch.float32) for y in ys], NAMES, SIZE)
    assert_close_to_reference("mixed batch, triton", got.cpu(), reference.detach(), "ieee")


def test_bad_input_is_refused_by_name():
    models = _sets()
    sets = AdapterSets(models, backend="merged")
    ys = _measure(models, NAMES)
    with pytest.raises(ValueError, match=r"adapters: unknown adapter set\(s\) \['cs99'\]; expected names from"):
        sets(ys, ["cs99"] + NAMES[1:], SIZE)
    with pytest.raises(ValueError, match="adapters: 5 names for 6 samples"):
        sets(ys, NAMES[:5], SIZE)
    with pytest.raises(TypeError, match="adapters: expected a sequence of set names"):
        sets(ys, "cs10", SIZE)
    swapped = [ys[1]] + ys[1:]  # a 25% measurement given as the cs10 sample: Φ of another size
    with pytest.raises(ValueError, match=r"y\[0\]: shape \(1, 1, 1, 2, 272\), but set 'cs10' measures a 33×66 "
                                         r"image as \(1, 1, 1, 2, 109\)"):
        sets(swapped, NAMES, SIZE)
    with pytest.raises(ValueError, match=r"y\[1\]: expected one sample's measurement with a leading batch of 1"):
        sets([ys[0], torch.cat([ys[1], ys[1]])], NAMES[:2], SIZE)
    with pytest.raises(ValueError, match=r"y\[0\]: torch.float32 on cpu, but the sets are torch.float64"):
        sets([ys[0].float()], NAMES[:1], SIZE)
    bigger = models["cs25"].operator.A(torch.rand(1, 1, 66, 66, dtype=torch.float64))
    with pytest.raises(ValueError, match="size: the samples come from images of different sizes"):
        sets([ys[0], bigger], ["cs10", "cs25"])
    # adapters of another base
    other = dict(models)
    foreign = lorun_from(build_dun(BlockCS.gaussian(0.25, seed=0),
                                   ModelConfig(strategy="shared", num_stages=3,
                                               backbone_kwargs={"channels": 4, "num_blocks": 1})), gamma=25).double()
    other["foreign"] = foreign
    with pytest.raises(ValueError, match=r"models\['foreign'\]: adapters of another base than 'cs25'"):
        AdapterSets(other)
    with pytest.raises(ValueError, match=r"models\['x'\]: expected a 'lorun' DUN"):
        AdapterSets({"x": build_dun(BlockCS.gaussian(0.25), ModelConfig(strategy="shared", num_stages=3,
                                                                          backbone_kwargs={"channels": 4}))})


def test_files_and_manifest(tmp_path):
    models = {name: model.float() for name, model in _sets().items()}  # files hold float32, as training writes
    first = next(iter(models.values()))
    save_base(first, tmp_path / "base.safetensors")
    files = {}
    for i, (name, model) in enumerate(models.items()):
        files[name] = tmp_path / f"adapters-{name}.safetensors"
        save_adapters(model, files[name], name=name,
                      task={"task": "cs", "gaussian_ratio": [0.25, 0.10, 0.40][i], "seed": i})
    manifest = tmp_path / "mixed.json"
    manifest.write_text(json.dumps({"adapters": {n: f.name for n, f in files.items()},
                                    "images": {"a.png": "cs10", "b.png": "cs40"}}))
    adapter_files, images = read_manifest(manifest)
    assert adapter_files == files and images == {"a.png": "cs10", "b.png": "cs40"}
    loaded = load_adapter_sets(tmp_path / "base.safetensors", adapter_files)
    sets = AdapterSets(loaded, backend="merged")
    ys = [y.float() for y in _measure(models, NAMES)]
    got, want = sets(ys, NAMES, SIZE), AdapterSets(models).reference(ys, NAMES, SIZE)
    assert_close_to_reference("from files", got.double(), want.double(), "ieee")
    for text, message in [("[1, 2]", "must hold exactly the keys"), ("{", "is not valid JSON"),
                          (json.dumps({"adapters": {"cs10": files["cs10"].name}, "images": {"a.png": "cs25"}}),
                           r"images name unknown set\(s\) \['cs25'\]"),
                          (json.dumps({"adapters": {"cs10": "missing.safetensors"}, "images": {}}),
                           "set 'cs10': .*missing.safetensors does not exist")]:
        manifest.write_text(text)
        with pytest.raises(ValueError if "exist" not in message else FileNotFoundError, match=message):
            read_manifest(manifest)


# ----------------------------------------------------------------------------------------------------------------
# The layer: a per-image stage index
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_layer_takes_a_per_image_stage_index(transposed):
    generator = torch.Generator().manual_seed(3)
    base = (nn.ConvTranspose2d(4, 6, 2, stride=2) if transposed else nn.Conv2d(4, 6, 3, padding=1)).double()
    reference = LoRAConv2d(base, 4, rank=[1, 3, 2, 2])
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    fast = FusedLoRunConv.from_lora(reference, backend="merged")
    index = torch.tensor([2, 0, 2, 3])
    x = torch.randn(8, 4, 5, 7, generator=generator, dtype=torch.float64)  # two rows (blocks) per image
    residual_shape = fast(x[:2], 0).shape
    residual = torch.randn(8, *residual_shape[1:], generator=generator, dtype=torch.float64)
    want = torch.cat([F.relu(reference(x[2 * i:2 * i + 2], int(s))) * 0.5 + residual[2 * i:2 * i + 2]
                      for i, s in enumerate(index)])
    got = fast(x, index, relu=True, residual=residual, out_scale=0.5)
    assert_close_to_reference("per-image stages", got, want, torch.float64)
    with torch.no_grad():
        assert_close_to_reference("per-image stages, cached", fast(x, index, relu=True, residual=residual,
                                                                   out_scale=0.5), want, torch.float64)
    fast.active_stage = index  # what AdapterSets sets
    assert_close_to_reference("active_stage index", fast(x), torch.cat(
        [reference(x[2 * i:2 * i + 2], int(s)) for i, s in enumerate(index)]), torch.float64)
    with pytest.raises(IndexError, match=r"stage: per-sample stages must be in \[0, 4\), got values from 0 to 4"):
        fast(x, torch.tensor([0, 4, 1, 1]))
    with pytest.raises(ValueError, match="stage: one stage per image, and x's rows must be a whole number"):
        fast(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="stage: a per-sample stage index must be an integer tensor"):
        fast(x, torch.tensor([0.0, 1.0]))


def test_layer_index_on_the_fused_kernel():
    """The Triton path of a per-image index: one launch of the indexed kernel (interpreter on a CPU)."""
    generator = torch.Generator().manual_seed(4)
    reference = LoRAConv2d(nn.Conv2d(5, 6, 3, padding=1, bias=True).double(), 4, rank=[1, 3, 2, 2])
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    fast = FusedLoRunConv.from_lora(reference, backend="triton", input_precision="ieee").to(TRITON_DEVICE,
                                                                                         torch.float32)
    index = torch.tensor([3, 1, 3])
    x = torch.randn(3, 5, 7, 6, generator=generator, dtype=torch.float64)
    want = torch.cat([F.relu(reference(x[i:i + 1], int(s))) for i, s in enumerate(index)])
    xg = x.float().to(TRITON_DEVICE).requires_grad_()
    got = fast(xg, index.to(TRITON_DEVICE), relu=True)
    assert_close_to_reference("per-image stages, triton", got.detach().cpu(), want, "ieee")
    got.sum().backward()
    xr = x.clone().requires_grad_()
    torch.cat([F.relu(reference(xr[i:i + 1], int(s))) for i, s in enumerate(index)]).sum().backward()
    assert_close_to_reference("dx, triton", xg.grad.cpu(), xr.grad, "ieee")
    assert_close_to_reference("dA stage 3, triton", fast.lora_A["3"].weight.grad.cpu(),
                              reference.lora_A["3"].weight.grad, "ieee")
    assert torch.count_nonzero(fast.lora_A["0"].weight.grad if fast.lora_A["0"].weight.grad is not None
                               else torch.zeros(1)) == 0


def test_eval_with_a_manifest_matches_each_set_alone(tmp_path, capsys):
    """eval --manifest: each image measured with its set's Φ and reconstructed in mixed batches gives the scores
    eval gives each set alone (--adapters)."""
    import numpy as np
    from PIL import Image

    from lorun_fast.cli import main

    models = {name: model.float() for name, model in _sets().items()}
    first = next(iter(models.values()))
    save_base(first, tmp_path / "base.safetensors")
    for i, (name, model) in enumerate(models.items()):
        save_adapters(model, tmp_path / f"{name}.safetensors", name=name,
                      task={"task": "cs", "gaussian_ratio": [0.25, 0.10, 0.40][i], "seed": i})
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    assignment = {}
    for i, (shape, name) in enumerate([((40, 50), "cs10"), ((40, 50), "cs40"), ((40, 50), "cs10"),
                                       ((33, 20), "cs25"), ((40, 50), "cs25")]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / f"im{i}.png")
        assignment[f"im{i}.png"] = name
    manifest = tmp_path / "mixed.json"
    manifest.write_text(json.dumps({"adapters": {n: f"{n}.safetensors" for n in models}, "images": assignment}))
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(tmp_path / "base.safetensors"), "--manifest", str(manifest),
                 "--images", str(images), "--out", str(out), "--batch-size", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "set cs10: 2 images" in text
    rows = {r[0]: r for r in (line.split(",") for line in (out / "results.csv").read_text().splitlines()[1:])}
    assert (out / "results.csv").read_text().splitlines()[0].endswith(",adapters")
    for name in models:
        alone = tmp_path / f"alone-{name}"
        picked = [f for f, n in assignment.items() if n == name]
        assert main(["eval", "--checkpoint", str(tmp_path / "base.safetensors"), "--adapters",
                     str(tmp_path / f"{name}.safetensors"), "--images", *[str(images / f) for f in picked],
                     "--out", str(alone), "--quiet"]) == 0
        for line in (alone / "results.csv").read_text().splitlines()[1:]:
            image, *_ = line.split(",")
            assert rows[image][-1] == name
            assert abs(float(rows[image][3]) - float(line.split(",")[3])) < 2e-3, (image, rows[image], line)
    capsys.readouterr()
    # refusals
    assert main(["eval", "--checkpoint", str(tmp_path / "base.safetensors"), "--manifest", str(manifest),
                 "--images", str(images), "--ratio", "25", "--quiet"]) == 2
    assert "--ratio: with --manifest each set's file gives its adapters and Φ" in capsys.readouterr().err
    (images / "extra.png").write_bytes((images / "im0.png").read_bytes())
    assert main(["eval", "--checkpoint", str(tmp_path / "base.safetensors"), "--manifest", str(manifest),
                 "--images", str(images), "--quiet"]) == 2
    assert "names no adapter set for ['extra.png']" in capsys.readouterr().err


def test_mixed_batch_runs_one_fused_cs_step_with_per_sample_phi(monkeypatch):
    """With fast block-CS operators on the kernel path, every stage's gradient step is one gd_step_cs_indexed
    launch for the whole batch (per-sample Φ and ρ); the result equals each set alone."""
    from lorun_fast.kernels import gd_step_cs
    from lorun_fast.operators import fast_operator

    models = {name: model.float() for name, model in _sets().items()}
    ys = [y.float() for y in _measure(models, NAMES)]
    with torch.no_grad():
        reference = AdapterSets(copy.deepcopy(models)).reference(ys, NAMES, SIZE)
    sets = AdapterSets(models, backend="merged")
    sets.operators = nn.ModuleList([fast_operator(op, backend="triton", input_precision="ieee")
                                    for op in sets.operators])
    calls = []
    original = gd_step_cs.gd_step_cs_indexed
    monkeypatch.setattr(gd_step_cs, "gd_step_cs_indexed", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = sets(ys, NAMES, SIZE)
    assert len(calls) == sets.num_stages, "one indexed step per stage"
    assert_close_to_reference("mixed batch, fused CS step", x.detach().double(), reference.double(), "ieee")
    x.sum().backward()
    assert sets.rho.grad is not None and torch.isfinite(sets.rho.grad).all()


def test_restore_takes_the_set_a_manifest_names(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from lorun_fast.cli import main

    models = {name: model.float() for name, model in _sets().items()}
    save_base(next(iter(models.values())), tmp_path / "base.safetensors")
    for i, (name, model) in enumerate(models.items()):
        save_adapters(model, tmp_path / f"{name}.safetensors", name=name,
                      task={"task": "cs", "gaussian_ratio": [0.25, 0.10, 0.40][i], "seed": i})
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50), dtype=np.uint8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"adapters": {n: f"{n}.safetensors" for n in models}, "images": {"a.png": "cs40"}}))
    base = str(tmp_path / "base.safetensors")
    assert main(["restore", "--checkpoint", base, "--manifest", str(manifest), "--image", str(tmp_path / "a.png"),
                 "--out", str(tmp_path / "m.png")]) == 0
    assert main(["restore", "--checkpoint", base, "--adapters", str(tmp_path / "cs40.safetensors"), "--image",
                 str(tmp_path / "a.png"), "--out", str(tmp_path / "alone.png")]) == 0
    assert (tmp_path / "m.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    capsys.readouterr()
    assert main(["restore", "--checkpoint", base, "--manifest", str(manifest), "--adapters",
                 str(tmp_path / "cs10.safetensors"), "--image", str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--adapters: with --manifest the manifest names the adapter set" in capsys.readouterr().err
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(tmp_path / "b.png")
    assert main(["restore", "--checkpoint", base, "--manifest", str(manifest), "--image", str(tmp_path / "b.png"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "names no adapter set for b.png" in capsys.readouterr().err


def test_the_base_is_held_once():
    models = _sets()
    sets = AdapterSets(models, backend="merged")
    base_params = {id(p) for n, p in sets.denoiser.named_parameters() if "lora_" not in n}
    for model in models.values():
        mine = [p for n, p in model.denoisers[0].named_parameters() if "lora_" not in n and ".delta" not in n]
        assert mine and all(id(p) in base_params for p in mine)
    ys = _measure(models, NAMES)
    assert_close_to_reference("after sharing", sets(ys, NAMES, SIZE), sets.reference(ys, NAMES, SIZE), torch.float64)
    sets.float()  # a conversion touches each shared tensor once per owner: idempotent
    assert all(p.dtype == torch.float32 for p in sets.parameters())
