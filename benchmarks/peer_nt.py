"""The Neural Tangents side of ``bench_peer.py``: a worker (see ``serve.py``) computing the
workloads of ``workloads.py`` with Neural Tangents 0.6.5 on JAX 0.4.30 (CPU, float64,
``jax.jit`` of the kernel function, as its documentation recommends).

Runs in its own virtual environment (``make bench-peer`` creates ``.venv-peer``):

    .venv-peer/bin/python benchmarks/peer_nt.py
"""

from __future__ import annotations

import time

_start = time.perf_counter()
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402
from serve import serve  # noqa: E402
from workloads import ATTENTION, B_STD, W_STD, WORKLOADS, inputs  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _start


def kernel_fn(name: str):
    """The jit-compiled NNGP + NTK function of workload ``name`` (images in NHWC)."""
    spec = WORKLOADS[name]
    activation = {"relu": stax.Relu, "erf": stax.Erf}[spec["activation"]]
    if spec["kind"] == "attention":  # on (N, L, C): Dense acts at every position
        layers = [stax.Dense(64, W_std=W_STD, b_std=B_STD), activation()]
        for _ in range(spec["depth"]):
            layers += [stax.GlobalSelfAttention(
                n_chan_out=64, n_chan_key=64, n_chan_val=64, n_heads=ATTENTION["n_heads"],
                linear_scaling=True, W_key_std=ATTENTION["W_key_std"],
                W_query_std=ATTENTION["W_query_std"], W_value_std=ATTENTION["W_value_std"],
                W_out_std=ATTENTION["W_out_std"], b_std=ATTENTION["b_std"],
                attention_mechanism="SOFTMAX"), activation()]
        _, _, fn = stax.serial(*layers, stax.GlobalAvgPool(),
                               stax.Dense(1, W_std=W_STD, b_std=B_STD))
        return jax.jit(fn, static_argnames="get")
    layers = []
    for _ in range(spec["depth"]):
        if spec["kind"] == "fc":
            layers.append(stax.Dense(64, W_std=W_STD, b_std=B_STD))
        else:
            layers.append(stax.Conv(64, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD))
        layers.append(activation())
    if spec["kind"] == "cnn":
        layers.append(stax.Flatten() if spec["readout"] == "flatten" else stax.GlobalAvgPool())
    _, _, fn = stax.serial(*layers, stax.Dense(1, W_std=W_STD, b_std=B_STD))
    return jax.jit(fn, static_argnames="get")


def prepare(name: str, dtype: str):
    x = inputs(name).astype(dtype)
    if x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    elif x.ndim == 3:
        x = x.transpose(0, 2, 1)  # NCL -> NLC
    fn = kernel_fn(name)

    def call() -> dict[str, np.ndarray]:
        kernels = fn(x, None, ("nngp", "ntk"))
        return {"nngp": np.asarray(kernels.nngp.block_until_ready()),
                "ntk": np.asarray(kernels.ntk.block_until_ready())}

    return call


if __name__ == "__main__":
    serve(prepare, IMPORT_SECONDS)
