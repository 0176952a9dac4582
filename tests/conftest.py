"""Shared fixtures: float64 inputs and the Neural Tangents reference file."""

from __future__ import annotations

import os

# scikit-learn's estimator checks include one that runs with array-API dispatch on NumPy
# inputs; it needs SciPy's array-API mode, which must be chosen before SciPy is imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

from pathlib import Path  # noqa: E402

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference() -> np.lib.npyio.NpzFile:
    """Kernel values computed with Neural Tangents 0.6.5 (float64, NTK parameterization)."""
    return np.load(DATA / "nt_reference_public.npz")


@pytest.fixture(scope="session")
def attention_reference() -> np.lib.npyio.NpzFile:
    """Neural Tangents 0.6.5 kernels of attention, graph, masked and dropout networks
    (see tests/data/README.md)."""
    return np.load(DATA / "nt_reference_attention.npz")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, then restore the setting: tests of tiny tensors or
    many small operations are faster on one thread than on two that contend on a busy
    2-core machine (measured 1.7 to 3 times on the contract kit and the Monte Carlo
    Jacobians). Results do not depend on it. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float64 inputs ``(n, d)``."""
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``cuda`` marker: tests that need a CUDA GPU (``pytest -m cuda``).

    Such tests also carry ``skipif(not torch.cuda.is_available())`` with its reason (see
    ``tests/test_cuda.py``), so without a GPU they are reported as skipped, never run.
    """
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU; compares CUDA results with CPU ones "
        "(select with pytest -m cuda, skipped when torch.cuda.is_available() is False)"
    )
