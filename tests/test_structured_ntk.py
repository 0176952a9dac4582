"""The structured empirical NTK (per-layer factored contractions) against the explicit
autograd Jacobian of ``test_empirical``, on every kind of layer it factors, with each
layer forced into the factored form and into the Jacobian form, and the cost model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import widenets as wn
from tests.test_empirical import (
    DTYPE,
    assert_unchanged,
    explicit_jacobian,
    inputs,
    relative_error,
    snapshot,
)
from widenets import empirical, structured_ntk


def seeded(seed: int, *modules: nn.Module) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*modules).to(DTYPE)


class Shared(nn.Module):
    """One Linear called twice (shared weights): left to the Jacobian."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def frozen_weight() -> nn.Module:
    model = seeded(3, nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    return model


def finite_twin(net: wn.Layer, shape: tuple[int, ...], seed: int) -> nn.Module:
    return net.build(shape, torch.Generator().manual_seed(seed), dtype=DTYPE)


#: name: (model factory, per-example input shape)
MODELS = {
    "linear-on-sequences": (lambda: seeded(1, nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2),
                                           nn.Flatten(), nn.Linear(8, 3)), (4, 3)),
    "conv1d-reflect-dilation": (lambda: seeded(
        2, nn.Conv1d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"), nn.Tanh(),
        nn.Conv1d(3, 2, 2, stride=2, padding="valid"), nn.Flatten(), nn.Linear(6, 3)),
        (2, 7)),
    "conv2d-same-circular": (lambda: seeded(
        4, nn.Conv2d(2, 3, (3, 2), padding="same", padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=(2, 1), padding=1, bias=False), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), (2, 5, 4)),
    "conv3d-grouped": (lambda: seeded(
        5, nn.Conv3d(2, 4, 2), nn.Tanh(), nn.Conv3d(4, 2, 2, groups=2), nn.Flatten(),
        nn.Linear(2, 2)), (2, 3, 3, 3)),
    "frozen-weight": (frozen_weight, (4,)),
    "shared-weights": (lambda: Shared().to(DTYPE), (4,)),
    "widenets-cnn-twin": (lambda: finite_twin(wn.Sequential(
        wn.Conv2d(3, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU(),
        wn.Conv2d(2, 2, stride=2, padding="circular", W_std=1.2, b_std=0.2), wn.Erf(),
        wn.Flatten(), wn.Linear(3, W_std=0.8, b_std=0.3)), (2, 4, 4), seed=6), (2, 4, 4)),
    "widenets-standard-twin": (lambda: finite_twin(wn.Sequential(
        wn.Linear(5, W_std=1.3, b_std=0.2, parameterization="standard"), wn.ReLU(),
        wn.Linear(2, W_std=0.9, b_std=0.4, parameterization="standard")), (3,), seed=7),
        (3,)),
}


@pytest.mark.parametrize("form", ["all factored", "none factored", "by cost"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_structured_matches_explicit_jacobian(name, form, monkeypatch):
    if form != "by cost":
        monkeypatch.setattr(structured_ntk, "is_factored",
                            lambda layer, pairs: form == "all factored")
    make, shape = MODELS[name]
    model = make()
    x1, x2 = inputs(shape, 5, seed=10), inputs(shape, 3, seed=11)
    before = snapshot(model)
    jac1, jac2 = explicit_jacobian(model, x1), explicit_jacobian(model, x2)
    for second, jac_second in ((None, jac1), (x2, jac2)):
        expected = torch.einsum("aop,bqp->aboq", jac1, jac_second)
        full = wn.empirical_ntk(model, x1, second, outputs="full",
                                implementation="structured", batch_size=2)
        mean = wn.empirical_ntk(model, x1, second, outputs="mean",
                                implementation="structured", batch_size=2)
        assert relative_error(full, expected) < 1e-10
        assert relative_error(mean, torch.diagonal(expected, dim1=2, dim2=3).mean(2)) < 1e-10
    assert_unchanged(model, before)


def test_layers_found_and_left_to_the_jacobian():
    """Dense and convolutional layers are factored; a grouped convolution, a layer called
    twice and a layer whose parameters are all frozen are not."""
    def found(model, shape):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        layers, n_out = empirical._probe(model, inputs(shape, 1, seed=0), params, {})
        return {layer.name: (layer.weight, layer.bias, layer.output_shape) for layer in layers}

    make, shape = MODELS["conv3d-grouped"]
    assert found(make(), shape) == {
        "0": ("0.weight", "0.bias", (4, 2, 2, 2)), "4": ("4.weight", "4.bias", (2,)),
    }
    make, shape = MODELS["shared-weights"]
    assert found(make(), shape) == {"out": ("out.weight", "out.bias", (2,))}
    assert found(frozen_weight(), (4,))["0"] == (None, "0.bias", (5,))
    make, shape = MODELS["widenets-cnn-twin"]
    assert set(found(make(), shape)) == {"0", "2", "5"}


def test_cost_model_prefers_factoring_dense_layers():
    """An MLP's dense layers cost ``F + k C`` per pair factored against ``k C F``: the
    structured form wins; a CNN on 8x8 images keeps its convolutions as Jacobians."""
    mlp = seeded(0, nn.Linear(30, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                 nn.Linear(200, 10))
    params = dict(mlp.named_parameters())
    layers, n_out = empirical._probe(mlp, inputs((30,), 1, seed=0), params, {})
    assert n_out == 10 and all(structured_ntk.is_factored(layer, 10) for layer in layers)
    costs = empirical.estimated_costs(layers, params, 100, None, n_out, "full")
    assert min(costs, key=costs.get) == "structured"
    assert costs["structured"] < costs["jacobian"] / 10

    cnn = seeded(0, nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    params = dict(cnn.named_parameters())
    layers, n_out = empirical._probe(cnn, inputs((3, 8, 8), 1, seed=0), params, {})
    convolutions = [layer for layer in layers if not layer.is_dense]
    assert len(convolutions) == 2
    assert not any(structured_ntk.is_factored(layer, 10) for layer in convolutions)
    # A convolution whose output is a single position is factored like a dense layer.
    one_position = structured_ntk.AffineLayer("c", nn.Conv2d(64, 64, 3), "c.weight", None,
                                              (64, 1, 1))
    assert structured_ntk.is_factored(one_position, 10)


def test_auto_picks_structured_for_an_mlp(monkeypatch):
    chosen = []
    original = empirical._structured_contraction

    def spy(*args):
        chosen.append("structured")
        return original(*args)

    monkeypatch.setattr(empirical, "_structured_contraction", spy)
    model = seeded(0, nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                   nn.Linear(64, 4))
    x = inputs((6,), 7, seed=1)
    auto = wn.empirical_ntk(model, x, outputs="full")
    assert chosen == ["structured"]
    jacobian = wn.empirical_ntk(model, x, outputs="full", implementation="jacobian")
    assert relative_error(auto, jacobian) < 1e-12
