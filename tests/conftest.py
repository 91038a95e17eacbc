"""Shared test setup: Triton runs in its interpreter on machines without CUDA; real data is optional."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decorates a kernel, i.e. before lorun_fast.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk caches are keyed on the traced graph, not on the custom ops' schemas: a graph compiled against an
# older lorun_fast (another checkout, an earlier version) would be reused and call an op with the old arguments. The
# tests compile into a cache of their own run instead (unless the caller chose one).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorun_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

from lorun_fast.io import data_root  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data():
    """The shared benchmark data folder, or a skip saying where it was looked for."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set LORUN_DATA to run the data tests)")
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's spinning threads
    made small tests 10× slower; the previous setting is restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
