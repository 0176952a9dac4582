"""Empirical NTK and NNGP of arbitrary modules against an explicit Jacobian.

The reference Jacobian is built here with a plain autograd loop: one
``torch.autograd.grad`` call per example and per output, over the trainable parameters.
Every implementation of ``empirical_ntk``, with ``outputs="full"`` and ``"mean"``,
``x2`` given and ``None``, and batch sizes that do not divide N, must match it to 1e-8
relative in float64, on models with convolutions, BatchNorm in eval mode, several
outputs and a frozen parameter; and the model must be left exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import widenets as wn

DTYPE = torch.float64
IMPLEMENTATIONS = ["auto", "jacobian", "ntk_vector", "structured"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def cnn() -> nn.Module:
    """Convolutions, BatchNorm with non-trivial running statistics (eval), a frozen bias."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ).to(DTYPE)
    batch_norm = model[1]
    batch_norm.running_mean.uniform_(-0.5, 0.5)
    batch_norm.running_var.uniform_(0.5, 2.0)
    model[3].bias.requires_grad_(False)
    return model.eval()


MODELS = {
    "mlp": (mlp, (4,)),
    "cnn": (cnn, (2, 5, 5)),
}


def inputs(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=DTYPE, generator=generator)


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, O, P)``: d f_o(x_n) / d theta by one autograd call per example and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for example in x:
        out = model(example[None])[0]
        rows.append(torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[o], params,
                                                                   retain_graph=True)])
            for o in range(out.shape[0])
        ]))
    return torch.stack(rows)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(after["grads"][name], grad), name


@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_ntk_matches_explicit_jacobian(name, implementation, second):
    make, shape = MODELS[name]
    model = make()
    x1 = inputs(shape, 5, seed=2)
    x2 = None if second == "x2=None" else inputs(shape, 3, seed=3)
    # Gradients already present must survive the call.
    model(x1).sum().backward()
    before = snapshot(model)

    jac1 = explicit_jacobian(model, x1)
    jac2 = jac1 if x2 is None else explicit_jacobian(model, x2)
    expected_full = torch.einsum("aop,bqp->aboq", jac1, jac2)
    expected_mean = torch.diagonal(expected_full, dim1=2, dim2=3).mean(dim=2)
    # The reference loop itself must not count the frozen parameter.
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert jac1.shape[2] == n_trainable

    full = wn.empirical_ntk(model, x1, x2, outputs="full", implementation=implementation,
                            batch_size=2)
    mean = wn.empirical_ntk(model, x1, x2, outputs="mean", implementation=implementation,
                            batch_size=2)
    n2 = 5 if x2 is None else 3
    assert full.shape == (5, n2, 3, 3) and mean.shape == (5, n2)
    assert relative_error(full, expected_full) < 1e-8
    assert relative_error(mean, expected_mean) < 1e-8
    torch.testing.assert_close(wn.empirical_ntk(model, x1, x2, implementation=implementation),
                               mean, rtol=1e-12, atol=1e-12)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_empirical_nngp_full_and_mean(name):
    make, shape = MODELS[name]
    model = make()
    x1, x2 = inputs(shape, 4, seed=4), inputs(shape, 3, seed=5)
    before = snapshot(model)
    with torch.no_grad():
        f1, f2 = model(x1), model(x2)
    full = wn.empirical_nngp(model, x1, x2, outputs="full")
    assert full.shape == (4, 3, 3, 3)
    torch.testing.assert_close(full[1, 2], torch.outer(f1[1], f2[2]), rtol=1e-13, atol=0)
    torch.testing.assert_close(wn.empirical_nngp(model, x1, x2), f1 @ f2.T / 3, rtol=1e-13,
                               atol=0)
    torch.testing.assert_close(wn.empirical_nngp(model, x1, outputs="full"),
                               torch.einsum("ao,bp->abop", f1, f1), rtol=1e-13, atol=0)
    assert_unchanged(model, before)


def test_training_mode_leaves_running_statistics_alone():
    """A forward in training mode updates BatchNorm's running statistics; the empirical
    NNGP must not, nor change the mode. The NTK refuses training-mode BatchNorm."""
    model = cnn().train()
    before = snapshot(model)
    x = inputs((2, 5, 5), 3, seed=6)
    wn.empirical_nngp(model, x)
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(ValueError, match=r"BatchNorm layers in eval mode.*1 is in training"):
            wn.empirical_ntk(model, x, implementation=implementation)
    assert_unchanged(model, before)


def test_bad_input():
    model = mlp()
    x = inputs((4,), 3, seed=7)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        wn.empirical_ntk(lambda t: t, x)
    with pytest.raises(ValueError, match="outputs must be one of"):
        wn.empirical_ntk(model, x, outputs="diagonal")
    with pytest.raises(ValueError, match="implementation must be one of"):
        wn.empirical_ntk(model, x, implementation="fastest")
    with pytest.raises(ValueError, match="model rejects inputs of shape"):
        wn.empirical_ntk(model, inputs((5,), 3, seed=8))
    with pytest.raises(ValueError, match="model rejects inputs of shape"):
        wn.empirical_nngp(model, inputs((5,), 3, seed=8))
    images = nn.Sequential(nn.Conv2d(2, 3, 3)).to(DTYPE)
    with pytest.raises(ValueError, match=r"must be \(N,\) or \(N, outputs\)"):
        wn.empirical_ntk(images, inputs((2, 5, 5), 2, seed=9))
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        wn.empirical_ntk(frozen, x)
    with pytest.raises(TypeError, match="batch_size"):
        wn.empirical_ntk(model, x, batch_size=2.0)


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vector", "structured"])
def test_memory_bounded_batches_give_the_same_kernel(implementation, monkeypatch):
    """With no room to keep x2's per-batch Jacobians, they are recomputed for every batch
    of x1 (bounded memory) and the kernel is unchanged."""
    from widenets import empirical

    model = cnn()
    x1, x2 = inputs((2, 5, 5), 5, seed=12), inputs((2, 5, 5), 4, seed=13)
    kept = {second is None: wn.empirical_ntk(model, x1, second, outputs="full",
                                             implementation=implementation, batch_size=2)
            for second in (None, x2)}
    calls = []
    original = empirical._jacobians
    monkeypatch.setattr(empirical, "_jacobians", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(empirical, "PARTS_CACHE_BYTES", 0)
    for second in (None, x2):
        calls.clear()
        recomputed = wn.empirical_ntk(model, x1, second, outputs="full",
                                      implementation=implementation, batch_size=2)
        torch.testing.assert_close(recomputed, kept[second is None], rtol=1e-13, atol=1e-13)
        if implementation == "jacobian":
            # 3 row batches; x2=None: the columns right of the diagonal, 2 + 1 (the
            # diagonal block reuses its row batch); x2 given: 3 x 2.
            assert len(calls) == (3 + 2 + 1 if second is None else 3 + 3 * 2)


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e200), (torch.float32, 1e25)])
def test_overflowing_kernel_raises(dtype, scale):
    """A linear model's NTK is ``x1 . x2 + 1`` and its NNGP ``f(x1) f(x2)``: at these
    scales both exceed the dtype's range. A clear error, never a kernel of inf."""
    torch.manual_seed(14)
    model = nn.Linear(3, 2).to(dtype)
    x = inputs((3,), 4, seed=15).to(dtype) * scale
    message = rf"overflows {dtype}.*rescale the inputs"
    for implementation in IMPLEMENTATIONS:
        for outputs in ("mean", "full"):
            with pytest.raises(ValueError, match=message.replace("overflows", "NTK overflows")):
                wn.empirical_ntk(model, x, outputs=outputs, implementation=implementation)
    with pytest.raises(ValueError, match=message.replace("overflows", "NNGP overflows")):
        wn.empirical_nngp(model, x, outputs="full")
    with pytest.raises(ValueError, match=message):
        wn.empirical_nngp(model, x, x[:2])
    # Rescaled inputs are fine.
    assert bool(torch.isfinite(wn.empirical_ntk(model, x / scale)).all())


class _Returns(nn.Module):
    """A linear layer whose output is passed through ``transform``."""

    def __init__(self, transform) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).to(DTYPE)
        self.transform = transform

    def forward(self, x: torch.Tensor):
        return self.transform(self.linear(x))


@pytest.mark.parametrize("kind, error, message", [
    ("tuple", TypeError, r"must return a tensor \(N,\) or \(N, outputs\), got tuple"),
    ("dict", TypeError, r"must return a tensor \(N,\) or \(N, outputs\), got dict"),
    ("integer", TypeError, r"output must be a real floating tensor, got torch.int64"),
    ("batch-summed", ValueError, r"one row per input example: got shape \(1, 3\) for"),
    ("transposed", ValueError, r"one row per input example: got shape \(3, \d\) for"),
])
def test_model_outputs_other_than_a_batch_of_floats_are_refused(kind, error, message):
    transforms = {
        "tuple": lambda out: (out, out.sum()),
        "dict": lambda out: {"logits": out},
        "integer": lambda out: out.argmax(dim=1),
        "batch-summed": lambda out: out.sum(dim=0, keepdim=True),
        "transposed": lambda out: out.T,
    }
    model = _Returns(transforms[kind])
    x = inputs((4,), 5, seed=16)
    for implementation in IMPLEMENTATIONS:
        with pytest.raises(error, match=message):
            wn.empirical_ntk(model, x, implementation=implementation)
    with pytest.raises(error, match=message):
        wn.empirical_nngp(model, x)


def test_the_models_own_hooks_are_kept_and_nothing_is_added():
    """The kernels are computed on a private copy of the model's modules: the model's own
    forward hooks still apply, here a method of the model multiplying the output by a
    trainable gain ``g`` (so the NTK of ``g f`` is ``g^2 NTK_f + NNGP_f``: the hook must
    read the gain being differentiated), and the call registers nothing on the model."""

    class Gained(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.gain = nn.Parameter(torch.tensor(2.0, dtype=DTYPE))
            self.register_forward_hook(self.scale)

        def scale(self, module, args, output):
            return self.gain * output

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Gained()
    x = inputs((4,), 4, seed=17)
    hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    expected = 4 * wn.empirical_ntk(model.net, x) + wn.empirical_nngp(model.net, x)
    for implementation in IMPLEMENTATIONS:
        torch.testing.assert_close(wn.empirical_ntk(model, x, implementation=implementation),
                                   expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(wn.empirical_nngp(model, x), 4 * wn.empirical_nngp(model.net, x),
                               rtol=1e-12, atol=0)
    for module, forward, pre in hooks:
        assert module._forward_hooks == forward and module._forward_pre_hooks == pre
