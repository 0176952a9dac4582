"""Gradients through kernels: with respect to the inputs ``x1``, ``x2`` and hyperparameters
given as tensors (``W_std``, ``b_std`` of ``Linear`` and the convolutions).

``torch.autograd.gradcheck`` compares autograd with finite differences in float64 on
small inputs in general position (no two inputs parallel, where some maps have a kink);
identical and zero inputs, and depth 20, give finite gradients, and the gradient of the
diagonal ``K(x, x)`` (a smooth function of ``x``) is checked on its own.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import widenets as wn

ACTIVATIONS = {
    "relu": wn.ReLU, "leaky_relu": lambda: wn.LeakyReLU(0.2),
    "abrelu": lambda: wn.ABReLU(-0.4, 1.1),
    "abs": wn.Abs, "erf": lambda: wn.Erf(1.2, 0.8, 0.1), "gelu": wn.GELU, "sign": wn.Sign,
    "step": wn.Step, "monomial2": lambda: wn.RectifiedMonomial(2), "sin": wn.Sin,
    "cos": wn.Cos, "rbf": lambda: wn.Rbf(0.7), "identity": wn.Identity,
    "tanh (quadrature)": lambda: wn.Elementwise(torch.tanh),
}


def normal(*shape: int, seed: int, requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def dense(activation, W_std=1.4, b_std=0.2, depth=2):
    layers = []
    for _ in range(depth):
        layers += [wn.Linear(16, W_std=W_std, b_std=b_std), activation()]
    return wn.Sequential(*layers, wn.Linear(1, W_std=W_std, b_std=b_std))


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gradcheck_inputs_and_hyperparameters(name, get):
    x1, x2 = normal(4, 3, seed=1), normal(3, 3, seed=2)
    w, b = scalar(1.4), scalar(0.2)

    def kernel(x1, x2, w, b):
        return dense(ACTIVATIONS[name], w, b).kernel(x1, x2, get=get)

    assert gradcheck(kernel, (x1, x2, w, b))


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("arch", ["pooled cnn", "residual", "layernorm", "standard"])
def test_gradcheck_architectures(arch, get):
    w = scalar(1.3)
    if arch == "pooled cnn":
        x1, x2 = normal(2, 2, 5, 5, seed=3), normal(2, 2, 5, 5, seed=4)

        def build(w):
            return wn.Sequential(
                wn.Conv2d(4, 3, padding="same", W_std=w, b_std=0.1), wn.ReLU(),
                wn.AvgPool2d(2, padding="same"),
                wn.Conv2d(4, 2, stride=2, padding="circular", W_std=w), wn.Erf(),
                wn.GlobalAvgPool(), wn.Linear(1, W_std=w))
    else:
        x1, x2 = normal(3, 4, seed=5), normal(2, 4, seed=6)

        def build(w):
            if arch == "residual":
                block = wn.Sequential(wn.ReLU(), wn.Linear(8, W_std=w, b_std=0.1))
                return wn.Sequential(wn.Linear(8, W_std=w), wn.Residual(block), wn.GELU(),
                                     wn.Linear(1, W_std=w))
            if arch == "layernorm":
                return wn.Sequential(wn.Linear(8, W_std=w, b_std=0.3), wn.LayerNorm(),
                                     wn.Erf(), wn.Linear(1, W_std=w))
            return wn.Sequential(wn.Linear(8, W_std=w, b_std=0.1, parameterization="standard"),
                                 wn.ReLU(), wn.Linear(1, W_std=w, parameterization="standard"))

    assert gradcheck(lambda x1, x2, w: build(w).kernel(x1, x2, get=get), (x1, x2, w))


@pytest.mark.parametrize("name", ["relu", "erf", "gelu", "abs", "sin"])
def test_gradient_of_the_diagonal_at_identical_inputs(name):
    """``K(x, x)`` is smooth in ``x`` although ``arccos'`` is infinite at correlation 1:
    the diagonal of ``x2=None`` (and of duplicated rows) has the right, finite gradient."""
    x = normal(3, 4, seed=7)
    net = dense(ACTIVATIONS[name], depth=3)

    def diagonal(x):
        doubled = torch.cat([x, x])  # every input twice: duplicates in one call
        k = net.kernel(doubled, None, get=("nngp", "ntk"))
        return torch.cat([k.nngp.diagonal(), k.ntk.diagonal(), k.ntk[:3, 3:].diagonal()])

    assert gradcheck(diagonal, (x,))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gradients_are_finite_at_duplicates_zero_rows_and_depth_20(name):
    x = normal(5, 3, seed=8, requires_grad=False)
    x[3] = x[1]
    x[4] = 0.0
    x.requires_grad_(True)
    w = scalar(0.7 if name == "monomial2" else 1.2)  # a squaring map must not blow up
    net = wn.Sequential(*[m for _ in range(20) for m in (wn.Linear(8, W_std=w, b_std=0.1),
                                                         ACTIVATIONS[name]())],
                        wn.Linear(1, W_std=w))
    k = net.kernel(x, None, get=("nngp", "ntk"))
    (k.nngp.sum() + k.ntk.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gradients_are_finite_at_zero_positions_without_bias(name):
    """Positions of variance exactly 0 (zero pixels, no bias) beside nonzero ones."""
    x = normal(3, 2, 5, seed=9, requires_grad=False)
    x[:, :, 3:] = 0.0
    x[2] = 0.0
    x.requires_grad_(True)
    w = scalar(1.1)
    net = wn.Sequential(wn.Conv1d(8, 1, W_std=w), ACTIVATIONS[name](), wn.Conv1d(8, 1, W_std=w),
                        ACTIVATIONS[name](), wn.GlobalAvgPool(), wn.Linear(1, W_std=w))
    k = net.kernel(x, None, get=("nngp", "ntk"))
    (k.nngp.sum() + k.ntk.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_hyperparameter_gradients_match_central_differences(get):
    """d K / d W_std and d K / d b_std against central differences of the kernel of plain
    numbers, to 1e-6 relative."""
    x = normal(6, 3, seed=9, requires_grad=False)
    weights = torch.linspace(-1, 1, 36, dtype=torch.float64).reshape(6, 6)

    def loss(w, b):
        net = wn.Sequential(wn.Linear(8, W_std=w, b_std=b), wn.Erf(),
                            wn.Linear(8, W_std=w, b_std=b), wn.ReLU(), wn.Linear(1, W_std=w))
        return (net.kernel(x, None, get=get) * weights).sum()

    w, b = scalar(1.3), scalar(0.4)
    loss(w, b).backward()
    h = 1e-5
    for tensor, finite in [(w.grad, (loss(1.3 + h, 0.4) - loss(1.3 - h, 0.4)) / (2 * h)),
                           (b.grad, (loss(1.3, 0.4 + h) - loss(1.3, 0.4 - h)) / (2 * h))]:
        assert abs(float(tensor) - float(finite)) <= 1e-6 * abs(float(finite))


def test_torch_func_grad_and_jacrev():
    x1, x2 = normal(4, 3, seed=10, requires_grad=False), normal(2, 3, seed=11, requires_grad=False)
    net = dense(wn.Erf)
    grad = torch.func.grad(lambda x: net.kernel(x, x2, get="ntk").sum())(x1)
    x = x1.clone().requires_grad_(True)
    net.kernel(x, x2, get="ntk").sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=0)
    jacobian = torch.func.jacrev(lambda x: net.kernel(x, x2, get="nngp"))(x1)
    assert jacobian.shape == (4, 2, 4, 3)
    # row 0 of the kernel does not depend on x1[1]
    assert torch.equal(jacobian[0, :, 1], torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_recorded_tiles_give_the_gradient_of_one_block(monkeypatch, symmetric):
    """Recorded tiles are concatenated (with transposes below the diagonal): the kernel
    and its gradients equal those computed in one block."""
    from widenets import engine

    def gradients(tile_entries):
        monkeypatch.setattr(engine, "TILE_ENTRIES", tile_entries)
        x1, w = normal(13, 3, seed=21), scalar(1.2)
        x2 = None if symmetric else normal(9, 3, seed=22)
        k = dense(wn.ReLU, W_std=w).kernel(x1, x2, get=("nngp", "ntk"))
        weights = normal(13, 13 if symmetric else 9, seed=23, requires_grad=False)
        ((k.nngp + k.ntk) * weights).sum().backward()
        return k.ntk.detach(), x1.grad, w.grad

    tiled, whole = gradients(16), gradients(1 << 30)  # 4 x 4 tiles, awkward last ones
    for a, b in zip(tiled, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_kernel_matrix_refuses_gradients_with_a_store(tmp_path):
    with pytest.raises(ValueError, match="keeps numbers, not gradients"):
        wn.kernel_matrix(dense(wn.ReLU), normal(4, 3, seed=15), store=tmp_path / "k.zarr")
    assert not (tmp_path / "k.zarr").exists()


def test_kernel_matrix_without_a_store_is_differentiable():
    x = normal(7, 3, seed=12)
    net = dense(wn.ReLU)
    k = wn.kernel_matrix(net, x, get="ntk", tile=3, progress=False)
    k.sum().backward()
    expected = torch.autograd.grad(net.kernel(x, None, get="ntk").sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-14)


def test_hyperparameters_are_listed_and_values_agree_with_numbers():
    w, b = scalar(1.5), torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    net = wn.Sequential(wn.Linear(8, W_std=w, b_std=b),
                        wn.Residual(wn.Sequential(wn.ReLU(), wn.Linear(8, W_std=w))),
                        wn.ReLU(), wn.Linear(1))
    found = net.hyperparameters()
    assert list(found) == ["0.W_std", "0.b_std", "1.0.1.1.1.W_std"]  # through Residual's parts
    assert found["0.W_std"] is w and found["0.b_std"] is b
    plain = wn.Sequential(wn.Linear(8, W_std=1.5, b_std=0.3),
                          wn.Residual(wn.Sequential(wn.ReLU(), wn.Linear(8, W_std=1.5))),
                          wn.ReLU(), wn.Linear(1))
    x = normal(5, 3, seed=13, requires_grad=False)
    # (with gradients the straightforward paths run: equal up to rounding)
    torch.testing.assert_close(net.kernel(x, get="ntk").detach(), plain.kernel(x, get="ntk"),
                               rtol=1e-12, atol=1e-14)
    assert net == plain  # the spec holds the values
    assert net.build(input_shape=(3,), generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64)(x).shape == (5, 1)


def test_no_gradient_is_recorded_when_none_is_asked_for():
    w = scalar(1.5)
    net = dense(wn.Erf, W_std=w)
    x = normal(4, 3, seed=14, requires_grad=False)
    with torch.no_grad():
        assert not net.kernel(x, get="ntk").requires_grad
    assert not dense(wn.Erf).kernel(x, get="ntk").requires_grad


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(torch.ones(2, 2, dtype=torch.float64), TypeError, "0-d floating tensor"),
     (torch.tensor(2), TypeError, "0-d floating tensor"),
     (torch.tensor(-1.0), ValueError, "W_std must be a finite number >= 0"),
     (torch.tensor(float("nan")), ValueError, "W_std must be a finite number >= 0")],
)
def test_bad_hyperparameter_tensors_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        wn.Linear(4, W_std=value)


ACTIVATION_HYPERPARAMETERS = {
    "ABReLU(a, b)": (wn.ABReLU, (-0.3, 1.2)),
    "LeakyReLU(negative_slope)": (wn.LeakyReLU, (0.2,)),
    "Erf(a, b, c)": (wn.Erf, (1.1, 0.8, 0.2)),
    "Sin(a, b, c)": (wn.Sin, (1.1, 0.8, 0.3)),
    "Cos(a, b, c)": (wn.Cos, (0.9, 1.2, -0.3)),
    "Rbf(gamma)": (wn.Rbf, (0.7,)),
}


def test_gradcheck_layernorm_eps():
    x1, x2 = normal(4, 3, seed=18, requires_grad=False), normal(3, 3, seed=19,
                                                               requires_grad=False)

    def kernel(eps):
        return wn.Sequential(wn.Linear(8, W_std=1.3, b_std=0.2), wn.LayerNorm(eps=eps),
                             wn.Erf(), wn.Linear(1)).kernel(x1, x2, get="ntk")

    assert gradcheck(kernel, (scalar(0.3),))
    assert list(wn.LayerNorm(eps=scalar(0.1)).hyperparameters()) == ["eps"]


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("name", sorted(ACTIVATION_HYPERPARAMETERS))
def test_gradcheck_activation_hyperparameters(name, get):
    make, values = ACTIVATION_HYPERPARAMETERS[name]
    x1, x2 = normal(4, 3, seed=16, requires_grad=False), normal(3, 3, seed=17,
                                                               requires_grad=False)

    def kernel(*params):
        return wn.Sequential(wn.Linear(8, W_std=1.3, b_std=0.2), make(*params),
                             wn.Linear(1)).kernel(x1, x2, get=get)

    assert gradcheck(kernel, tuple(scalar(v) for v in values))
    # with the inputs requiring grad as well
    x1.requires_grad_(True)
    assert gradcheck(lambda x1, *p: wn.Sequential(
        wn.Linear(8, W_std=1.3, b_std=0.2), make(*p), wn.Linear(1)).kernel(x1, x2, get=get),
        (x1, *(scalar(v) for v in values)))
    x1.requires_grad_(False)
    # tensors that need no gradient take the fast paths and give the numbers' kernel
    plain = kernel(*values)
    as_tensors = kernel(*(torch.tensor(v, dtype=torch.float64) for v in values))
    assert not as_tensors.requires_grad
    torch.testing.assert_close(as_tensors, plain, rtol=1e-13, atol=1e-15)
