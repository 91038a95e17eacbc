"""CPU-side regression gates for pytest-benchmark: ``pytest bench --benchmark-only``.

Small, fixed problems on the paths every user runs: the merged and unfused LoRA convolution, the CS gradient step
and one LoRun DUN forward. With a GPU present, the CUDA-event time of the same call on the GPU goes into
``extra_info`` beside the CPU numbers (the gates themselves stay on the CPU, where they are comparable run to run).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from lorun_fast.models import ModelConfig, build_dun, to_fast  # noqa: E402
from lorun_fast.reference import BlockCS, LoRAConv2d, merged_conv  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gpu_extra(benchmark, make_call):
    """Time ``make_call(device)`` on the GPU (CUDA events) and record it; nothing without CUDA."""
    if torch.cuda.is_available():
        benchmark.extra_info["cuda"] = harness.time_fn(make_call("cuda"), "cuda")
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()


def _lora_layer(device="cpu"):
    torch.manual_seed(0)
    layer = LoRAConv2d(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), num_stages=3, rank=2).to(device)
    torch.nn.init.normal_(layer.lora_B["1"].weight)
    return layer, torch.randn(1, 16, 64, 64, device=device)


@pytest.mark.parametrize("path", ["unfused", "merged"])
def test_lora_conv_forward(benchmark, path):
    def make_call(device):
        layer, x = _lora_layer(device)

        def call():
            with torch.no_grad():
                return layer(x, 1) if path == "unfused" else merged_conv(layer, x, 1)
        return call

    call = make_call("cpu")
    assert benchmark(call).shape == (1, 16, 64, 64)
    _gpu_extra(benchmark, make_call)


def test_cs_gd_step(benchmark):
    def make_call(device):
        operator = BlockCS.gaussian(0.25, seed=0).to(device=device, dtype=torch.float32)
        x = torch.rand(4, 1, 99, 99, device=device)
        y = operator.A(x)
        return lambda: operator.gd_step(x, y, 0.5)

    assert benchmark(make_call("cpu")).shape == (4, 1, 99, 99)
    _gpu_extra(benchmark, make_call)


@pytest.mark.parametrize("backend", ["reference", "merged"])
def test_lorun_dun_forward(benchmark, backend):
    def make_call(device):
        operator = BlockCS.gaussian(0.25, seed=0)
        model = build_dun(operator, ModelConfig(num_stages=3, backbone_kwargs={"channels": 8, "num_blocks": 1}))
        model = to_fast(model, backend=backend).to(device).eval()
        y = model.operator.A(torch.rand(1, 1, 66, 66, device=device))

        def call():
            with torch.no_grad():
                return model(y)
        return call

    assert benchmark(make_call("cpu")).shape == (1, 1, 66, 66)
    _gpu_extra(benchmark, make_call)
