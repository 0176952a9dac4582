"""A contract kit: check a layer or an activation against what every widenets layer must meet.

Every layer of widenets, and every layer or activation you write yourself, must give
kernels that are well formed, agree across the ways of asking for them, agree between
the fast and the straightforward paths and between float32 and float64, are the limit of
its own finite twin, survive a spec and a pickle round trip, and refuse bad input with a
clear error. The functions here check all of that and raise ``AssertionError`` on a
failure (no pytest needed), so they run under any test runner::

    import torch
    import widenets as wn
    from widenets.layers import Activation
    from widenets.testing import check_activation, check_layer

    class Sine(Activation):               # your own activation: phi(x) = sin(x)
        def apply(self, x):
            return torch.sin(x)

        def nngp_map(self, q1, q2, c, rho):        # E[sin(u) sin(v)]
            return torch.exp(-(q1 + q2) / 2) * torch.sinh(c)

        def derivative_map(self, q1, q2, c, rho):  # E[cos(u) cos(v)]
            return torch.exp(-(q1 + q2) / 2) * torch.cosh(c)

    def test_sine():
        check_activation(Sine())

    def test_my_block():                  # your own layer or combinator, on 1 x 5 x 5 images
        block = wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv2d(8, 3, padding="same")))
        check_layer(block, (1, 5, 5))     # in Conv2d -> block -> Flatten -> Linear

:func:`check_activation` embeds an activation in ``Linear -> act -> Linear -> act ->
Linear`` (convolutions and ``Flatten`` for images); :func:`check_layer` embeds any layer
between ``before`` (default: one weighted layer, so that its input is a centred Gaussian)
and ``after`` (default: a ``Linear`` read-out, after ``Flatten`` for images). Both run
every check below on the resulting network, and the spec and pickle checks on the layer
itself too, and return a dict of what they measured. ``checks=`` selects some of
:data:`CHECKS`. The individual checks are public: each takes a complete architecture
``net`` and inputs ``x1`` (and ``x2``; :func:`example_inputs` makes small ones with a
duplicated and a zero row, from a fixed seed, so every outcome is deterministic).

What each check guarantees (float64 unless said; "relative to ``sqrt(K_ii K_jj)``" means
entrywise against the natural scale of the entry, from the diagonal of the kernel of all
inputs together):

``"kernels"`` (:func:`check_kernels`)
    NNGP and NTK of ``x2=None`` are ``(N, N)`` tensors of the input's dtype, finite,
    exactly symmetric (bitwise) and positive semi-definite: the smallest eigenvalue is at
    least ``-PSD_RTOL`` (1e-10) times the largest. Rows of identical inputs are
    identical to ``CONSISTENCY_RTOL``.
``"consistency"`` (:func:`check_consistency`)
    ``kernel(x1, None)`` equals ``kernel(x1, x1)``, ``kernel(x1, x2)`` and ``kernel(x2,
    x1).T`` equal the off-diagonal blocks of the kernel of ``[x1; x2]``, and
    ``get=("nngp", "ntk")`` equals the two single calls, all to ``CONSISTENCY_RTOL``
    (1e-10) relative to ``sqrt(K_ii K_jj)``. For images, when the network accepts
    ``spatial="diagonal"`` (its positions reach the read-out only through ``Flatten``),
    ``"full"`` and ``"diagonal"`` agree to ``LAYOUT_RTOL`` (1e-12).
    Noise on self-pairs: a network with a layer whose attribute ``noise_on_self_pairs``
    is true (``Dropout`` with ``p > 0``: its twin draws a fresh mask for every
    example in each forward pass) has extra variance on the entries that pair an input
    with itself in one call, so ``kernel(x1, None)`` is larger than ``kernel(x1, x1)``
    (two calls) on its diagonal, and two identical inputs are two examples with
    independent noise. For such networks (:func:`has_noise_on_self_pairs`) the kit
    compares ``kernel(x1, None)`` with ``kernel(x1, x1)`` off the diagonal only, checks
    instead that ``kernel(x1, x1)`` equals the off-diagonal block of the kernel of
    ``[x1; x1]``, and compares the rows of identical inputs ``i, j`` off the columns
    ``i, j``, with ``K_ii = K_jj``.
``"fast_paths"`` (:func:`check_fast_paths`)
    The fast paths equal the straightforward ones (``widenets.paths.straightforward()``)
    to ``FAST_PATH_RTOL`` (1e-10) relative to ``sqrt(K_ii K_jj)``, with ``x2`` given
    and not.
``"float32"`` (:func:`check_float32`)
    ``kernel(..., dtype=torch.float32)`` is float32 and within ``FLOAT32_RTOL`` (1e-4)
    of float64, relative to ``sqrt(K_ii K_jj)``.
``"bad_inputs"`` (:func:`check_bad_inputs`)
    NaN or inf in ``x1`` (``x2``) raises a ``ValueError`` naming ``x1`` (``x2``); ``x2``
    of another per-example shape, a 1-D ``x1`` and an unknown ``get`` raise
    ``ValueError``; an input with one axis more (or, for images, one less) is refused
    by the kernel with a ``ValueError`` exactly when ``build`` refuses that shape.
``"monte_carlo"`` (:func:`check_monte_carlo`)
    The finite twin (``build``) converges to the exact kernel. Its weighted layers (those
    with a ``width_argument``: ``Linear``, the convolutions) are set to a narrow width
    ``w`` (4, or 2 channels) and a wide one ``64 w``
    (:func:`~widenets.architectures.with_hidden_width`), and
    ``monte_carlo_kernel`` estimates are drawn from fixed seeds: 16 twins at ``w``, 8 at
    ``64 w``. Errors are root-mean-squares over the entries of ``(MC_ij - K_ij) /
    sqrt(K_ii K_jj)``. The typical error of one twin falls at least ``MIN_IMPROVEMENT``
    (2) times from ``w`` to ``64 w`` (``1/sqrt(width)`` predicts 8), and the error of the
    mean of the 8 wide twins is below ``MONTE_CARLO_BOUND[kernel] / sqrt(8 x 64 w)``
    (NNGP 8, NTK 6: at ``64 w = 256``, 0.18 and 0.13). So it catches a twin whose
    kernel is off by more than about 0.15 of ``sqrt(K_ii K_jj)`` (a wrong weight scale,
    fan-in or padding), not small errors: the ``"maps"`` check is the precise one for
    activations. The NTK keeps the network's read-out (one output by default); the NNGP
    widens the read-out too, because the empirical NNGP of few outputs is a product of
    Gaussians whose noise does not shrink with the width. For a network with noise on
    self-pairs the noise is drawn from torch's global generator, seeded and restored, and
    the NTK of a twin is the Jacobian of one forward pass of the whole batch (masks
    fixed across the derivatives, as ``monte_carlo_kernel`` does for such networks).
``"maps"`` (:func:`check_activation_maps`, activations only)
    ``nngp_map`` and ``derivative_map`` equal ``E[phi(u) phi(v)]`` and ``E[phi'(u)
    phi'(v)]`` (``phi = apply``, ``phi'`` by autograd) of correlated Gaussians to
    ``MAPS_SIGMAS`` (6) standard errors of a Monte Carlo average over 2^16 fixed-seed
    samples, and ``pair_maps`` equals the two maps to ``FAST_PATH_RTOL``, also at
    correlations of exactly +-1 and nearly so.
``"spec"`` (:func:`check_spec`)
    ``layer.spec()`` is a JSON-serialisable dict that survives ``json`` unchanged and
    names no memory address; ``widenets.specs.from_spec(spec)`` rebuilds a layer of the
    same type that is ``==`` to the original, hashes equal, has the same ``repr`` and
    spec and computes bitwise identical kernels; layers compare equal exactly when their
    specs are equal. A layer that holds a function not importable by name (a lambda, a
    local function) must instead raise ``widenets.specs.NotCanonicalError`` from
    ``spec()``, and still equal itself.
``"pickle"`` (:func:`check_pickle`)
    ``pickle.loads(pickle.dumps(layer)) == layer`` with bitwise identical kernels
    (a layer holding a non-importable function may fail to pickle instead).

Keep the inputs small (a few examples, images of at most a few hundred pixels): the
checks compute every kernel several times, and the Monte Carlo check samples tens of
finite twins. With the defaults, :func:`check_activation` and :func:`check_layer` take
0.2 to 1 s each on one CPU thread (``torch.set_num_threads(1)`` is faster than several
for such tiny inputs), most of it in the Monte Carlo check.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import math
import pickle
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NoReturn, cast

import torch

from .architectures import with_hidden_width
from .layers import (
    Activation,
    Conv1d,
    Conv2d,
    Conv3d,
    Flatten,
    Layer,
    Linear,
    ReLU,
    Sequential,
)
from .layers.derived import DerivedSideInputs, SideInputsFunction, example_graphs, example_masks
from .monte_carlo import has_noise_on_self_pairs, monte_carlo_kernel
from .paths import straightforward
from .specs import NotCanonicalError, from_spec

__all__ = [
    "CHECKS", "CONSISTENCY_RTOL", "FAST_PATH_RTOL", "FLOAT32_RTOL", "LAYOUT_RTOL",
    "MAPS_SIGMAS", "MIN_IMPROVEMENT", "MONTE_CARLO_BOUND", "PSD_RTOL",
    "check_activation", "check_activation_maps", "check_bad_inputs", "check_consistency",
    "check_fast_paths", "check_float32", "check_kernels", "check_layer", "check_monte_carlo",
    "check_network", "check_pickle", "check_spec", "example_graphs", "example_inputs",
    "example_masks", "has_noise_on_self_pairs",
    "holds_local_functions",
]

#: The checks :func:`check_layer` and :func:`check_activation` run, in this order
#: (``"maps"`` for activations only).
CHECKS = ("kernels", "consistency", "fast_paths", "float32", "bad_inputs", "maps",
          "spec", "pickle", "monte_carlo")
KERNEL_NAMES = ("nngp", "ntk")

#: Smallest eigenvalue allowed relative to the largest (``-PSD_RTOL * lambda_max``).
PSD_RTOL = 1e-10
#: Agreement of the ways of asking for one kernel, relative to ``sqrt(K_ii K_jj)``.
CONSISTENCY_RTOL = 1e-10
#: Agreement of the full and the diagonal spatial covariance, relative to ``sqrt(K_ii K_jj)``.
LAYOUT_RTOL = 1e-12
#: Agreement of the fast and the straightforward paths, relative to ``sqrt(K_ii K_jj)``.
FAST_PATH_RTOL = 1e-10
#: Agreement of float32 with float64, relative to ``sqrt(K_ii K_jj)``.
FLOAT32_RTOL = 1e-4
#: How many times smaller the typical Monte Carlo error must be at the wide width.
MIN_IMPROVEMENT = 2.0
#: The error of the mean of the wide twins must be below ``bound / sqrt(twins x width)``.
#: Measured with the defaults of :func:`check_monte_carlo` on every layer and activation
#: of ``tests/test_contract.py`` over seeds 0 to 7: at most 4.2 (NNGP) and 2.7 (NTK),
#: except ``RectifiedMonomial(2)`` (heavy-tailed outputs, 8.4 and 13.9); these bounds are
#: about twice that.
MONTE_CARLO_BOUND = {"nngp": 8.0, "ntk": 6.0}
#: Tolerance of :func:`check_activation_maps`, in standard errors of the Monte Carlo mean.
MAPS_SIGMAS = 6.0

_CONVOLUTIONS = {1: Conv1d, 2: Conv2d, 3: Conv3d}


# ------------------------------------------------------------------ helpers
def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _kernels(net: Layer, x1, x2=None, **kwargs) -> dict[str, torch.Tensor]:
    k = net.kernel(x1, x2, get=KERNEL_NAMES, **kwargs)
    return {name: cast(torch.Tensor, k[name]) for name in KERNEL_NAMES}  # all asked for


def _joint(x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
    return x1 if x2 is None else torch.cat([x1, x2])


def _scales(joint_kernel: torch.Tensor, n1: int, second: slice) -> torch.Tensor:
    """``sqrt(K_ii K_jj)`` for the rows ``:n1`` and the columns ``second`` of the joint
    kernel; entries whose scale is 0 are measured against the largest diagonal entry."""
    root = joint_kernel.diagonal().abs().sqrt()
    scale = torch.outer(root[:n1], root[second])
    fallback = joint_kernel.diagonal().abs().max().clamp_min(torch.finfo(scale.dtype).tiny)
    return torch.where(scale > 0, scale, fallback)


def _normalised_error(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    difference = (got.double() - expected.double()).abs() / scale.double()
    return float(difference.max()) if difference.numel() else 0.0


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, dtype=torch.float64)


def _describe(net: Layer) -> str:
    text = repr(net)
    return text if len(text) <= 300 else text[:297] + "..."


def example_inputs(
    input_shape: tuple[int, ...], n1: int = 4, n2: int = 3, seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal inputs ``(n1, *input_shape)`` and ``(n2, *input_shape)`` from a
    fixed seed; the last row of ``x1`` repeats its first, the last row of ``x2`` is zero."""
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, *input_shape, generator=generator, dtype=torch.float64)
    x2 = torch.randn(n2, *input_shape, generator=generator, dtype=torch.float64)
    if n1 > 1:
        x1[-1] = x1[0]
    if n2 > 1:
        x2[-1] = 0.0
    return x1.to(dtype), x2.to(dtype)


# ------------------------------------------------------------------ kernels
def check_kernels(net: Layer, x: torch.Tensor) -> dict[str, float]:
    """The NNGP and NTK of ``x`` with itself (``x2=None``): shape ``(N, N)`` and ``x``'s
    dtype, finite, exactly symmetric, positive semi-definite to ``PSD_RTOL`` of the
    largest eigenvalue; rows of identical inputs equal to ``CONSISTENCY_RTOL``.

    Returns the smallest eigenvalue relative to the largest, per kernel.
    """
    x = _as_tensor(x)
    n = x.shape[0]
    k = _kernels(net, x)
    noisy = has_noise_on_self_pairs(net)
    measured = {}
    for name, matrix in k.items():
        where = f"{name.upper()} of {_describe(net)}"
        if tuple(matrix.shape) != (n, n):
            _fail(f"{where}: shape {tuple(matrix.shape)}, expected {(n, n)}")
        if matrix.dtype != x.dtype:
            _fail(f"{where}: dtype {matrix.dtype}, expected the input's {x.dtype}")
        if not bool(torch.isfinite(matrix).all()):
            _fail(f"{where}: non-finite entries\n{matrix}")
        if not torch.equal(matrix, matrix.T):
            asymmetry = float((matrix - matrix.T).abs().max())
            _fail(f"{where}: not exactly symmetric (largest |K - K^T| = {asymmetry:.3g})")
        eigenvalues = torch.linalg.eigvalsh(matrix.double())
        largest = float(eigenvalues.abs().max())
        smallest = float(eigenvalues.min())
        relative = smallest / largest if largest > 0 else 0.0
        if smallest < -PSD_RTOL * largest:
            _fail(f"{where}: not positive semi-definite, smallest eigenvalue {smallest:.3g} "
                  f"against the largest {largest:.3g} (allowed: -{PSD_RTOL:g} times it)")
        measured[name] = relative
        scale = _scales(matrix, n, slice(None))
        for i in range(n):
            for j in range(i + 1, n):
                if torch.equal(x[i], x[j]):
                    difference = (matrix[i] - matrix[j]).abs() / scale[i]
                    if noisy:  # the noise on the diagonal: K_ii vs K_jj, K_ij vs K_ji
                        difference[i] = (matrix[i, i] - matrix[j, j]).abs() / scale[i, i]
                        difference[j] = 0.0
                    error = float(difference.max())
                    if error > CONSISTENCY_RTOL:
                        _fail(f"{where}: inputs {i} and {j} are identical but their rows "
                              f"differ by {error:.3g} of sqrt(K_ii K_jj)")
    return measured


def check_consistency(net: Layer, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, float]:
    """The ways of asking for one kernel agree to ``CONSISTENCY_RTOL`` (relative to
    ``sqrt(K_ii K_jj)``): ``x2=None`` and ``x2=x1``; ``kernel(x1, x2)``, ``kernel(x2,
    x1).T`` and the blocks of the kernel of ``[x1; x2]``; ``get`` as a tuple and as single
    names. For images, ``spatial="full"`` and ``"diagonal"`` agree to ``LAYOUT_RTOL``
    wherever the network accepts ``"diagonal"``. For a network with noise on self-pairs
    (:func:`has_noise_on_self_pairs`), ``x2=None`` and ``x2=x1`` agree off the diagonal
    only, and ``kernel(x1, x1)`` equals the off-diagonal block of the kernel of ``[x1;
    x1]`` (two calls see independent noise, as two examples of one call do).

    Returns the largest normalised difference of each comparison.
    """
    x1, x2 = _as_tensor(x1), _as_tensor(x2)
    n1 = x1.shape[0]
    joint = _kernels(net, _joint(x1, x2))
    symmetric = _kernels(net, x1)
    given_self = _kernels(net, x1, x1)
    cross = _kernels(net, x1, x2)
    transposed = _kernels(net, x2, x1)
    noisy = has_noise_on_self_pairs(net)
    doubled = _kernels(net, torch.cat([x1, x1])) if noisy else {}
    measured: dict[str, float] = {}

    def compare(label: str, got, expected, scale, rtol=CONSISTENCY_RTOL) -> None:
        if tuple(got.shape) != tuple(expected.shape):
            _fail(f"{label} of {_describe(net)}: shape {tuple(got.shape)}, expected "
                  f"{tuple(expected.shape)}")
        error = _normalised_error(got, expected, scale)
        measured[label] = max(error, measured.get(label, 0.0))
        if not error <= rtol:
            _fail(f"{label} of {_describe(net)}: differ by {error:.3g} of sqrt(K_ii K_jj) "
                  f"(allowed {rtol:g})\ngot\n{got}\nexpected\n{expected}")

    for name in KERNEL_NAMES:
        own = _scales(joint[name], n1, slice(0, n1))
        between = _scales(joint[name], n1, slice(n1, None))
        if noisy:
            off_diagonal = ~torch.eye(n1, dtype=torch.bool, device=x1.device)
            compare(f"{name}: x2=None vs x2=x1 off the diagonal", given_self[name][off_diagonal],
                    symmetric[name][off_diagonal], own[off_diagonal])
            compare(f"{name}: x2=x1 vs the off-diagonal block of [x1; x1]", given_self[name],
                    doubled[name][:n1, n1:], own)
        else:
            compare(f"{name}: x2=None vs x2=x1", given_self[name], symmetric[name], own)
        compare(f"{name}: x2=None vs block of [x1; x2]", symmetric[name],
                joint[name][:n1, :n1], own)
        compare(f"{name}: kernel(x1, x2) vs block of [x1; x2]", cross[name],
                joint[name][:n1, n1:], between)
        compare(f"{name}: kernel(x2, x1).T vs kernel(x1, x2)", transposed[name].T,
                cross[name], between)
        single = net.kernel(x1, x2, get=name)
        if not isinstance(single, torch.Tensor):
            _fail(f"get={name!r} must return a tensor, got {type(single).__name__}")
        compare(f"{name}: get={name!r} vs get=('nngp', 'ntk')", single, cross[name], between)
    if x1.ndim > 2:
        try:
            diagonal = _kernels(net, x1, x2, spatial="diagonal")
        except ValueError:
            diagonal = None  # the network pools positions: it needs the full covariance
        if diagonal is not None:
            full = _kernels(net, x1, x2, spatial="full")
            for name in KERNEL_NAMES:
                between = _scales(joint[name], n1, slice(n1, None))
                compare(f"{name}: spatial='full' vs 'diagonal'", full[name], diagonal[name],
                        between, LAYOUT_RTOL)
                compare(f"{name}: spatial='auto' vs 'diagonal'", cross[name], diagonal[name],
                        between, LAYOUT_RTOL)
    return measured


def check_fast_paths(net: Layer, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, float]:
    """The fast paths equal the straightforward ones (``widenets.paths.straightforward()``)
    to ``FAST_PATH_RTOL`` relative to ``sqrt(K_ii K_jj)``, for ``x2=None`` and given
    (``x2=None`` computes the listed pairs ``i <= j`` where every layer takes them).

    Returns the largest normalised difference per kernel.
    """
    x1, x2 = _as_tensor(x1), _as_tensor(x2)
    n1 = x1.shape[0]
    measured = dict.fromkeys(KERNEL_NAMES, 0.0)
    for second in (None, x2):
        fast = _kernels(net, x1, second)
        with straightforward():
            plain = _kernels(net, x1, second)
        joint = plain if second is None else _kernels(net, _joint(x1, second))
        columns = slice(0, n1) if second is None else slice(n1, None)
        for name in KERNEL_NAMES:
            scale = _scales(joint[name], n1, columns)
            error = _normalised_error(fast[name], plain[name], scale)
            measured[name] = max(measured[name], error)
            if not error <= FAST_PATH_RTOL:
                which = "None" if second is None else "given"
                _fail(f"{name.upper()} of {_describe(net)} (x2={which}): "
                      f"fast and straightforward paths differ by {error:.3g} of "
                      f"sqrt(K_ii K_jj) (allowed {FAST_PATH_RTOL:g})\nfast\n{fast[name]}\n"
                      f"straightforward\n{plain[name]}")
    return measured


def check_float32(net: Layer, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, float]:
    """``kernel(..., dtype=torch.float32)`` is float32 and within ``FLOAT32_RTOL`` of
    float64, relative to ``sqrt(K_ii K_jj)``, for ``x2=None`` and given.

    Returns the largest normalised difference per kernel.
    """
    x1, x2 = _as_tensor(x1).double(), _as_tensor(x2).double()
    n1 = x1.shape[0]
    joint = _kernels(net, _joint(x1, x2))
    measured = dict.fromkeys(KERNEL_NAMES, 0.0)
    for second, columns in ((None, slice(0, n1)), (x2, slice(n1, None))):
        exact = _kernels(net, x1, second)
        single = _kernels(net, x1, second, dtype=torch.float32)
        for name in KERNEL_NAMES:
            if single[name].dtype != torch.float32:
                _fail(f"dtype=torch.float32 gave {single[name].dtype}")
            if not bool(torch.isfinite(single[name]).all()):
                _fail(f"{name.upper()} of {_describe(net)} in float32: non-finite entries")
            error = _normalised_error(single[name], exact[name],
                                      _scales(joint[name], n1, columns))
            measured[name] = max(measured[name], error)
            if not error <= FLOAT32_RTOL:
                _fail(f"{name.upper()} of {_describe(net)}: float32 differs from float64 by "
                      f"{error:.3g} of sqrt(K_ii K_jj) (allowed {FLOAT32_RTOL:g})")
    return measured


# ------------------------------------------------------------------ bad inputs
def _expect_value_error(call: Callable[[], object], what: str, *, naming: str | None = None):
    try:
        call()
    except ValueError as error:
        if naming is not None and naming not in str(error):
            _fail(f"{what}: the ValueError does not name {naming!r}: {error}")
        return
    except Exception as error:  # any other kind of error is reported as such
        _fail(f"{what}: expected a ValueError, got {type(error).__name__}: {error}")
    _fail(f"{what}: expected a ValueError, nothing was raised")


def _refusal(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except ValueError as error:
        return error
    return None


def check_bad_inputs(net: Layer, x1: torch.Tensor, x2: torch.Tensor) -> None:
    """Bad input is refused with a ``ValueError``: NaN and inf in ``x1`` (naming ``x1``)
    and in ``x2`` (naming ``x2``), ``x2`` of another per-example shape, a 1-D ``x1``, an
    unknown ``get``. An input with one more axis (and, for images, one less) raises a
    ``ValueError`` from ``kernel`` exactly when ``build`` refuses that per-example shape
    (the kernel and the twin accept the same inputs)."""
    x1, x2 = _as_tensor(x1), _as_tensor(x2)
    for bad in (math.nan, math.inf):
        poisoned = x1.contiguous().clone()
        poisoned.view(-1)[1] = bad
        _expect_value_error(functools.partial(net.kernel, poisoned, x2, get="ntk"),
                            f"x1 containing {bad}", naming="x1")
        poisoned = x2.contiguous().clone()
        poisoned.view(-1)[-1] = bad
        _expect_value_error(functools.partial(net.kernel, x1, poisoned, get="nngp"),
                            f"x2 containing {bad}", naming="x2")
    wider = torch.cat([x2, x2[..., :1]], dim=-1)
    _expect_value_error(lambda: net.kernel(x1, wider), "x2 of another per-example shape")
    _expect_value_error(lambda: net.kernel(x1.reshape(-1)), "a 1-D x1")
    for get in ("nnpg", ("ntk", "cntk")):
        _expect_value_error(functools.partial(net.kernel, x1, x2, get=get), f"get={get!r}")
    variants = [x1.unsqueeze(-1)]
    if x1.ndim > 2:
        variants.append(x1.flatten(-2))
    for variant in variants:
        shape = tuple(variant.shape[1:])
        refused_by_kernel = _refusal(functools.partial(net.kernel, variant, get="ntk"))
        refused_by_build = _refusal(functools.partial(net.build, shape, torch.Generator()))
        if (refused_by_kernel is None) != (refused_by_build is None):
            _fail(f"inputs of per-example shape {shape}: kernel "
                  f"{'refuses' if refused_by_kernel else 'accepts'} them "
                  f"({refused_by_kernel}) but build "
                  f"{'refuses' if refused_by_build else 'accepts'} them ({refused_by_build})")


# ------------------------------------------------------------------ Monte Carlo
def _parameter_count(net: Layer, input_shape: tuple[int, ...]) -> int:
    model = net.build(input_shape, torch.Generator().manual_seed(0), dtype=torch.float64)
    return sum(p.numel() for p in model.parameters())


def _normalised_rms(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """``sqrt(mean_ij ((MC_ij - K_ij) / sqrt(K_ii K_jj))^2)`` of a symmetric kernel."""
    scale = _scales(exact, exact.shape[0], slice(None))
    return float((((estimate - exact) / scale) ** 2).mean().sqrt())


@contextlib.contextmanager
def _global_rng_seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """With ``seed``: torch's global generator (of ``device``) seeded with it, and restored
    afterwards; the noise of a twin such as ``nn.Dropout`` is drawn from it."""
    if seed is None:
        yield
        return
    if device.type == "cpu":  # only the CPU generator is forked and seeded
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:  # the CPU and every device of this type
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(seed)
            yield


def check_monte_carlo(
    net: Layer,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    get: str | Sequence[str] = KERNEL_NAMES,
    width: int | None = None,
    factor: int = 64,
    n_samples: int = 1,
    n_estimates: tuple[int, int] = (16, 8),
    seed: int = 0,
    bound: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """The finite twin's Monte Carlo kernel converges to the exact kernel with the width.

    On the inputs ``x = [x1; x2]``, at the hidden widths ``w = width`` (default 4, or 2
    channels for images) and ``W = factor * w``
    (:func:`~widenets.architectures.with_hidden_width`: for the NNGP
    the read-out too, for the NTK the read-out of ``net`` is kept), ``n_estimates``
    (narrow, wide) independent estimates ``monte_carlo_kernel(net, x,
    n_samples=n_samples)`` are drawn from one ``torch.Generator`` seeded with ``seed``.
    The error of an estimate is the root-mean-square over the entries of ``(MC_ij -
    K_ij) / sqrt(K_ii K_jj)``, against that network's own exact kernel ``K``. Asserts:

    * the typical error (root-mean-square over the estimates) at ``W`` is at most the
      one at ``w`` divided by ``MIN_IMPROVEMENT`` (2; ``1/sqrt(width)`` predicts
      ``sqrt(factor)``, 8 by default): the twin converges to something;
    * the error of the mean of all the wide estimates is below ``bound[kernel] /
      sqrt(W * n_estimates[1] * n_samples)`` (default :data:`MONTE_CARLO_BOUND`): what
      it converges to is the kernel, to within the Monte Carlo noise of those twins.

    For a network with noise on self-pairs (:func:`has_noise_on_self_pairs`, e.g.
    ``Dropout``) the twins draw their noise from torch's global generator, which is
    seeded with ``seed`` for the estimates and restored afterwards; the NNGP estimate is
    one forward pass of ``x`` per twin (each example its own mask, as the kernel of
    ``x2=None`` assumes), and the NTK estimate is the Jacobian of one forward pass of the
    whole batch per twin (``widenets.empirical.one_pass_ntk``, which
    ``monte_carlo_kernel`` uses for such networks), so that the masks are the same in
    every derivative.

    Deterministic: the same seeds give the same errors.

    Returns ``{kernel: {"narrow": typical error at w, "wide": at W, "mean": error of the
    mean at W}}``.
    """
    names = (get,) if isinstance(get, str) else tuple(get)
    bound = MONTE_CARLO_BOUND if bound is None else {**MONTE_CARLO_BOUND, **bound}
    noisy = has_noise_on_self_pairs(net)
    x = _joint(_as_tensor(x1), None if x2 is None else _as_tensor(x2))
    if width is None:
        width = 4 if x.ndim == 2 else 2
    widths = (width, factor * width)
    input_shape = tuple(x.shape[1:])
    measured = {}
    for name in names:
        nets = [with_hidden_width(net, w, readout=name == "nngp") for w in widths]
        counts = [_parameter_count(n, input_shape) for n in nets]
        if counts[1] <= counts[0]:
            _fail(f"setting the width of the weighted layers of {_describe(net)} did not "
                  f"change its twin ({counts[0]} parameters at width {widths[0]}, "
                  f"{counts[1]} at {widths[1]})")
        typical, mean_error = [], 0.0
        for twin_net, estimates in zip(nets, n_estimates):
            exact = twin_net.kernel(x, get=name)
            generator = torch.Generator().manual_seed(seed)
            squared, total = 0.0, torch.zeros_like(exact)
            with _global_rng_seeded(seed if noisy else None, x.device):
                samples = [monte_carlo_kernel(twin_net, x, get=name, n_samples=n_samples,
                                              generator=generator)
                           for _ in range(estimates)]
            for estimate in samples:
                if estimate.shape != exact.shape:
                    _fail(f"Monte Carlo {name.upper()} has shape {tuple(estimate.shape)}, the "
                          f"exact one {tuple(exact.shape)}")
                squared += _normalised_rms(estimate, exact) ** 2
                total += estimate
            typical.append(math.sqrt(squared / estimates))
            mean_error = _normalised_rms(total / estimates, exact)
        narrow, wide = typical
        measured[name] = {"narrow": narrow, "wide": wide, "mean": mean_error}
        twins = widths[1] * n_estimates[1] * n_samples
        limit = bound[name] / math.sqrt(twins)
        report = (f"Monte Carlo {name.upper()} of {_describe(net)}: typical error {narrow:.4f} "
                  f"of sqrt(K_ii K_jj) at width {widths[0]}, {wide:.4f} at width {widths[1]}; "
                  f"the mean of {n_estimates[1] * n_samples} twins at width {widths[1]} is "
                  f"off by {mean_error:.4f}")
        if not wide <= narrow / MIN_IMPROVEMENT:
            _fail(f"{report}: expected at least {MIN_IMPROVEMENT:g} times smaller at the wide "
                  f"width (1/sqrt(width) predicts {math.sqrt(factor):.3g}); the twin does not "
                  "converge")
        if not mean_error <= limit:
            _fail(f"{report}: expected below {bound[name]:g} / sqrt({widths[1]} x "
                  f"{n_estimates[1] * n_samples}) = {limit:.4f}; the twin converges to another "
                  "kernel")
    return measured


# ------------------------------------------------------------------ activations
def _autograd_derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = fn(leaf)
        if not out.requires_grad:
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def check_activation_maps(
    activation: Activation,
    *,
    n_samples: int = 1 << 16,
    seed: int = 0,
    sigmas: float = MAPS_SIGMAS,
) -> dict[str, float]:
    """An activation's maps against Monte Carlo averages of its own ``apply``.

    At variances ``q1, q2`` in (0.3, 1, 2.5) and correlations from -0.8 to 1, with
    ``(u, v)`` correlated Gaussians drawn from ``n_samples`` fixed-seed standard normal
    pairs: ``nngp_map`` is within ``sigmas`` standard errors of the mean of
    ``apply(u) apply(v)``, and ``derivative_map`` of the mean of ``phi'(u) phi'(v)``
    (``phi'`` by autograd of ``apply``; zero where ``apply`` is piecewise constant). And
    ``pair_maps`` equals ``(nngp_map, ntk * derivative_map)`` to ``FAST_PATH_RTOL`` of
    the natural scale, also at correlations of exactly +-1, 1 - 1e-12 and at variances
    from 1e-6 to 1e4 (when the activation overrides ``pair_maps``). An activation that
    overrides ``kernel_rule`` (``Identity``) has no maps to check: returns an empty dict.

    Returns the largest deviation in standard errors and the largest ``pair_maps``
    difference.
    """
    if type(activation).kernel_rule is not Activation.kernel_rule:
        return {}
    dtype = torch.float64
    pairs = [(0.3, 2.5), (1.0, 1.0), (2.5, 0.3), (1.0, 2.5)]
    correlations = [-0.8, -0.3, 0.0, 0.5, 0.9, 1.0]
    points = [(a, b, r) for a, b in pairs for r in correlations]
    q1 = torch.tensor([p[0] for p in points], dtype=dtype)
    q2 = torch.tensor([p[1] for p in points], dtype=dtype)
    rho = torch.tensor([p[2] for p in points], dtype=dtype)
    c = rho * torch.sqrt(q1 * q2)
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 1, n_samples, generator=generator, dtype=dtype)
    u = q1.sqrt()[:, None] * z[0]
    v = q2.sqrt()[:, None] * (rho[:, None] * z[0] + (1 - rho**2).sqrt()[:, None] * z[1])
    measured = {}
    name = type(activation).__name__
    for label, fn, map_fn in (
        ("nngp_map", activation.apply, activation.nngp_map),
        ("derivative_map", functools.partial(_autograd_derivative, activation.apply),
         activation.derivative_map),
    ):
        products = fn(u) * fn(v)
        mean = products.mean(dim=1)
        standard_error = products.std(dim=1) / math.sqrt(n_samples)
        scale = torch.sqrt((fn(u) ** 2).mean(dim=1) * (fn(v) ** 2).mean(dim=1))
        expected = map_fn(q1.clone(), q2.clone(), c.clone(), rho.clone())
        expected = torch.broadcast_to(expected, mean.shape)
        allowed = sigmas * standard_error + 1e-9 * scale
        deviation = (expected - mean).abs()
        measured[label] = float((deviation / standard_error.clamp_min(1e-300)).max())
        bad = deviation > allowed
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            _fail(f"{name}.{label} at q1={points[i][0]}, q2={points[i][1]}, rho={points[i][2]}: "
                  f"{float(expected[i]):.6g}, but the Monte Carlo mean of apply is "
                  f"{float(mean[i]):.6g} +- {float(standard_error[i]):.2g} (standard error; "
                  f"allowed {sigmas:g} of them)")
    if type(activation).pair_maps is Activation.pair_maps:
        return measured  # the default pair_maps calls the two maps: nothing to compare
    # pair_maps against the separate maps, on harder points too.
    variances = torch.tensor([1e-6, 0.3, 1.0, 1e4], dtype=dtype)
    extremes = torch.tensor([-1.0, -1 + 1e-12, -0.5, 0.0, 0.7, 1 - 1e-12, 1.0], dtype=dtype)
    grid = torch.cartesian_prod(variances, variances, extremes)
    q1, q2, rho = grid.unbind(1)
    c = rho * torch.sqrt(q1) * torch.sqrt(q2)
    ntk = torch.linspace(0.5, 2.0, len(rho), dtype=dtype)
    nngp_pair, ntk_pair = activation.pair_maps(q1.clone(), q2.clone(), c.clone(), rho.clone(),
                                               ntk.clone())
    if ntk_pair is None:
        _fail(f"{name}.pair_maps returned no NTK, though given one")
    nngp_alone = activation.nngp_map(q1.clone(), q2.clone(), c.clone(), rho.clone())
    derivative = activation.derivative_map(q1.clone(), q2.clone(), c.clone(), rho.clone())
    ones = torch.ones_like(q1)

    def natural(map_fn) -> torch.Tensor:
        first = torch.broadcast_to(map_fn(q1.clone(), q1.clone(), q1.clone(), ones.clone()),
                                   q1.shape)
        second = torch.broadcast_to(map_fn(q2.clone(), q2.clone(), q2.clone(), ones.clone()),
                                    q2.shape)
        scale = torch.sqrt(first.abs() * second.abs())
        return torch.where(scale > 0, scale, 1.0)

    for label, got, expected, scale in (
        ("pair_maps NNGP", nngp_pair, nngp_alone, natural(activation.nngp_map)),
        ("pair_maps NTK", ntk_pair, ntk * derivative, ntk * natural(activation.derivative_map)),
    ):
        got = torch.broadcast_to(got, q1.shape)
        expected = torch.broadcast_to(expected, q1.shape)
        if not bool(torch.isfinite(got).all()):
            _fail(f"{name}.{label}: non-finite values")
        error = ((got - expected).abs() / scale).max()
        measured[label] = float(error)
        if not error <= FAST_PATH_RTOL:
            i = int(((got - expected).abs() / scale).argmax())
            _fail(f"{name}.{label} differs from the separate maps by {float(error):.3g} of the "
                  f"natural scale at q1={float(q1[i]):g}, q2={float(q2[i]):g}, "
                  f"rho={float(rho[i])!r}: {float(got[i])!r} vs {float(expected[i])!r}")
    return measured


# ------------------------------------------------------------------ spec and pickle
def _importable(fn: object) -> bool:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return False
    try:
        target: object = importlib.import_module(module)
    except ImportError:
        return False
    by_name = getattr(target, getattr(fn, "__name__", ""), None)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target is fn or by_name is fn


def _held_callables(value: object, seen: set[int]) -> Iterator[object]:
    """Callables held by a layer's public attributes (through sublayers and containers)."""
    if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, torch.Tensor,
                                                torch.dtype, type(None))):
        return
    seen.add(id(value))
    if isinstance(value, Layer):
        for key, item in vars(value).items():
            if not key.startswith("_"):
                yield from _held_callables(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _held_callables(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _held_callables(item, seen)
    elif isinstance(value, functools.partial):
        yield from _held_callables(value.func, seen)
        yield from _held_callables(value.args, seen)
        yield from _held_callables(value.keywords, seen)
    elif isinstance(value, types.MethodType):
        yield value.__func__
        yield from _held_callables(value.__self__, seen)
    elif callable(value):
        yield value if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)
                                  ) else type(value)
        if not isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
            yield from _held_callables(getattr(value, "__dict__", {}), seen)


def holds_local_functions(layer: Layer) -> list[object]:
    """The functions held by ``layer`` (its public attributes, its sublayers) that cannot be
    imported by name: lambdas, local functions, objects of local classes. Such a layer has
    no canonical spec."""
    return [fn for fn in _held_callables(layer, set()) if not _importable(fn)]


def _same_kernels(first: Layer, second: Layer, inputs, what: str) -> None:
    if inputs is None:
        return
    x1, x2 = inputs
    a, b = _kernels(first, x1, x2), _kernels(second, x1, x2)
    for name in KERNEL_NAMES:
        if not torch.equal(a[name], b[name]):
            difference = float((a[name] - b[name]).abs().max())
            _fail(f"{what}: the {name.upper()} is not bitwise identical (largest difference "
                  f"{difference:.3g})")


def _reference_layers() -> list[Layer]:
    return [Linear(1), Linear(2, W_std=1.5, b_std=0.1), ReLU(), Sequential(ReLU())]


def check_spec(
    layer: Layer, inputs: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict | None:
    """``layer.spec()`` and ``widenets.specs.from_spec`` round-trip the layer.

    For a layer holding only importable functions: ``spec()`` is a dict that ``json``
    round-trips unchanged and that names no memory address (``" at 0x"``); ``from_spec``
    of it (after the JSON round trip) gives a layer of the same type, ``==`` in both
    directions, equal hash, ``repr`` and spec; a deep copy is equal too; the layer equals
    a few reference layers exactly when their specs are equal; with ``inputs = (x1,
    x2)`` (for a complete network) the rebuilt layer's kernels are bitwise identical.
    For a layer holding a lambda or a local function (:func:`holds_local_functions`):
    ``spec()`` raises ``widenets.specs.NotCanonicalError`` (a ``ValueError``) and the
    layer still equals itself.

    Returns the spec (``None`` for a non-canonical layer).
    """
    local = holds_local_functions(layer)
    name = _describe(layer)
    try:
        spec = layer.spec()
    except NotCanonicalError as error:
        if not local:
            _fail(f"{name}.spec() raised NotCanonicalError ({error}) but every function it "
                  "holds is importable by name")
        if not (layer == layer) or layer != layer:  # equality with itself, by identity
            _fail(f"{name} does not equal itself")
        return None
    if local:
        _fail(f"{name}.spec() returned a spec although the layer holds functions that cannot "
              f"be imported by name ({local}); it must raise widenets.specs.NotCanonicalError")
    if not isinstance(spec, dict):
        _fail(f"{name}.spec() must return a dict, got {type(spec).__name__}")
    try:
        text = json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as error:
        _fail(f"{name}.spec() is not JSON-serialisable: {error}\n{spec!r}")
    if " at 0x" in text:
        _fail(f"{name}.spec() names a memory address, so it is not process-independent: {text}")
    decoded = json.loads(text)
    if decoded != spec:
        _fail(f"{name}.spec() changes in a JSON round trip (tuples? non-string keys?):\n"
              f"{spec!r}\n{decoded!r}")
    rebuilt = from_spec(decoded)
    if type(rebuilt) is not type(layer):
        _fail(f"from_spec(spec) of {name} is a {type(rebuilt).__name__}")
    if not (rebuilt == layer and layer == rebuilt) or rebuilt != layer:
        _fail(f"from_spec(spec) of {name} does not compare equal to it: {rebuilt!r}")
    if hash(rebuilt) != hash(layer):
        _fail(f"from_spec(spec) of {name} is equal to it but hashes differently")
    if repr(rebuilt) != repr(layer):
        _fail(f"repr changes in a spec round trip: {layer!r} vs {rebuilt!r}")
    if rebuilt.spec() != spec:
        _fail(f"the spec changes in a round trip: {spec!r} vs {rebuilt.spec()!r}")
    duplicate = copy.deepcopy(layer)
    if duplicate != layer or hash(duplicate) != hash(layer):
        _fail(f"a deep copy of {name} is not equal to it, or hashes differently")
    for other in _reference_layers():
        if (other == layer) != (other.spec() == spec) or (layer == other) != (other == layer):
            _fail(f"{name} and {other!r}: equality must hold exactly when the specs are equal")
    _same_kernels(layer, rebuilt, inputs, f"from_spec(spec) of {name}")
    return spec


def check_pickle(layer: Layer, inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``pickle.loads(pickle.dumps(layer)) == layer``, of the same type and ``repr``, with
    bitwise identical kernels on ``inputs`` (for a complete network). A layer holding a
    function that cannot be imported by name (:func:`holds_local_functions`) may fail to
    pickle instead; any other must not."""
    name = _describe(layer)
    try:
        data = pickle.dumps(layer)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        if holds_local_functions(layer):
            return
        _fail(f"{name} cannot be pickled: {type(error).__name__}: {error}")
    restored = pickle.loads(data)
    if type(restored) is not type(layer) or repr(restored) != repr(layer):
        _fail(f"pickle round trip of {name} gave {restored!r}")
    if not (restored == layer and layer == restored) or restored != layer:
        _fail(f"pickle round trip of {name} gave a layer that does not compare equal to it")
    _same_kernels(layer, restored, inputs, f"pickle round trip of {name}")


# ------------------------------------------------------------------ entry points
def _selected(checks: Iterable[str] | None) -> tuple[str, ...]:
    chosen = CHECKS if checks is None else tuple(checks)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {CHECKS}")
    return chosen


def check_network(
    net: Layer,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    checks: Iterable[str] | None = None,
    monte_carlo: dict | None = None,
    layers: Sequence[Layer] = (),
) -> dict[str, object]:
    """Run the selected :data:`CHECKS` on a complete architecture ``net`` with inputs
    ``x1`` and ``x2`` (of the same per-example shape); the spec and pickle checks also on
    each of ``layers``. ``monte_carlo``: keyword arguments of :func:`check_monte_carlo`.

    Returns what each check measured, by check name.
    """
    chosen = _selected(checks)
    x1, x2 = _as_tensor(x1), _as_tensor(x2)
    report: dict[str, object] = {}
    if "kernels" in chosen:
        report["kernels"] = check_kernels(net, _joint(x1, x2))
    if "consistency" in chosen:
        report["consistency"] = check_consistency(net, x1, x2)
    if "fast_paths" in chosen:
        report["fast_paths"] = check_fast_paths(net, x1, x2)
    if "float32" in chosen:
        report["float32"] = check_float32(net, x1, x2)
    if "bad_inputs" in chosen:
        check_bad_inputs(net, x1, x2)
        report["bad_inputs"] = "refused"
    if "spec" in chosen:
        report["spec"] = [check_spec(layer) for layer in layers]
        check_spec(net, (x1, x2))
    if "pickle" in chosen:
        for layer in layers:
            check_pickle(layer)
        check_pickle(net, (x1, x2))
        report["pickle"] = "round trip"
    if "monte_carlo" in chosen:
        report["monte_carlo"] = check_monte_carlo(net, x1, x2, **(monte_carlo or {}))
    return report


def _default_before(input_shape: tuple[int, ...], width: int, W_std: float,
                    b_std: float | None) -> tuple[Layer, ...]:
    if len(input_shape) == 1:
        return (Linear(width, W_std=W_std, b_std=b_std),)
    conv = _CONVOLUTIONS[len(input_shape) - 1]
    return (conv(width, 3, padding="same", W_std=W_std, b_std=b_std),)


def _default_after(input_shape: tuple[int, ...], W_std: float,
                   b_std: float | None) -> tuple[Layer, ...]:
    readout = Linear(1, W_std=W_std, b_std=b_std)
    return (readout,) if len(input_shape) == 1 else (Flatten(), readout)


def _check_shape(input_shape) -> tuple[int, ...]:
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    input_shape = tuple(input_shape)
    if not 1 <= len(input_shape) <= 4:
        raise ValueError(f"input_shape must be (features,) or (C, *sizes) with 1 to 3 sizes, "
                         f"got {input_shape}")
    return input_shape


def check_layer(
    layer: Layer,
    input_shape: tuple[int, ...],
    *,
    before: Sequence[Layer] | None = None,
    after: Sequence[Layer] | None = None,
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    checks: Iterable[str] | None = None,
    monte_carlo: dict | None = None,
    W_std: float = 1.5,
    b_std: float | None = 0.1,
    side_inputs: SideInputsFunction | None = None,
) -> dict[str, object]:
    """Check ``layer`` in the network ``Sequential(*before, layer, *after)``.

    ``before`` defaults to one weighted layer of width 8 (``Linear``; for images a
    ``"same"`` 3 x 3 convolution with 8 channels), so that the layer's input is a centred
    Gaussian; ``after`` to a ``Linear`` read-out of one output (``Flatten`` first for
    images). Give them to embed a
    layer that needs more (``FanOut`` before a ``Parallel``, a ``FanIn`` after it,
    ``GlobalAvgPool`` after a pooling layer...). ``input_shape``: the per-example shape,
    ``(features,)`` or ``(C, *sizes)``. ``inputs``: ``(x1, x2)`` instead of
    :func:`example_inputs`. ``checks``: some of :data:`CHECKS` (``"maps"`` is ignored
    here). ``monte_carlo``: keyword arguments of :func:`check_monte_carlo`.
    ``side_inputs``: for a layer that needs masks or graphs, a function of a batch that
    returns them (:func:`example_masks`, :func:`example_graphs` or one of your own, see
    :class:`~widenets.layers.derived.DerivedSideInputs`); every check then runs with them.

    Returns what each check measured, by check name.
    """
    input_shape = _check_shape(input_shape)
    if not isinstance(layer, Layer):
        raise TypeError(f"layer must be a widenets Layer, got {type(layer).__name__}")
    if before is None:
        before = _default_before(input_shape, 8, W_std, b_std)
    if after is None:
        after = _default_after(input_shape, W_std, b_std)
    net: Layer = Sequential(*before, layer, *after)
    if side_inputs is not None:
        net = DerivedSideInputs(net, side_inputs)
    x1, x2 = example_inputs(input_shape) if inputs is None else inputs
    chosen = tuple(c for c in _selected(checks) if c != "maps")
    return check_network(net, x1, x2, checks=chosen, monte_carlo=monte_carlo, layers=(layer,))


def check_activation(
    activation: Activation,
    *,
    input_shape: tuple[int, ...] = (3,),
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    checks: Iterable[str] | None = None,
    monte_carlo: dict | None = None,
    W_std: float = 1.5,
    b_std: float | None = 0.1,
) -> dict[str, object]:
    """Check an activation: its maps (:func:`check_activation_maps`), and every check of
    :func:`check_network` on ``Linear -> activation -> Linear -> activation -> Linear``
    (for images ``(C, *sizes)``: two ``"same"`` 3 x 3 convolutions, ``Flatten`` and the
    ``Linear`` read-out), weighted layers with ``W_std`` and ``b_std``.

    Returns what each check measured, by check name.
    """
    input_shape = _check_shape(input_shape)
    if not isinstance(activation, Layer):
        raise TypeError(f"activation must be a widenets Layer, got {type(activation).__name__}")
    chosen = _selected(checks)
    first = _default_before(input_shape, 8, W_std, b_std)
    second = _default_before((8, *input_shape[1:]), 8, W_std, b_std)
    net = Sequential(*first, activation, *second, activation,
                     *_default_after(input_shape, W_std, b_std))
    x1, x2 = example_inputs(input_shape) if inputs is None else inputs
    report: dict[str, object] = {}
    if "maps" in chosen and isinstance(activation, Activation):
        report["maps"] = check_activation_maps(activation)
    report.update(check_network(net, x1, x2, checks=[c for c in chosen if c != "maps"],
                                monte_carlo=monte_carlo, layers=(activation,)))
    return report
