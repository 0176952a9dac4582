"""Every exported layer and activation against the contract kit, :mod:`widenets.testing`.

Each entry of :data:`ACTIVATIONS` and :data:`LAYERS` is checked in three groups: the exact
kernels (well formed, consistent, fast paths, float32, bad inputs, and the maps of
activations), the Monte Carlo convergence of its finite twin, and its spec and pickle
round trips. :func:`test_every_exported_layer_is_in_the_table` fails when a layer class is
exported without an entry here: a new layer must be added to a table (or, if it is an
abstract base class, to :data:`NOT_CHECKED` with the reason).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import widenets as wn
import widenets.layers
from widenets import testing
from widenets.layers import Activation
from widenets.specs import NotCanonicalError

pytestmark = pytest.mark.usefixtures("one_thread")

#: An Elementwise activation holding a lambda: it has no canonical spec and cannot be
#: pickled, which the kit must accept for it (and only for such layers).
LAMBDA = lambda x: torch.sin(x) + 0.5 * x  # noqa: E731


def _elementwise_tanh() -> wn.Elementwise:
    return wn.Elementwise(torch.tanh)  # the default degree, as users call it


def _elementwise_lambda() -> wn.Elementwise:
    # A fixed degree: the default one (up to 256 per dimension) makes the quadrature of
    # this entry cost 1.5 s more; Elementwise-tanh checks the default.
    return wn.Elementwise(LAMBDA, degree=24)


#: name: (factory, per-example input shape[, options of ``testing.check_activation``]).
ACTIVATIONS: dict[str, tuple] = {
    "ReLU": (wn.ReLU, (3,)),
    "ReLU-images": (wn.ReLU, (1, 5, 5)),
    "LeakyReLU": (lambda: wn.LeakyReLU(0.1), (3,)),
    "ABReLU": (lambda: wn.ABReLU(-0.3, 1.2), (3,)),
    "Abs": (wn.Abs, (3,)),
    "Erf": (lambda: wn.Erf(1.2, 0.8, 0.1), (3,)),
    "Erf-sequences": (wn.Erf, (1, 6)),
    "Sign": (wn.Sign, (3,)),
    "Step": (wn.Step, (3,)),
    "RectifiedMonomial": (lambda: wn.RectifiedMonomial(2), (3,), {"monte_carlo": {
        # Squares of Gaussians make heavy-tailed twins: the error of the mean of the wide
        # twins reached 8.4 (NNGP) and 13.9 (NTK) / sqrt(twins x width) over seeds 0 to 7.
        "bound": {"nngp": 16.0, "ntk": 28.0}}}),
    "GELU": (wn.GELU, (3,)),
    "Sin": (lambda: wn.Sin(1.0, 1.0, 0.2), (3,)),
    "Cos": (lambda: wn.Cos(0.8, 1.2, -0.3), (3,)),
    "Rbf": (lambda: wn.Rbf(0.5), (3,)),
    "Identity": (wn.Identity, (3,)),
    "Elementwise-tanh": (_elementwise_tanh, (3,)),
    "Elementwise-lambda": (_elementwise_lambda, (3,)),
}


@dataclass
class Entry:
    """A layer and the network it is checked in: ``Sequential(*before, layer, *after)``
    (``None``: the kit's defaults)."""

    layer: Callable[[], wn.Layer]
    input_shape: tuple[int, ...]
    before: Callable[[], tuple[wn.Layer, ...]] | None = None
    after: Callable[[], tuple[wn.Layer, ...]] | None = None
    options: dict = field(default_factory=dict)


def _branches() -> wn.Parallel:
    return wn.Parallel(wn.Sequential(wn.ReLU(), wn.Linear(8, 1.3)),
                       wn.Sequential(wn.Erf(), wn.Linear(8, 1.1, 0.2)))


#: name: Entry. Checked by ``testing.check_layer``.
LAYERS: dict[str, Entry] = {
    "Linear": Entry(lambda: wn.Linear(5, W_std=1.3, b_std=0.2), (3,),
                    after=lambda: (wn.ReLU(), wn.Linear(1))),
    "Linear-standard": Entry(lambda: wn.Linear(5, 1.3, 0.2, parameterization="standard"), (3,),
                             after=lambda: (wn.Erf(), wn.Linear(1, 1.2, 0.1, "standard"))),
    "Linear-no-bias": Entry(lambda: wn.Linear(5, W_std=0.9), (3,)),
    "Conv1d": Entry(lambda: wn.Conv1d(4, 3, stride=2, padding="same", W_std=1.3, b_std=0.1),
                    (1, 6)),
    "Conv2d": Entry(lambda: wn.Conv2d(4, (3, 2), padding="circular", W_std=1.3, b_std=0.1),
                    (1, 5, 5), after=lambda: (wn.ReLU(), wn.Flatten(), wn.Linear(1))),
    "Conv2d-valid-strided": Entry(lambda: wn.Conv2d(4, 3, stride=2, W_std=1.2), (1, 5, 5),
                                  after=lambda: (wn.Erf(), wn.GlobalAvgPool(), wn.Linear(1))),
    "Conv3d": Entry(lambda: wn.Conv3d(3, 2, padding="same", W_std=1.3, b_std=0.1),
                    (1, 3, 3, 3)),
    "AvgPool1d": Entry(lambda: wn.AvgPool1d(2), (1, 6),
                       before=lambda: (wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1),
                                       wn.ReLU())),
    "AvgPool2d": Entry(lambda: wn.AvgPool2d(2, stride=1, padding="same"), (1, 5, 5),
                       before=lambda: (wn.Conv2d(8, 3, padding="same", W_std=1.5, b_std=0.1),
                                       wn.Erf())),
    "AvgPool2d-circular": Entry(lambda: wn.AvgPool2d((2, 3), stride=2, padding="circular"),
                                (1, 5, 5)),
    "AvgPool3d": Entry(lambda: wn.AvgPool3d(2, stride=1), (1, 3, 3, 3)),
    "Flatten": Entry(wn.Flatten, (1, 5, 5),
                     before=lambda: (wn.Conv2d(8, 3, stride=2, W_std=1.5, b_std=0.1), wn.ReLU()),
                     after=lambda: (wn.Linear(1, 1.2, 0.1),)),
    "GlobalAvgPool": Entry(wn.GlobalAvgPool, (1, 5, 5),
                           before=lambda: (wn.Conv2d(8, 3, padding="same", W_std=1.5,
                                                     b_std=0.1), wn.ReLU()),
                           after=lambda: (wn.Linear(1, 1.2, 0.1),)),
    "GlobalAvgPool-masked": Entry(
        wn.GlobalAvgPool, (2, 6),
        before=lambda: (wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU()),
        after=lambda: (wn.Linear(1, 1.2, 0.1),),
        options={"side_inputs": testing.example_masks}),
    "Aggregate": Entry(
        wn.Aggregate, (2, 5),
        before=lambda: (wn.Conv1d(8, 1, W_std=1.5, b_std=0.1), wn.ReLU()),
        after=lambda: (wn.Conv1d(8, 1, W_std=1.2), wn.Erf(), wn.GlobalAvgPool(), wn.Linear(1)),
        options={"side_inputs": testing.example_graphs}),
    "SelfAttention": Entry(lambda: wn.SelfAttention(n_heads=2, b_std=0.1), (2, 5)),
    "SelfAttention-masked-causal": Entry(
        lambda: wn.SelfAttention(attention="relu", causal=True, pos_emb="sum"), (2, 6),
        after=lambda: (wn.ReLU(), wn.GlobalAvgPool(), wn.Linear(1)),
        options={"side_inputs": testing.example_masks}),
    "Sequential-transformer-block": Entry(
        lambda: wn.Sequential(
            wn.Residual(wn.Sequential(wn.LayerNorm(), wn.SelfAttention(n_heads=2, b_std=0.1))),
            wn.Residual(wn.Sequential(wn.LayerNorm(), wn.Conv1d(64, 1, W_std=1.4, b_std=0.1),
                                      wn.ReLU(), wn.Conv1d(64, 1, W_std=1.2)))),
        (2, 5), before=lambda: (wn.Conv1d(64, 1, W_std=1.5, b_std=0.1),),
        after=lambda: (wn.LayerNorm(), wn.GlobalAvgPool(), wn.Linear(1))),
    "RNN": Entry(lambda: wn.RNN(wn.Erf(), 1.2, 1.0, 0.1), (2, 4),
                 after=lambda: (wn.GlobalAvgPool(), wn.Linear(1))),
    "RNN-untied-masked": Entry(
        lambda: wn.RNN(wn.ReLU(), 1.1, 0.9, 0.2, tied=False), (2, 5),
        before=lambda: (wn.Conv1d(8, 1, W_std=1.5, b_std=0.1), wn.ReLU()),
        after=lambda: (wn.GlobalAvgPool(), wn.Linear(1)),
        options={"side_inputs": testing.example_masks}),
    "Recurrent": Entry(
        lambda: wn.Recurrent(wn.Sequential(
            wn.Parallel(wn.Linear(16, 1.2), wn.Linear(16, 0.9, 0.1)), wn.FanInSum(),
            wn.ReLU(), wn.Linear(16), wn.Erf())), (2, 4),
        after=lambda: (wn.GlobalAvgPool(), wn.Linear(1))),
    "LastStep-masked": Entry(
        wn.LastStep, (2, 5), before=lambda: (wn.RNN(wn.Erf(), 1.2, 1.0, 0.1),),
        after=lambda: (wn.Linear(1, 1.2, 0.1),),
        options={"side_inputs": testing.example_masks}),
    "ChannelsLast": Entry(
        wn.ChannelsLast, (5, 3), before=lambda: (),
        after=lambda: (wn.Conv1d(8, 1, W_std=1.3, b_std=0.1), wn.Erf(), wn.GlobalAvgPool(),
                       wn.Linear(1))),
    "Dropout": Entry(lambda: wn.Dropout(0.3), (3,)),
    "Dropout-images": Entry(lambda: wn.Dropout(0.2), (1, 5, 5),
                            after=lambda: (wn.Conv2d(4, 3, padding="same"), wn.ReLU(),
                                           wn.GlobalAvgPool(), wn.Linear(1))),
    "LayerNorm": Entry(wn.LayerNorm, (3,), after=lambda: (wn.ReLU(), wn.Linear(1))),
    "LayerNorm-images": Entry(lambda: wn.LayerNorm(eps=1e-3), (1, 5, 5),
                              after=lambda: (wn.Erf(), wn.GlobalAvgPool(), wn.Linear(1))),
    "Sequential": Entry(lambda: wn.Sequential(wn.ReLU(), wn.Linear(6, 1.2, 0.1), wn.Erf()),
                        (3,)),
    "Parallel": Entry(_branches, (3,),
                      before=lambda: (wn.Linear(8, 1.5, 0.1), wn.FanOut(2)),
                      after=lambda: (wn.FanInSum(), wn.ReLU(), wn.Linear(1))),
    "FanOut": Entry(lambda: wn.FanOut(3), (3,),
                    after=lambda: (wn.Parallel(wn.Sequential(wn.ReLU(), wn.Linear(8)),
                                               wn.Sequential(wn.Erf(), wn.Linear(8, 1.2, 0.1)),
                                               wn.Linear(8, 0.8)),
                                   wn.FanInConcat(), wn.Linear(1))),
    "FanInSum": Entry(wn.FanInSum, (3,),
                      before=lambda: (wn.Linear(8, 1.5, 0.1), wn.FanOut(2), _branches()),
                      after=lambda: (wn.Erf(), wn.Linear(1))),
    "FanInConcat": Entry(wn.FanInConcat, (3,),
                         before=lambda: (wn.Linear(8, 1.5, 0.1), wn.FanOut(2),
                                         wn.Parallel(wn.ReLU(),
                                                     wn.Sequential(wn.Erf(), wn.Linear(5)))),
                         after=lambda: (wn.Linear(1),)),
    "FanInProd": Entry(wn.FanInProd, (3,),
                       before=lambda: (wn.Linear(8, 1.5, 0.1), wn.FanOut(2),
                                       wn.Parallel(wn.Sequential(wn.Erf(), wn.Linear(8)),
                                                   wn.Linear(8, 1.0, 0.5))),
                       after=lambda: (wn.Linear(1),)),
    "FanInProd-images": Entry(wn.FanInProd, (1, 5, 5),
                              before=lambda: (wn.Conv2d(8, 3, padding="same", W_std=1.5),
                                              wn.FanOut(2),
                                              wn.Parallel(wn.Conv2d(8, 1, b_std=0.3),
                                                          wn.Sequential(
                                                              wn.ReLU(),
                                                              wn.Conv2d(8, 3, padding="same")))),
                              after=lambda: (wn.GlobalAvgPool(), wn.Linear(1))),
    "Residual": Entry(lambda: wn.Residual(wn.Sequential(wn.ReLU(), wn.Linear(8, 1.0, 0.1))),
                      (3,), after=lambda: (wn.ReLU(), wn.Linear(1))),
    "Residual-images": Entry(
        lambda: wn.Residual(wn.Sequential(wn.ReLU(),
                                          wn.Conv2d(8, 3, padding="same", W_std=1.0, b_std=0.1))),
        (1, 5, 5), after=lambda: (wn.ReLU(), wn.GlobalAvgPool(), wn.Linear(1))),
}

#: Exported Layer classes not checked here, with the reason.
NOT_CHECKED = {
    "Layer": "the abstract base class: its kernel_rule and build_module raise "
             "NotImplementedError",
    "Activation": "the abstract base class of activations: its maps raise "
                  "NotImplementedError",
}

GROUPS = {
    "exact": ("kernels", "consistency", "fast_paths", "float32", "bad_inputs", "maps"),
    "monte_carlo": ("monte_carlo",),
    "spec": ("spec", "pickle"),
}


def _checks(group: str) -> tuple[str, ...]:
    return GROUPS[group]


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation(name, group):
    make, input_shape, *options = ACTIVATIONS[name]
    testing.check_activation(make(), input_shape=input_shape, checks=_checks(group),
                             **(options[0] if options else {}))


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer(name, group):
    entry = LAYERS[name]
    testing.check_layer(
        entry.layer(), entry.input_shape,
        before=None if entry.before is None else entry.before(),
        after=None if entry.after is None else entry.after(),
        checks=_checks(group), **entry.options,
    )


def _exported_layer_classes() -> dict[str, type]:
    found = {}
    for module in (wn, widenets.layers):
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and issubclass(value, wn.Layer):
                found[name] = value
    return found


def test_every_exported_layer_is_in_the_table():
    checked = {type(entry[0]()) for entry in ACTIVATIONS.values()}
    checked |= {type(entry.layer()) for entry in LAYERS.values()}
    exported = _exported_layer_classes()
    missing = sorted(name for name, cls in exported.items()
                     if cls not in checked and name not in NOT_CHECKED)
    assert not missing, (
        f"exported layers without an entry in tests/test_contract.py: {missing}; add them to "
        "ACTIVATIONS or LAYERS (or, for an abstract base class, to NOT_CHECKED)"
    )
    stale = sorted(set(NOT_CHECKED) - set(exported))
    assert not stale, f"NOT_CHECKED names classes that are not exported: {stale}"


class Sine(Activation):
    """The module docstring's example of an activation of one's own: ``phi(x) = sin(x)``."""

    def apply(self, x):
        return torch.sin(x)

    def nngp_map(self, q1, q2, c, rho):  # E[sin(u) sin(v)]
        return torch.exp(-(q1 + q2) / 2) * torch.sinh(c)

    def derivative_map(self, q1, q2, c, rho):  # E[cos(u) cos(v)]
        return torch.exp(-(q1 + q2) / 2) * torch.cosh(c)


def test_the_documented_example_passes_every_check():
    report = testing.check_activation(Sine())
    assert set(report) == set(testing.CHECKS)
    block = wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv2d(8, 3, padding="same")))
    report = testing.check_layer(block, (1, 5, 5), checks=("kernels", "spec"))
    assert set(report) == {"kernels", "spec"}


def test_the_kit_finds_a_wrong_kernel():
    """An activation whose maps disagree with its forward fails the maps check, even by a
    little; a twin far from its kernel fails the Monte Carlo check."""

    class SlightlyWrongErf(wn.Erf):
        def apply(self, x):
            return torch.erf(1.1 * x)  # the maps say erf(x)

    with pytest.raises(AssertionError, match="nngp_map"):
        testing.check_activation_maps(SlightlyWrongErf())

    class WrongErf(wn.Erf):
        def apply(self, x):
            return torch.erf(2.0 * x)  # the kernels differ by about 0.5 of sqrt(K_ii K_jj)

    net = wn.Sequential(wn.Linear(8, 1.5, 0.1), WrongErf(), wn.Linear(1))
    x1, x2 = testing.example_inputs((3,))
    for kernel in ("nngp", "ntk"):
        with pytest.raises(AssertionError, match=f"Monte Carlo {kernel.upper()}"):
            testing.check_monte_carlo(net, x1, x2, get=kernel)


class RefusesItsSpec(wn.ReLU):
    """Holds no function, yet says it has no canonical spec."""

    def spec(self, strict: bool = True) -> dict:
        if strict:
            raise NotCanonicalError("pretending to hold a lambda")
        return super().spec(strict)


class LambdaWithASpec(wn.Elementwise):
    """Holds a lambda, yet returns a spec (which names the lambda by its identity)."""

    def spec(self, strict: bool = True) -> dict:
        return super().spec(strict=False)


def test_the_kit_finds_a_wrong_spec():
    """``NotCanonicalError`` is accepted from a layer holding a lambda, and only from one."""
    with pytest.raises(AssertionError, match="every function it holds is importable"):
        testing.check_spec(RefusesItsSpec())
    with pytest.raises(AssertionError, match="cannot be imported by name"):
        testing.check_spec(LambdaWithASpec(LAMBDA))
    assert testing.check_spec(wn.Elementwise(LAMBDA)) is None
    assert testing.holds_local_functions(wn.Sequential(wn.ReLU(), wn.Elementwise(LAMBDA)))
    assert not testing.holds_local_functions(wn.Elementwise(torch.tanh))
