"""The named speed workloads, described without any library.

Each workload is NNGP + NTK of one architecture on one set of inputs, ``x2=None``,
float64. The descriptions are plain data so that the widenets benchmark and the Neural
Tangents peer (``peer_nt.py``, in its own virtual environment) build the same
networks; :func:`inputs` gives both the same arrays (NumPy's PCG64 with a fixed seed;
images in PyTorch's ``(N, C, H, W)`` layout, the peer transposes them to ``NHWC``).

All weighted layers: ``W_std=1.5``, ``b_std=0.05``; dense hidden layers 64 wide (the
width does not enter the kernels); convolutions 64 channels, 3x3 filters, ``same``
padding; a ``Linear(1)`` read-out.
"""

from __future__ import annotations

import numpy as np

W_STD, B_STD = 1.5, 0.05

#: name -> architecture and input shape.
WORKLOADS: dict[str, dict] = {
    "fc-relu-3": dict(kind="fc", depth=3, activation="relu", shape=(3000, 100)),
    "fc-erf-10": dict(kind="fc", depth=10, activation="erf", shape=(2000, 50)),
    "cnn-flatten": dict(kind="cnn", depth=3, activation="relu", readout="flatten",
                        shape=(400, 3, 8, 8)),
    "cnn-gap": dict(kind="cnn", depth=3, activation="relu", readout="gap",
                    shape=(64, 3, 8, 8)),
    "attn-2": dict(kind="attention", depth=2, activation="relu", shape=(64, 8, 16)),
}

#: The attention workload's layers (Neural Tangents' ``GlobalSelfAttention`` arguments):
#: softmax, logits scaled by 1 / n_key (tied keys and queries), 4 heads.
ATTENTION = dict(n_heads=4, W_key_std=1.0, W_query_std=1.0, W_value_std=1.2, W_out_std=1.0,
                 b_std=B_STD)


def describe(name: str) -> str:
    """A one-line description of workload ``name``."""
    spec = WORKLOADS[name]
    shape = "x".join(map(str, spec["shape"]))
    if spec["kind"] == "fc":
        return f"{spec['depth']} x (Dense 64 + {spec['activation']}), inputs {shape}"
    if spec["kind"] == "attention":
        return (f"Dense 64 + relu, {spec['depth']} x (softmax attention, 4 heads + relu) + "
                f"gap, sequences {shape} (N, C, L)")
    return (f"{spec['depth']} x (Conv 64 3x3 same + {spec['activation']}) + "
            f"{spec['readout']}, images {shape}")


def inputs(name: str) -> np.ndarray:
    """The inputs of workload ``name`` (float64, standard normal, fixed seed)."""
    return np.random.default_rng(0).standard_normal(WORKLOADS[name]["shape"])


def widenets_net(name: str):
    """The widenets architecture of workload ``name`` (from :mod:`widenets.architectures`)."""
    from widenets.architectures import cnn, mlp

    spec = WORKLOADS[name]
    if spec["kind"] == "fc":
        return mlp(spec["depth"], spec["activation"], 64, W_STD, B_STD)
    if spec["kind"] == "attention":
        import widenets as wn

        layers = [wn.Conv1d(64, 1, W_std=W_STD, b_std=B_STD), wn.ReLU()]
        for _ in range(spec["depth"]):
            layers += [wn.SelfAttention(**ATTENTION), wn.ReLU()]
        return wn.Sequential(*layers, wn.GlobalAvgPool(), wn.Linear(1, W_STD, B_STD))
    return cnn(spec["depth"], spec["activation"], 64, spec["readout"], W_STD, B_STD)
