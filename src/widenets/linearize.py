"""Linearized (and second-order) Taylor expansions of a model in its parameters.

Lee et al. (2019), "Wide neural networks of any depth evolve as linear models under gradient
descent" (NeurIPS): as the width grows, training a network by gradient descent stays close to
training its first-order Taylor expansion around the initial parameters ``w0``,

    f_lin(x; w) = f(x; w0) + J(x; w0) (w - w0),     J = df/dw at w0.

:func:`linearize` builds that expansion as a trainable ``torch.nn.Module``;
:func:`taylor_expand` also gives the second-order one,

    f_quad(x; w) = f_lin(x; w) + 1/2 d^2f(x; w0)[w - w0, w - w0].

Both are evaluated with (nested) ``torch.func.jvp`` over ``torch.func.functional_call``, so no
Jacobian or Hessian is ever materialised.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_map

from .empirical import FORWARD_MODE_LOCK

DEGREES = (1, 2)


def _check_second_order(model: nn.Module) -> None:
    """Refuse layers whose nested forward-mode derivatives torch gets wrong.

    torch's forward-over-forward AD of ``layer_norm``, ``instance_norm`` and ``batch_norm``
    with batch statistics gives wrong second derivatives (checked against finite differences
    with torch 2.13); ``batch_norm`` with running statistics (eval mode) is right.
    """
    for name, layer in model.named_modules():
        batch_stats = isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
            layer.training or layer.running_mean is None
        )
        if batch_stats or isinstance(layer, (nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
            raise ValueError(
                f"degree=2 does not support {type(layer).__name__} layers with batch or "
                f"per-example statistics ({name or 'the model'}): torch's nested forward-mode "
                "derivatives of these normalizations are wrong; use degree=1, or BatchNorm "
                "in eval mode"
            )


class TaylorExpansion(nn.Module):
    """The Taylor expansion of degree 1 or 2 of a model around its parameters ``w0``.

    Build it with :func:`linearize` or :func:`taylor_expand`. Its trainable parameters
    ``params`` (an ``nn.ParameterList``, names in ``param_names``) start at a copy of the
    model's trainable parameters ``w0``; with ``delta = params - w0``,

        degree 1:  f(x; w0) + J(x; w0) delta
        degree 2:  f(x; w0) + J(x; w0) delta + 1/2 d^2f(x; w0)[delta, delta]

    (Lee et al. 2019). ``w0``, the frozen parameters (``requires_grad=False``) and the buffers
    are buffers of this module: they never change, and ``.to()`` moves them with ``params``.

    The expansion evaluates a deep copy of the model taken by the constructor, so later
    changes to the model (training, ``.eval()``) do not move the expansion point, and the
    model itself is never modified. The copy keeps the model's training mode at that time;
    ``train()``/``eval()`` on this module do not change the expanded function. The buffers are
    used as they are: each forward passes copies of them, so a BatchNorm in training mode
    uses batch statistics but leaves the stored running statistics unchanged. Put BatchNorm
    layers in eval mode before expanding for a function of the parameters alone.

    Thread-safe: several threads may evaluate (and differentiate) one expansion at the
    same time. Each forward swaps the tensors into the private copy with
    ``functional_call`` and evaluates ``torch.func.jvp``, whose forward-mode state torch
    keeps process-wide; both happen under ``widenets.empirical.FORWARD_MODE_LOCK``, so
    concurrent forwards (of any expansion) run one at a time; their backward passes do not.
    """

    def __init__(self, model: nn.Module, degree: int = 1) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(degree, bool) or degree not in DEGREES:
            raise ValueError(f"degree must be one of {DEGREES}, got {degree!r}")
        if degree == 2:
            _check_second_order(model)
        module = copy.deepcopy(model)
        for p in module.parameters():
            p.grad = None
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True) to expand")
        frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
        buffers = dict(module.named_buffers())

        self.degree = degree
        self.param_names = tuple(trainable)
        self._frozen_names = tuple(frozen)
        self._buffer_names = tuple(buffers)
        self.params = nn.ParameterList(p.detach().clone() for p in trainable.values())
        for i, p in enumerate(trainable.values()):
            self.register_buffer(f"w0_{i}", p.detach())
        for i, p in enumerate(frozen.values()):
            self.register_buffer(f"frozen_{i}", p.detach())
        for i, b in enumerate(buffers.values()):
            self.register_buffer(f"buffer_{i}", b.detach())
        # Not registered as a submodule: its tensors are replaced in every call, and its own
        # parameters must not appear in self.parameters().
        self.__dict__["_module"] = module

    def expansion_point(self) -> dict[str, torch.Tensor]:
        """``w0``: the model's trainable parameters at expansion time, by name."""
        return {n: getattr(self, f"w0_{i}") for i, n in enumerate(self.param_names)}

    def _constants(self) -> dict[str, torch.Tensor]:
        """Frozen parameters, and fresh copies of the buffers (a forward may update those)."""
        frozen = {n: getattr(self, f"frozen_{i}") for i, n in enumerate(self._frozen_names)}
        buffers = {
            n: getattr(self, f"buffer_{i}").clone() for i, n in enumerate(self._buffer_names)
        }
        return {**frozen, **buffers}

    def forward(self, *args, **kwargs):
        w0 = self.expansion_point()
        delta = {n: p - w0[n] for n, p in zip(self.param_names, self.params)}

        def f(params):
            # The buffer copies are made inside the transformed function: torch.func forbids
            # in-place updates (training-mode BatchNorm) of tensors captured from outside.
            return functional_call(self._module, {**params, **self._constants()}, args, kwargs)

        def first_order(params):
            return jvp(f, (params,), (delta,))

        with FORWARD_MODE_LOCK:
            if self.degree == 1:
                out, d1 = first_order(w0)
                return tree_map(torch.add, out, d1)
            # Differentiating (f, J delta) along delta gives (J delta, d^2f[delta, delta]).
            (out, d1), (_, d2) = jvp(first_order, (w0,), (delta,))
        return tree_map(lambda o, a, b: o + a + 0.5 * b, out, d1, d2)

    def extra_repr(self) -> str:
        return f"degree={self.degree}, model={type(self._module).__name__}"


def taylor_expand(model: nn.Module, degree: int = 1) -> TaylorExpansion:
    """The Taylor expansion of ``model`` in its parameters around their current values ``w0``.

    ``degree=1``: ``f(x; w0) + J(x; w0)(w - w0)`` (same as :func:`linearize`);
    ``degree=2`` adds ``1/2 d^2f(x; w0)[w - w0, w - w0]``. The result is a trainable module
    whose parameters ``w`` start at a copy of ``w0``; train it with any torch optimizer.
    Evaluated with nested ``torch.func.jvp``, without materialised Jacobians (Lee et al.
    2019). The model is deep-copied and left unchanged; see :class:`TaylorExpansion`.

    Raises ``TypeError`` if ``model`` is not an ``nn.Module``, ``ValueError`` if ``degree`` is
    not 1 or 2 or if the model has no trainable parameters. ``degree=2`` refuses LayerNorm,
    InstanceNorm and BatchNorm using batch statistics, whose nested forward-mode derivatives
    torch computes wrongly (normalizations written out of elementary ops are fine).
    """
    return TaylorExpansion(model, degree)


def linearize(model: nn.Module) -> TaylorExpansion:
    """The linearized model ``f(x; w0) + J(x; w0)(w - w0)`` of Lee et al. (2019).

    "Wide neural networks of any depth evolve as linear models under gradient descent":
    ``w0`` are the model's current trainable parameters, ``J`` its Jacobian there. Returns a
    trainable ``nn.Module`` whose parameters ``w`` start at a copy of ``w0`` (so at first it
    computes exactly ``model(x)``); train it with any torch optimizer. Computed with
    ``torch.func.jvp`` over ``torch.func.functional_call``, never materialising ``J``. The
    model is deep-copied and left unchanged: later changes to it do not move ``w0``.
    Frozen parameters and buffers stay fixed. Safe to call from several threads on one
    model, and the result may be evaluated from several threads at once (see
    :class:`TaylorExpansion`).
    """
    return TaylorExpansion(model, 1)
