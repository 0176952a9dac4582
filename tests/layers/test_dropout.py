"""Dropout: the kernel rule against Neural Tangents, a closed form and its finite twin.

Convention (``widenets.layers.dropout.Dropout``): ``p`` drops a unit, ``keep = 1 - p``;
the kernel divides by ``keep`` only the moments that pair an input with itself at one
position in one call (``x2=None``), as Neural Tangents' ``stax.Dropout`` in mode
``'train'`` (whose ``rate`` is ``keep``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import widenets as wn
from widenets import testing
from widenets.kernel import Kernel
from widenets.layers.dropout import Dropout

DTYPE = torch.float64
DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def attention_reference() -> np.lib.npyio.NpzFile:
    """Kernels from Neural Tangents 0.6.5 (see ``/work/shared/reference/README.md``)."""
    return np.load(DATA / "nt_reference_attention.npz")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _max_relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).abs() / expected.abs().max()).max())


# ------------------------------------------------------------------ Neural Tangents
@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
def test_matches_neural_tangents_fc_dropout(attention_reference, second):
    """NT ``Dense(1.5, 0.1), Relu, Dropout(rate=0.8, mode='train'), Dense(1.0, 0.1)``;
    NT's rate 0.8 keeps 80 %, which is ``p = 0.2`` here."""
    ref = attention_reference
    x1 = torch.tensor(ref["fc_dropout/x1"])
    x2 = None if second == "x2=None" else torch.tensor(ref["fc_dropout/x2"])
    suffix = "11" if x2 is None else "12"
    net = wn.Sequential(wn.Linear(64, 1.5, 0.1), wn.ReLU(), Dropout(0.2),
                        wn.Linear(1, 1.0, 0.1))
    k = net.kernel(x1, x2, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        expected = torch.tensor(ref[f"fc_dropout/{name}{suffix}"])
        got = k[name]
        assert got is not None and got.shape == expected.shape
        assert _max_relative(got, expected) < 1e-8, name
    if x2 is None:  # the reference does see the dropout (on its diagonal)
        without = wn.Sequential(wn.Linear(64, 1.5, 0.1), wn.ReLU(), wn.Linear(1, 1.0, 0.1))
        plain = without.kernel(x1, get="nngp")
        assert float((k.nngp - plain).diagonal().min()) > 0.1


# ------------------------------------------------------------------ closed form
W1, B1 = 1.5, 0.1
W2, B2 = 1.3, 0.2
P_DROP = 0.3


def _conv_relu_self_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position variance ``K(x, x)[p, p]`` and NTK ``T(x, x)[p, p]`` after
    ``Conv2d(W1, B1, 3 x 3, "same") -> ReLU``, written out from the inputs: the input
    variance is the channel mean of ``x^2``; the convolution sums its 3 x 3 neighbours
    (zero padding) times ``W1^2 / 9`` plus ``B1^2`` (and its NTK equals that, the first
    layer); the ReLU halves both at equal positions (correlation 1)."""
    n, channels, height, width = x.shape
    inputs = (x**2).mean(dim=1)  # (N, H, W)
    padded = torch.nn.functional.pad(inputs, (1, 1, 1, 1))
    neighbours = sum(padded[:, a:a + height, b:b + width] for a in range(3) for b in range(3))
    conv = W1**2 / 9 * neighbours + B1**2
    return (conv / 2).flatten(1), (conv / 2).flatten(1)


def _conv_net(dropout: bool, readout: str) -> wn.Sequential:
    head = [wn.GlobalAvgPool()] if readout == "pool" else [wn.Flatten()]
    middle = [Dropout(P_DROP)] if dropout else []
    return wn.Sequential(wn.Conv2d(8, 3, W_std=W1, b_std=B1, padding="same"), wn.ReLU(),
                         *middle, *head, wn.Linear(1, W2, B2))


@pytest.mark.parametrize("readout,spatial", [("pool", "auto"), ("flatten", "diagonal"),
                                             ("flatten", "full")])
@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
def test_closed_form_on_images(readout, spatial, second):
    """The kernel with Dropout is the kernel without it plus, only for ``x2=None`` and
    only on the batch diagonal, ``(1/keep - 1) W2^2`` times the ReLU moments at equal
    positions summed: ``mean_p K[p, p]`` after ``Flatten`` (each position pairs only with
    itself), ``mean_p K[p, p] / P`` after ``GlobalAvgPool`` (``1/P^2`` sum over the
    ``P`` equal pairs). The NTK gets ``K + T`` there (the read-out's own NNGP term plus
    the propagated NTK). x1 repeats an image: its off-diagonal twin entry gets nothing."""
    x1 = _randn(4, 2, 4, 5, seed=1)
    x1[3] = x1[0]
    x2 = None if second == "x2=None" else _randn(3, 2, 4, 5, seed=2)
    with_dropout = _conv_net(True, readout).kernel(x1, x2, get=("nngp", "ntk"), spatial=spatial)
    plain = _conv_net(False, readout).kernel(x1, x2, get=("nngp", "ntk"), spatial=spatial)
    assert with_dropout.nngp is not None and with_dropout.ntk is not None
    assert plain.nngp is not None and plain.ntk is not None
    if x2 is not None:
        assert torch.allclose(with_dropout.nngp, plain.nngp, rtol=1e-13, atol=0)
        assert torch.allclose(with_dropout.ntk, plain.ntk, rtol=1e-13, atol=0)
        return
    k_self, t_self = _conv_relu_self_moments(x1)
    positions = k_self.shape[1]
    average = k_self.mean(dim=1) / (positions if readout == "pool" else 1)
    average_t = t_self.mean(dim=1) / (positions if readout == "pool" else 1)
    extra = 1 / (1 - P_DROP) - 1
    expected_nngp = plain.nngp + torch.diag(extra * W2**2 * average)
    expected_ntk = plain.ntk + torch.diag(extra * W2**2 * (average + average_t))
    assert _max_relative(with_dropout.nngp, expected_nngp) < 1e-12
    assert _max_relative(with_dropout.ntk, expected_ntk) < 1e-12
    # the correction is not negligible (4 % after pooling); the repeated image's [0, 3] has none
    assert float((with_dropout.nngp - plain.nngp).diagonal().min()) > 0.02 * float(
        plain.nngp.diagonal().max())
    assert float(with_dropout.nngp[0, 3]) == pytest.approx(float(plain.nngp[0, 3]), rel=1e-13)
    assert float(with_dropout.nngp[0, 0]) > float(with_dropout.nngp[0, 3])


def test_dense_closed_form_and_identity():
    """Dense: ``Linear -> ReLU -> Dropout -> Linear``. The ReLU variance of ``x_i`` is
    ``(W1^2 |x_i|^2 / d + B1^2) / 2``; the diagonal grows by ``(1/keep - 1) W2^2`` times
    it (NNGP) and times twice it (NTK: ``K + T``, ``T = K`` after the first layer).
    ``Dropout(0)`` changes nothing, bitwise."""
    x1 = _randn(5, 3, seed=3)
    d = x1.shape[1]

    def net(*middle):
        return wn.Sequential(wn.Linear(16, W1, B1), wn.ReLU(), *middle, wn.Linear(2, W2, B2))

    plain = net().kernel(x1, get=("nngp", "ntk"))
    k = net(Dropout(P_DROP)).kernel(x1, get=("nngp", "ntk"))
    relu_var = (W1**2 * (x1**2).sum(dim=1) / d + B1**2) / 2
    extra = 1 / (1 - P_DROP) - 1
    assert plain.nngp is not None and plain.ntk is not None
    assert _max_relative(k.nngp, plain.nngp + torch.diag(extra * W2**2 * relu_var)) < 1e-13
    assert _max_relative(k.ntk, plain.ntk + torch.diag(2 * extra * W2**2 * relu_var)) < 1e-13
    identity = net(Dropout(0)).kernel(x1, get=("nngp", "ntk"))
    assert torch.equal(identity.nngp, plain.nngp) and torch.equal(identity.ntk, plain.ntk)


def test_rule_is_out_of_place_and_keeps_the_state():
    """The rule builds new tensors (the input state is unchanged) and keeps width,
    sources and layout; ``var2`` stays ``None`` for ``x2=None``."""
    x = _randn(3, 2, 3, 3, seed=4)
    for x2 in (None, _randn(2, 2, 3, 3, seed=5)):
        for paired in (True, False):
            k = Kernel.from_inputs(x, x2, with_ntk=True, paired=paired)
            k = k.replace(ntk=k.nngp * 0.5 + 1.0)
            before = [t.clone() for t in (k.nngp, k.ntk, k.var1)]
            out = Dropout(0.5).kernel_rule(k)
            assert isinstance(out, Kernel)
            for saved, now in zip(before, (k.nngp, k.ntk, k.var1)):
                assert torch.equal(saved, now)
            assert (out.width, out.sources, out.layout) == (k.width, k.sources, k.layout)
            assert (out.var2 is None) == (x2 is None)
            positions = k.layout.positions
            assert torch.allclose(positions(out.var1), 2 * positions(k.var1))
            assert out.ntk is not None


# ------------------------------------------------------------------ is_gaussian
def test_activation_directly_after_dropout_is_refused():
    """After Dropout the units are not Gaussian (zero with probability p, independently
    per example), so an activation needs a weighted layer in between."""
    x = _randn(3, 4, seed=6)
    with pytest.raises(ValueError, match="ReLU needs"):
        wn.Sequential(wn.Linear(8), Dropout(0.2), wn.ReLU(), wn.Linear(1)).kernel(x)
    wn.Sequential(wn.Linear(8), Dropout(0.0), wn.ReLU(), wn.Linear(1)).kernel(x)
    wn.Sequential(wn.Linear(8), Dropout(0.2), wn.Linear(8), wn.ReLU(), wn.Linear(1)).kernel(x)


# ------------------------------------------------------------------ finite twin
def test_twin_is_torch_dropout_and_eval_is_the_identity():
    net = wn.Sequential(wn.Linear(8, W1, B1), wn.ReLU(), Dropout(P_DROP), wn.Linear(2))
    plain = wn.Sequential(wn.Linear(8, W1, B1), wn.ReLU(), wn.Linear(2))
    model = net.build((3,), torch.Generator().manual_seed(0), dtype=DTYPE)
    reference = plain.build((3,), torch.Generator().manual_seed(0), dtype=DTYPE)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == P_DROP and dropouts[0].training
    x = _randn(6, 3, seed=7)
    model.eval()
    assert torch.equal(model(x), reference(x))


def _mc_net(width: int, readout: int) -> wn.Sequential:
    """Two hidden layers, each followed by ReLU and Dropout (a Linear after each)."""
    return wn.Sequential(
        wn.Linear(width, W1, B1), wn.ReLU(), Dropout(P_DROP),
        wn.Linear(width, W1, B1), wn.ReLU(), Dropout(P_DROP),
        wn.Linear(readout, W2, B2))


def _one_pass_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The empirical NTK (mean over outputs) from the Jacobian of ONE forward pass of the
    whole batch: the masks drawn in that pass are the same in every derivative.
    (``wn.empirical_ntk`` evaluates the model per example under ``vmap``, which refuses
    random operations, so it cannot be used with a training-mode Dropout.)"""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def outputs(parameters):
        return torch.func.functional_call(model, parameters, (x,)).reshape(x.shape[0], -1)

    jacobians = torch.func.jacrev(outputs)(params)
    kernel = torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype)
    n_out = 1
    for jacobian in jacobians.values():
        n_out = jacobian.shape[1]
        flat = jacobian.reshape(x.shape[0], n_out, -1)
        kernel = kernel + torch.einsum("aoq,boq->ab", flat, flat)
    return kernel / n_out


MC_WIDTHS = (16, 64, 256)
MC_ESTIMATES = 6  # independent estimates per width, each the mean of MC_TWINS twins
MC_TWINS = 4
MC_X = _randn(6, 3, seed=8)
MC_X[5] = MC_X[0]  # identical inputs, independent masks: their entry has no 1/keep


#: Bounds on ``typical error * sqrt(width)``, about 1.5 times the worst of 6 seeds.
MC_BOUND = {"nngp": 3.0, "ntk": 2.0}


def _normalised_rms(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """``sqrt(mean_ij ((MC_ij - K_ij) / sqrt(K_ii K_jj))^2)``."""
    root = exact.diagonal().sqrt()
    return float((((estimate - exact) / torch.outer(root, root)) ** 2).mean().sqrt())


def _monte_carlo(kind: str, width: int, seed: int) -> list[torch.Tensor]:
    """MC_ESTIMATES estimates, each the mean of the empirical kernels of MC_TWINS twins
    with ``width`` hidden units (and outputs, for the NNGP) in training mode, each
    kernel from ONE forward pass of the whole batch (one mask per example)."""
    net = _mc_net(width, readout=width if kind == "nngp" else 1)
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Dropout draws its masks from the global generator
        for _ in range(MC_ESTIMATES):
            total = torch.zeros(len(MC_X), len(MC_X), dtype=DTYPE)
            for _ in range(MC_TWINS):
                model = net.build((3,), generator, dtype=DTYPE)
                assert model.training
                if kind == "nngp":
                    with torch.no_grad():
                        f = model(MC_X)
                    total += f @ f.T / f.shape[1]
                else:
                    total += _one_pass_ntk(model, MC_X)
            estimates.append(total / MC_TWINS)
    return estimates


def _typical_error(estimates: list[torch.Tensor], exact: torch.Tensor) -> float:
    """The root-mean-square of the estimates' errors."""
    return math.sqrt(sum(_normalised_rms(e, exact) ** 2 for e in estimates) / len(estimates))


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_monte_carlo_twin_converges(kind, one_thread):
    """Train-mode twins converge to the exact kernel (``x2=None``) like ``1/sqrt(width)``:
    the typical error of a 4-twin estimate (RMS over 6 of them) falls at least 1.4 times
    for each 4 times the width (2 predicted), ``error * sqrt(width)`` stays bounded, and
    at the widest the mean of the estimates is clearly closer to the exact kernel than to
    the kernel without the 1/keep correction (the test sees the dropout).

    Measured with seed 0 (seeds 1 to 5 in brackets, the worst of them): typical errors
    at widths 16, 64, 256 of 0.314, 0.145, 0.083 (NNGP) and 0.243, 0.095, 0.055 (NTK);
    the smallest step was 1.72 (1.43), from 16 to 256 3.8 (3.8); ``error *
    sqrt(width)`` at most 1.33 (2.13) and 0.97 (1.17). The mean of the 6 estimates at
    256 is off by 0.021 and 0.016 (0.039, 0.028) of ``sqrt(K_ii K_jj)``, against 0.36
    and 0.58 (at least 0.34 and 0.52) from the kernel without the correction.
    """
    exact = _mc_net(1, 1).kernel(MC_X, get=kind)
    wrong = _mc_net(1, 1).kernel(MC_X, MC_X, get=kind)  # no 1/keep anywhere
    estimates = [_monte_carlo(kind, width, seed=0) for width in MC_WIDTHS]
    errors = [_typical_error(e, exact) for e in estimates]
    mean = torch.stack(estimates[-1]).mean(dim=0)
    report = (f"{kind}: typical errors {[round(e, 4) for e in errors]} at widths {MC_WIDTHS}; "
              f"mean at {MC_WIDTHS[-1]}: {_normalised_rms(mean, exact):.4f} from the kernel, "
              f"{_normalised_rms(mean, wrong):.4f} from the kernel without the correction")
    for narrow, wide in zip(errors, errors[1:]):
        assert wide <= narrow / 1.3, report
    assert errors[-1] <= errors[0] / 2.5, report
    for width, error in zip(MC_WIDTHS, errors):
        assert error * math.sqrt(width) < MC_BOUND[kind], report
    assert _normalised_rms(mean, wrong) > 3 * _normalised_rms(mean, exact), report


# ------------------------------------------------------------------ contract kit
@pytest.mark.parametrize("shape", [(3,), (1, 5, 5)])
def test_contract_kit(shape, one_thread):
    report = testing.check_layer(Dropout(0.3), shape)
    assert set(report) >= {"kernels", "consistency", "monte_carlo", "spec", "pickle"}


def test_contract_kit_identity_and_pooling(one_thread):
    testing.check_layer(Dropout(0), (3,), checks=["kernels", "consistency", "spec"])
    testing.check_layer(Dropout(0.5), (1, 4, 4), after=[wn.GlobalAvgPool(), wn.Linear(1)],
                        checks=["kernels", "consistency", "fast_paths", "float32"])


class _NoCorrection(Dropout):
    """A wrong Dropout: its twin drops units, its kernel ignores it."""

    def kernel_rule(self, k):
        return k


class _Undeclared(Dropout):
    """A Dropout that does not declare its noise on self-pairs."""

    @property
    def noise_on_self_pairs(self) -> bool:
        return False


def test_contract_kit_catches_wrong_dropouts(one_thread):
    with pytest.raises(AssertionError, match="converges to another kernel"):
        testing.check_layer(_NoCorrection(0.5), (3,), checks=["monte_carlo"])
    with pytest.raises(AssertionError, match="x2=None vs x2=x1"):
        testing.check_layer(_Undeclared(0.3), (3,), checks=["consistency"])
    with pytest.raises(AssertionError, match="identical but their rows differ"):
        testing.check_layer(_Undeclared(0.3), (3,), checks=["kernels"])
    assert testing.has_noise_on_self_pairs(wn.Sequential(wn.Linear(2), Dropout(0.1)))
    assert not testing.has_noise_on_self_pairs(wn.Sequential(wn.Linear(2), wn.ReLU()))
    assert not testing.has_noise_on_self_pairs(Dropout(0))  # the identity: full checks


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("p,error", [(-0.1, ValueError), (1.0, ValueError),
                                     (1.5, ValueError), (math.nan, ValueError),
                                     ("a", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_p_is_refused_naming_p(p, error):
    with pytest.raises(error, match=r"^p \(the probability of dropping a unit\)"):
        Dropout(p)


def test_p_and_repr():
    assert Dropout(0).p == 0.0 and isinstance(Dropout(0).p, float)
    assert repr(Dropout(0.25)) == "Dropout(p=0.25)"
    assert Dropout(0.25).keep == 0.75
    assert Dropout(np.float32(0.5)) == Dropout(0.5)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
def test_gradcheck_through_dropout(second):
    net = wn.Sequential(wn.Linear(8, W1, B1), wn.ReLU(), Dropout(P_DROP), wn.Linear(8, W2, B2),
                        wn.Erf(), Dropout(0.5), wn.Linear(1))
    x1 = _randn(3, 2, seed=9).requires_grad_(True)
    x2 = _randn(2, 2, seed=10).requires_grad_(True)
    if second == "x2=None":
        assert torch.autograd.gradcheck(lambda a: net.kernel(a, get=("nngp", "ntk")).ntk, (x1,))
        assert torch.autograd.gradcheck(lambda a: net.kernel(a, get="nngp"), (x1,))
    else:
        assert torch.autograd.gradcheck(lambda a, b: net.kernel(a, b, get="ntk"), (x1, x2))


def test_gradcheck_images_paired_layout():
    net = wn.Sequential(wn.Conv2d(4, 2, padding="same"), wn.ReLU(), Dropout(P_DROP),
                        wn.GlobalAvgPool(), wn.Linear(1))
    x = _randn(2, 1, 2, 3, seed=11).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: net.kernel(a, get="ntk"), (x,))


def test_monte_carlo_kernel_of_a_dropout_network_keeps_one_pass_masks():
    """``monte_carlo_kernel`` uses one forward pass per batch for a network with Dropout
    (``empirical_ntk``, one pass per example, refuses such a twin with a clear error)."""
    net = _mc_net(64, 1)
    x = MC_X
    torch.manual_seed(3)
    estimate = wn.monte_carlo_kernel(net, x, None, get="ntk", n_samples=2,
                                     generator=torch.Generator().manual_seed(4))
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    expected = sum(_one_pass_ntk(net.build(tuple(x.shape[1:]), generator,
                                           dtype=torch.float64), x)
                   for _ in range(2)) / 2
    torch.testing.assert_close(estimate, expected, rtol=1e-12, atol=1e-14)
    model = net.build(tuple(x.shape[1:]), dtype=torch.float64)
    with pytest.raises(ValueError, match="model.eval()"):
        wn.empirical_ntk(model, x)
    model.eval()
    assert torch.isfinite(wn.empirical_ntk(model, x)).all()
