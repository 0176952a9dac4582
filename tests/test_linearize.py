"""linearize / taylor_expand: Taylor expansions of a model in its parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from widenets.linearize import TaylorExpansion, linearize, taylor_expand

DTYPE = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3)
    ).to(DTYPE)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    ).to(DTYPE)
    # Non-trivial running statistics, then eval mode.
    with torch.no_grad():
        model(torch.randn(16, 2, 5, 5, dtype=DTYPE, generator=_generator(9)) * 2 + 1)
    return model.eval()


MODELS = {
    "mlp": (_mlp, (5, 4)),
    "cnn": (_cnn, (3, 2, 5, 5)),
}


def _inputs(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=_generator(seed))


def _random_delta(lin: TaylorExpansion, scale: float, seed: int = 2) -> list[torch.Tensor]:
    g = _generator(seed)
    return [scale * torch.randn(p.shape, dtype=p.dtype, generator=g) for p in lin.params]


def _move(lin: TaylorExpansion, delta: list[torch.Tensor], scale: float = 1.0) -> None:
    with torch.no_grad():
        for p, w0, d in zip(lin.params, lin.expansion_point().values(), delta):
            p.copy_(w0 + scale * d)


def _explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(outputs, parameters)``: one ``torch.autograd.grad`` per output entry."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x).reshape(-1)
    rows = []
    for entry in out:
        grads = torch.autograd.grad(entry, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                    for p, g in zip(params, grads)
                ]
            )
        )
    return torch.stack(rows)


def _at(model: nn.Module, delta: list[torch.Tensor], scale: float = 1.0) -> nn.Module:
    """A copy of ``model`` with its trainable parameters moved by ``scale * delta``."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip((p for p in moved.parameters() if p.requires_grad), delta):
            p.add_(scale * d)
    return moved


@pytest.mark.parametrize("name", MODELS)
def test_equals_model_at_w0(name):
    build, shape = MODELS[name]
    model = build()
    x = _inputs(shape)
    for degree in (1, 2):
        lin = taylor_expand(model, degree)
        torch.testing.assert_close(lin(x), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_first_order_matches_explicit_jacobian(name):
    build, shape = MODELS[name]
    model = build()
    x = _inputs(shape)
    lin = linearize(model)
    delta = _random_delta(lin, 0.1)
    _move(lin, delta)

    with torch.no_grad():
        f0 = model(x)
    jacobian = _explicit_jacobian(model, x)
    assert jacobian.shape[0] == f0.numel() and f0.shape[-1] > 1
    expected = f0 + (jacobian @ torch.cat([d.reshape(-1) for d in delta])).reshape(f0.shape)
    # The moved model differs from its linearization: the test sees the expansion.
    assert (model(x) - _at(model, delta)(x)).abs().max() > 1e-3
    assert (_at(model, delta)(x) - expected).abs().max() > 1e-6
    torch.testing.assert_close(lin(x), expected, rtol=1e-10, atol=1e-10 * f0.abs().max().item())


class _Quadratic(nn.Module):
    """``f(x) = (a * x) @ b``: exactly quadratic in its parameters ``(a, b)``."""

    def __init__(self) -> None:
        super().__init__()
        g = _generator(3)
        self.a = nn.Parameter(torch.randn(4, dtype=DTYPE, generator=g))
        self.b = nn.Parameter(torch.randn(4, 3, dtype=DTYPE, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x) @ self.b


def test_second_order_exact_on_quadratic_model():
    model = _Quadratic()
    x = _inputs((5, 4))
    quad = taylor_expand(model, degree=2)
    lin = linearize(model)
    for seed, scale in ((2, 0.5), (4, 3.0)):
        delta = _random_delta(quad, scale, seed)
        _move(quad, delta)
        _move(lin, delta)
        expected = _at(model, delta)(x)
        torch.testing.assert_close(quad(x), expected, rtol=1e-12, atol=1e-12)
        # The first-order expansion misses the product of the two moves.
        assert (lin(x) - expected).abs().max() > 1e-2


def test_error_scaling_first_and_second_order():
    model = _mlp()
    x = _inputs((5, 4))
    lin, quad = linearize(model), taylor_expand(model, degree=2)
    delta = _random_delta(lin, 0.05)
    errors = {}
    for scale in (1.0, 0.5):
        truth = _at(model, delta, scale)(x)
        for degree, expansion in ((1, lin), (2, quad)):
            _move(expansion, delta, scale)
            errors[degree, scale] = (expansion(x) - truth).abs().max().item()
    assert errors[2, 1.0] < errors[1, 1.0]
    ratio_1 = errors[1, 1.0] / errors[1, 0.5]
    ratio_2 = errors[2, 1.0] / errors[2, 0.5]
    assert 3.0 < ratio_1 < 5.0, ratio_1
    assert 6.0 < ratio_2 < 10.0, ratio_2


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_same(model: nn.Module, saved: dict) -> None:
    now = _snapshot(model)
    assert now["modes"] == saved["modes"]
    assert now["requires_grad"] == saved["requires_grad"]
    assert now["state"].keys() == saved["state"].keys()
    for k, v in saved["state"].items():
        assert torch.equal(now["state"][k], v), k
    for n, g in saved["grads"].items():
        assert (now["grads"][n] is None) == (g is None), n
        if g is not None:
            assert torch.equal(now["grads"][n], g), n


@pytest.mark.parametrize("degree", (1, 2))
def test_training_changes_only_the_expansion(degree):
    model = _cnn()
    if degree == 1:
        model[1].train()  # a mixed-mode model: its mode must survive as it is
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    saved = _snapshot(model)
    x, y = _inputs((6, 2, 5, 5)), _inputs((6, 4), seed=5)

    expansion = taylor_expand(model, degree)
    assert len(list(expansion.parameters())) == len([p for p in model.parameters()])
    start = [p.detach().clone() for p in expansion.parameters()]
    optimizer = torch.optim.SGD(expansion.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = ((expansion(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < losses[0]
    changed = [(p - s).abs().max() > 1e-8 for p, s in zip(expansion.parameters(), start)]
    # Training-mode BatchNorm cancels the first conv bias (zero gradient).
    assert changed == [True, degree == 2] + [True] * (len(start) - 2)
    _assert_same(model, saved)
    # Stored expansion point and buffers unchanged by training-mode BatchNorm forwards.
    for name, w0 in expansion.expansion_point().items():
        assert torch.equal(w0, saved["state"][name]), name
    torch.testing.assert_close(expansion.buffer_0, saved["state"]["1.running_mean"], rtol=0, atol=0)


def test_later_changes_to_the_model_do_not_move_the_expansion():
    model = _mlp()
    x = _inputs((5, 4))
    lin = linearize(model)
    before = model(x).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(lin(x), before, rtol=0, atol=1e-12)


def test_frozen_parameter_stays_fixed():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    x, y = _inputs((5, 4)), _inputs((5, 3), seed=5)
    lin = linearize(model)
    assert "0.weight" not in lin.param_names
    assert len(list(lin.parameters())) == len(list(model.parameters())) - 1
    torch.testing.assert_close(lin(x), model(x), rtol=0, atol=1e-12)

    optimizer = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        ((lin(x) - y) ** 2).mean().backward()
        optimizer.step()
    assert torch.equal(lin.frozen_0, frozen)
    assert torch.equal(model[0].weight, frozen)
    # The frozen weight is a constant of the expansion: no Jacobian direction along it.
    delta = _random_delta(lin, 0.1)
    _move(lin, delta)
    jacobian = _explicit_jacobian(model, x)
    with torch.no_grad():
        f0 = model(x)
    expected = f0 + (jacobian @ torch.cat([d.reshape(-1) for d in delta])).reshape(f0.shape)
    torch.testing.assert_close(lin(x), expected, rtol=1e-10, atol=1e-12)


def test_errors():
    with pytest.raises(TypeError, match="model"):
        linearize(lambda x: x)
    with pytest.raises(TypeError, match="model"):
        taylor_expand("not a module", 1)
    for degree in (0, 3, 1.5, True, "1"):
        with pytest.raises(ValueError, match="degree"):
            taylor_expand(_mlp(), degree)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        linearize(frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        linearize(nn.ReLU())


@pytest.mark.parametrize(
    "layer",
    [nn.LayerNorm(3), nn.InstanceNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3).eval()],
)
def test_second_order_refuses_unreliable_normalizations(layer):
    if isinstance(layer, nn.BatchNorm1d) and not layer.training:
        layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None
    model = nn.Sequential(nn.Linear(4, 3), layer).to(DTYPE)
    assert isinstance(linearize(model), TaylorExpansion)
    with pytest.raises(ValueError, match="degree=2 does not support"):
        taylor_expand(model, degree=2)


def test_second_order_with_eval_batch_norm_matches_finite_differences():
    """The nested jvp's second-order term against a central second difference."""
    model = _cnn()
    x = _inputs((3, 2, 5, 5))
    lin, quad = linearize(model), taylor_expand(model, degree=2)
    delta = _random_delta(lin, 1.0)
    h = 1e-4
    second = (_at(model, delta, h)(x) - 2 * model(x) + _at(model, delta, -h)(x)) / h**2
    _move(lin, delta)
    _move(quad, delta)
    torch.testing.assert_close(2 * (quad(x) - lin(x)), second, rtol=1e-5, atol=1e-5)
