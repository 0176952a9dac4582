"""Empirical NTK and NNGP of any finite ``torch.nn.Module`` (via ``torch.func``).

Thread safety: ``torch.func.functional_call`` swaps the tensors it is given into the
module for the duration of the call, and the structured implementation registers forward
hooks on the layers. Done on the user's module, both are seen by every other thread using
it (wrong kernels, parameters left as plain tensors). So every evaluation here runs on
:func:`private_copy`, a copy of the module objects that shares the parameter and buffer
tensors: the user's module is only read. ``torch.func.jvp`` itself is not thread-safe
(see :data:`FORWARD_MODE_LOCK`), so the forward-mode products hold a lock.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .engine import check_progress, progress_bar, reads_channels_last, wider_dtype_hint
from .inputs import all_finite, as_input_pair, check_positive_int
from .structured_ntk import (
    AffineLayer,
    factored_layers,
    find_affine_layers,
    layer_ntk,
    output_pairs,
    pair_costs,
    structured_parts,
    with_forward_hooks,
)

#: Held around every ``torch.func.jvp`` of widenets. torch keeps forward-mode AD state
#: process-wide (``torch.autograd.forward_ad``'s current dual level and functorch's
#: ``JVP_NESTING``, with levels exited in the order they were entered), so jvps running in
#: two threads at once fail ("no level exists") or lose their tangents. Re-entrant: a jvp
#: may evaluate a model that itself uses one (the NTK of a linearized model).
FORWARD_MODE_LOCK = threading.RLock()


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


#: Container types whose empty instances :func:`private_copy` replaces by new empty ones.
_PLAIN_CONTAINERS = (dict, OrderedDict, list, set)


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module objects that shares its tensors.

    Every submodule is copied (its own parameter, buffer and submodule dicts, hook dicts
    and other attributes, with ``copy.deepcopy``), but the parameters, buffers and tensor
    attributes are the model's own objects, not copies. ``functional_call`` and forward
    hooks can then be used on the copy without any effect on ``model``, which other
    threads may be evaluating at the same time. A full ``deepcopy`` gets the copy right
    where a hand-made one would not: hooks that are methods of a module, and modules or
    tensor lists held outside the registered children (an RNN's flat weights), point into
    the copy. The cost grows with the number of modules, not of parameters: about 0.1 ms
    for a three-layer MLP of any width.

    Raises ``TypeError`` if the model holds an attribute that cannot be deep-copied.
    """
    # deepcopy's memo, filled in advance: the tensors map to themselves (shared), the
    # parameter and buffer dicts to shallow copies, empty containers (most hook dicts) to
    # new empty ones, so deepcopy only walks what is left.
    memo: dict[int, object] = {}
    pending, seen = [model], set()
    while pending:  # also through modules held as plain attributes (TaylorExpansion)
        module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = vars(module)
        for value in (*module._parameters.values(), *module._buffers.values(),
                      *module._modules.values(), *state.values()):
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
            elif isinstance(value, nn.Module):
                pending.append(value)
            elif type(value) in _PLAIN_CONTAINERS and not value:
                memo[id(value)] = type(value)()
        for table in (module._parameters, module._buffers):
            memo[id(table)] = copy.copy(table)
    try:
        return copy.deepcopy(model, memo)
    except (TypeError, RuntimeError, copy.Error) as error:
        raise TypeError(
            f"model cannot be copied ({error}): the model is evaluated on a private copy "
            "of its modules (sharing its tensors) so that it is never changed, even while "
            "other threads use it; make its attributes deep-copyable"
        ) from error


def _model_inputs(model: nn.Module, x1: object, x2: object | None):
    """Inputs as tensors on the model's device and dtype (NumPy data: float64). The
    channels-last warning only for widenets twins that read channels first: any other
    module reads its inputs its own way."""
    layer = getattr(model, "widenets_layer", None)
    warn = layer is not None and not reads_channels_last(layer)
    t1, t2 = as_input_pair(x1, x2, layout_warning=warn)
    reference = next(iter(model.parameters()), None)
    if reference is not None and (t1.device != reference.device or t1.dtype != reference.dtype):
        if isinstance(x1, torch.Tensor) and t1.device != reference.device:
            raise ValueError(
                f"x1 is on {t1.device} but the model's parameters are on {reference.device}"
            )
        t1 = t1.to(dtype=reference.dtype, device=reference.device)
        t2 = None if t2 is None else t2.to(dtype=reference.dtype, device=reference.device)
    return t1, t2


def _has_recurrent_module(model: nn.Module) -> bool:
    """Whether ``model`` holds a ``torch.nn`` recurrent module (``nn.RNN``, ``nn.LSTM``,
    ``nn.GRU``): their fused kernels fail under ``vmap`` over examples, which the
    ``"jacobian"`` and ``"structured"`` implementations use."""
    return any(isinstance(module, nn.RNNBase) for module in model.modules())


def _as_outputs(out: object, n: int) -> torch.Tensor:
    """The model's outputs for ``n`` examples as ``(N, O)``, or a clear error for anything
    but a real floating tensor ``(n,)`` or ``(n, outputs)``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model must return a tensor (N,) or (N, outputs), got {type(out).__name__}; "
            "wrap it to return the one output whose kernel you want"
        )
    if not out.is_floating_point():
        raise TypeError(f"the model's output must be a real floating tensor, got {out.dtype}")
    if out.ndim not in (1, 2):
        raise ValueError(
            f"the model's output must be (N,) or (N, outputs), got shape {tuple(out.shape)}"
        )
    if out.shape[0] != n:
        raise ValueError(
            f"the model's output must have one row per input example: got shape "
            f"{tuple(out.shape)} for {n} examples"
        )
    return out[:, None] if out.ndim == 1 else out


def _check_finite(kernel: torch.Tensor, name: str) -> torch.Tensor:
    """``kernel``, or a ``ValueError`` if an entry is inf or NaN (one reduction): products
    of large inputs, outputs or Jacobians overflow silently otherwise."""
    if not all_finite(kernel):
        raise ValueError(
            f"the empirical {name} overflows {kernel.dtype}: it has inf or NaN entries "
            f"(inputs, outputs or gradients too large for {kernel.dtype}, or a model that "
            "returns inf or NaN); rescale the inputs, e.g. standardize them"
            f"{wider_dtype_hint(kernel.dtype)}"
        )
    return kernel


OUTPUTS = ("mean", "full")
IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vector", "structured")


def _check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _reduce_outputs(block: torch.Tensor, outputs: str) -> torch.Tensor:
    """``(N1, N2, O, O)`` as is (``full``), or the sum of its O diagonal blocks (``mean``;
    :func:`empirical_ntk` divides by ``O`` once at the end)."""
    if outputs == "full":
        return block
    return torch.diagonal(block, dim1=2, dim2=3).sum(dim=2)


def _call(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs ``(N, O)`` at ``params``, with a clear error if it rejects ``x``."""
    try:
        out = functional_call(model, (params, buffers), (x,))
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"the model rejects inputs of shape {tuple(x.shape)}: {error}"
        ) from error
    return _as_outputs(out, x.shape[0])


def _check_batch_norm_eval(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"empirical_ntk needs BatchNorm layers in eval mode (call model.eval()); "
                f"{name or 'the model'} is in training mode, where batch statistics couple "
                "the examples and the running statistics would be updated"
            )


def _check_no_training_dropout(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p:
            raise ValueError(
                f"empirical_ntk differentiates each example in its own forward pass, so "
                f"{name or 'the model'}'s training-mode dropout would draw other masks in "
                "each; call model.eval() for the network without dropout, or use "
                "widenets.empirical.one_pass_ntk, which keeps one forward pass's masks"
            )


def one_pass_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The empirical NTK ``(N1, N2)`` (mean over outputs) of ``model`` from the Jacobian of
    one forward pass of each whole batch, so that the noise drawn in a pass (training-mode
    dropout masks, one per example) is the same in every derivative: the kernel of a
    network trained with dropout (``x2`` given: a second pass with its own masks). Holds
    the full Jacobians in memory: for Monte Carlo estimates on small batches."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        def outputs(parameters: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(model, parameters, (x,)).reshape(x.shape[0], -1)

        parts = torch.func.jacrev(outputs)(params)
        return torch.cat([part.reshape(x.shape[0], -1, part[0, 0].numel())
                          for part in parts.values()], dim=2)

    first = jacobian(x1)
    second = first if x2 is None else jacobian(x2)
    return torch.einsum("aoq,boq->ab", first, second) / first.shape[1]


def _buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers: a forward in training mode (BatchNorm running statistics)
    updates the copies, never the model."""
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def empirical_nngp(
    model: nn.Module, x1: object, x2: object | None = None, outputs: str = "mean"
) -> torch.Tensor:
    """The output inner products ``f_o(x1) f_o'(x2)``.

    ``outputs="full"``: ``(N1, N2, O, O)``; ``"mean"``: ``(N1, N2)``, the mean over the
    ``O`` outputs of ``f_o(x1) f_o(x2)``. Evaluated without gradients on a
    private copy (``private_copy``) of the model: the model is never changed, and several threads
    may call this (and :func:`empirical_ntk`) on one model at the same time.

    Raises ``TypeError`` if the model does not return a real floating tensor, and
    ``ValueError`` if its output is not ``(N,)`` or ``(N, outputs)`` or if the kernel
    overflows the dtype.
    """
    model = _check_model(model)
    outputs = _check_choice(outputs, OUTPUTS, "outputs")
    t1, t2 = _model_inputs(model, x1, x2)
    model = private_copy(model)
    params = dict(model.named_parameters())
    buffers = _buffer_copies(model)
    with torch.no_grad():
        f1 = _call(model, params, buffers, t1)
        f2 = f1 if t2 is None else _call(model, params, buffers, t2)
    if outputs == "mean":
        kernel = f1 @ f2.T / f1.shape[1]
    else:
        kernel = torch.einsum("ao,bp->abop", f1, f2)
    return _check_finite(kernel, "NNGP")


def _jacobians(model: nn.Module, x: torch.Tensor, params: dict, buffers: dict):
    """Per-example Jacobians ``{name: (N, O, *param.shape)}`` of the model's outputs."""

    def single(p, example):
        return _call(model, p, buffers, example.unsqueeze(0)).squeeze(0)

    return vmap(jacrev(single), in_dims=(None, 0))(params, x)


#: Bytes of per-batch Jacobians (or cotangents) of ``x2`` kept for reuse across the
#: batches of ``x1``; batches beyond it are recomputed for every batch of ``x1``, so memory
#: stays bounded for large inputs and large models.
PARTS_CACHE_BYTES = 2**30


def _nbytes(parts: object) -> int:
    """Bytes held by the tensors in nested dicts, tuples and lists."""
    if isinstance(parts, torch.Tensor):
        return parts.numel() * parts.element_size()
    if isinstance(parts, dict):
        return sum(_nbytes(value) for value in parts.values())
    if isinstance(parts, (tuple, list)):
        return sum(_nbytes(value) for value in parts)
    return 0


def _pairwise_blocks(t1, t2, batch_size, parts_of, contract, outputs,
                     progress: bool | None = False) -> torch.Tensor:
    """``(N1, N2, ...)`` from per-batch parts: ``parts_of(batch)``, then
    ``contract(parts1, parts2)`` per pair of batches (a tqdm bar over the contracted
    blocks as :func:`empirical_ntk`'s ``progress`` says).

    The parts of ``x2``'s batches are kept while they fit in ``PARTS_CACHE_BYTES``
    and recomputed otherwise. With ``t2=None`` only the upper triangle of blocks is
    contracted; the rest are their transposes.
    """
    second = t1 if t2 is None else t2
    cache: dict[int, object] = {}
    cached_bytes = 0

    def column_parts(start: int):
        nonlocal cached_bytes
        if start in cache:
            return cache[start]
        value = parts_of(second[start : start + batch_size])
        size = _nbytes(value)
        if cached_bytes + size <= PARTS_CACHE_BYTES:
            cache[start], cached_bytes = value, cached_bytes + size
        return value

    blocks: dict[tuple[int, int], torch.Tensor] = {}
    n_rows, n_cols = -(-t1.shape[0] // batch_size), -(-second.shape[0] // batch_size)
    total = n_rows * (n_rows + 1) // 2 if t2 is None else n_rows * n_cols
    with progress_bar(total, progress, "empirical NTK", "block") as bar:
        for i in range(0, t1.shape[0], batch_size):
            parts1 = column_parts(i) if t2 is None else parts_of(t1[i : i + batch_size])
            for j in range(0, second.shape[0], batch_size):
                if t2 is None and j < i:
                    mirror = blocks[j, i].transpose(0, 1)
                    blocks[i, j] = mirror if outputs == "mean" else mirror.transpose(2, 3)
                else:
                    parts2 = parts1 if t2 is None and j == i else column_parts(j)
                    blocks[i, j] = contract(parts1, parts2)
                    bar.update(1)
    return _assemble(blocks, t1.shape[0], second.shape[0], batch_size)


def _contract_jacobians(jac1: dict, jac2: dict, outputs: str) -> torch.Tensor:
    """``sum_p J1[a, o, p] J2[b, o', p]`` over parameter Jacobians ``{name: (n, O, ...)}``:
    ``(n1, n2, O, O)``, or only its diagonal outputs summed ``(n1, n2)`` for ``mean``.
    A scalar parameter's Jacobian ``(n, O)`` counts as ``(n, O, 1)``."""
    equation = "aop,bop->ab" if outputs == "mean" else "aop,bqp->aboq"

    def flat(jac: torch.Tensor) -> torch.Tensor:
        return jac.reshape(*jac.shape[:2], -1)

    # a tensor, not 0: a model has trainable parameters (checked)
    return cast(torch.Tensor, sum(
        torch.einsum(equation, flat(jac1[name]), flat(jac2[name])) for name in jac1))


def _jacobian_contraction(model, t1, t2, params, buffers, batch_size, outputs,
                          progress: bool | None = False):
    """Per-example Jacobians contracted over the parameters: ``(N1, N2, O, O)``, or only
    the sum of the diagonal blocks ``(N1, N2)`` for ``outputs="mean"``."""

    def contract(jac1, jac2):
        return _contract_jacobians(jac1, jac2, outputs)

    return _pairwise_blocks(t1, t2, batch_size,
                            lambda x: _jacobians(model, x, params, buffers), contract, outputs,
                            progress)


def _probe(model, t1, params, buffers) -> tuple[list[AffineLayer], int]:
    """The layers the structured implementation factors (see :mod:`.structured_ntk`) and
    the number of outputs, from one forward pass of (up to) two examples: two, so that an
    output whose batch size is not the input's is caught here."""
    n_out = []

    def probe(hooks):
        n_out.append(with_forward_hooks(
            model, hooks, lambda: _call(model, params, buffers, t1[:2])).shape[1])

    layers = find_affine_layers(model, params, probe)
    return layers, n_out[0]


def estimated_costs(
    layers: list[AffineLayer], params: dict, n1: int, n2: int | None, n_out: int,
    outputs: str,
) -> dict[str, float]:
    """Rough flop counts of each implementation (Novak et al. 2022, Table 1).

    With ``FP`` the flops of one example's forward pass (dense and convolutional layers:
    ``C F P``; other parameters: their count), ``Q`` the trainable parameters, ``O`` the
    outputs, ``k = O`` (mean) or ``O^2`` (full) and ``pairs = N1 N2``:
    Jacobian contraction ``3 N O FP + pairs k Q``; NTK-vector products
    ``4 pairs O FP``; structured, over the layers where factoring is cheaper,
    ``3 N O FP + pairs (k Q_rest + sum over those layers of P^2 (F + k C))``. Without
    such layers the structured form is the Jacobian contraction and is not offered.
    """
    def parameter_count(names) -> int:
        return sum(params[name].numel() for name in names)

    def layer_parameters(chosen):
        return {p for layer in chosen for p in (layer.weight, layer.bias) if p}

    total = parameter_count(params)
    forward = total - parameter_count(layer_parameters(layers)) + sum(
        layer.channels * layer.features * layer.positions for layer in layers)
    examples, pairs = n1 + (n2 or 0), n1 * (n2 or n1)
    k = output_pairs(outputs, n_out)
    reverse = 3 * examples * n_out * forward
    costs: dict[str, float] = {
        "jacobian": reverse + pairs * k * total,
        "ntk_vector": 4 * pairs * n_out * forward,
    }
    factored = factored_layers(layers, outputs, n_out)
    if factored:
        rest = total - parameter_count(layer_parameters(factored))
        per_layer = sum(pair_costs(layer, k)[0] for layer in factored)
        costs["structured"] = reverse + pairs * (k * rest + per_layer)
    return costs


def _structured_contraction(model, t1, t2, params, buffers, batch_size, outputs, layers,
                            progress: bool | None = False):
    """Jacobians for the other parameters, per-layer factored contractions for ``layers``
    (Novak et al. 2022, structured derivatives; see :mod:`.structured_ntk`)."""

    def parts_of(x):
        return structured_parts(model, lambda p, e: _call(model, p, buffers, e), x, params,
                                layers)

    def contract(parts1, parts2):
        (rest1, layer_parts1), (rest2, layer_parts2) = parts1, parts2
        block = _contract_jacobians(rest1, rest2, outputs) if rest1 else 0.0
        for layer in layers:
            block = block + layer_ntk(layer, layer_parts1[layer.name],
                                      layer_parts2[layer.name], outputs)
        return block

    return _pairwise_blocks(t1, t2, batch_size, parts_of, contract, outputs, progress)


def _ntk_vector_products(model, t1, t2, params, buffers, batch_size, outputs,
                         progress: bool | None = False):
    """``(N1, N2, O, O)`` from NTK-vector products, without materialising Jacobians.

    For each batch of ``x2``, ``J(x2)^T v`` by a vjp for every basis vector ``v`` of its
    outputs, then ``J(x1) (J(x2)^T v)`` by a jvp (Novak et al. 2022, "Fast finite width
    neural tangent kernel": the NTK-vector products method).
    """

    def block(rows, cols):
        out2, pullback = vjp(lambda p: _call(model, p, buffers, cols), params)
        n2, n_out = out2.shape

        def column(v):
            (tangent,) = pullback(v)
            return jvp(lambda p: _call(model, p, buffers, rows), (params,), (tangent,))[1]

        basis = torch.eye(n2 * n_out, dtype=out2.dtype, device=out2.device)
        with FORWARD_MODE_LOCK:
            products = vmap(column)(basis.reshape(n2 * n_out, n2, n_out))  # (n2 O, n1, O)
        full = products.reshape(n2, n_out, rows.shape[0], n_out).permute(2, 0, 3, 1)
        return _reduce_outputs(full, outputs)

    return _pairwise_blocks(t1, t2, batch_size, lambda x: x, block, outputs, progress)


def _assemble(blocks: dict, n1: int, n2: int, batch_size: int) -> torch.Tensor:
    """One ``(N1, N2, ...)`` tensor from blocks keyed by their first row and column."""
    rows = [torch.cat([blocks[i, j] for j in range(0, n2, batch_size)], dim=1)
            for i in range(0, n1, batch_size)]
    return torch.cat(rows, dim=0)


def empirical_ntk(
    model: nn.Module,
    x1: object,
    x2: object | None = None,
    outputs: str = "mean",
    implementation: str = "auto",
    batch_size: int = 64,
    progress: bool | None = None,
) -> torch.Tensor:
    r"""The empirical NTK ``sum_p <df_o(x1)/dp, df_o'(x2)/dp>`` of any module.

    Sums over all parameters with ``requires_grad`` (frozen ones are left out); buffers
    (e.g. BatchNorm running statistics in eval mode) are used as they are. The model is
    not changed: parameters, buffers, mode and gradients stay as they were.

    Thread-safe: the model is only read. ``torch.func.functional_call`` and the forward
    hooks of the structured implementation work on a private copy (``private_copy``) of its modules
    (sharing its tensors, made once per call), so several threads may compute kernels of
    one model at the same time, and nothing is left on it.

    Args:
        outputs: ``"full"``: the block kernel ``(N1, N2, O, O)`` with the cross terms
            between outputs; ``"mean"``: ``(N1, N2)``, the mean of the ``O`` diagonal
            blocks, directly comparable to ``net.kernel(x1, x2, get="ntk")``.
        implementation: ``"jacobian"`` (per-example Jacobians with ``torch.func.jacrev``
            under ``vmap``, contracted over the parameters), ``"ntk_vector"``
            (vjp then jvp, no Jacobian held), ``"structured"`` (dense and convolutional
            layers contracted per layer from their output cotangents and inputs, see
            ``widenets.structured_ntk``) or ``"auto"``: the cheapest by the flop
            counts of ``estimated_costs`` (``"ntk_vector"`` for a model with a
            ``torch.nn`` recurrent module, whose fused kernels fail under ``vmap`` over
            examples). All give the same numbers.
        batch_size: examples per block. The Jacobians (or cotangents) of ``x2``'s
            blocks are kept up to ``PARTS_CACHE_BYTES`` (1 GiB) and recomputed
            beyond, so memory stays bounded; with ``x2=None`` only the upper triangle
            of blocks is contracted.
        progress: a tqdm bar over the contracted blocks on stderr: ``True`` always,
            ``False`` never, ``None`` (default) only for a call of several blocks that
            is still running after 2 seconds.

    BatchNorm layers must be in eval mode (a ``ValueError`` otherwise): in training mode
    their batch statistics couple the examples of a batch. Raises ``TypeError`` if the
    model does not return a real floating tensor, and ``ValueError`` if its output is not
    ``(N,)`` or ``(N, outputs)`` or if the kernel overflows the dtype (inf or NaN: e.g.
    inputs of order 1e200 in float64).
    """
    model = _check_model(model)
    outputs = _check_choice(outputs, OUTPUTS, "outputs")
    implementation = _check_choice(implementation, IMPLEMENTATIONS, "implementation")
    batch_size = check_positive_int(batch_size, "batch_size")
    progress = check_progress(progress)
    t1, t2 = _model_inputs(model, x1, x2)
    _check_batch_norm_eval(model)
    _check_no_training_dropout(model)
    model = private_copy(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters: its NTK is zero")
    buffers = _buffer_copies(model)
    layers, n_out = _probe(model, t1, params, buffers)
    if implementation == "auto" and _has_recurrent_module(model):
        implementation = "ntk_vector"  # torch's recurrent modules do not run per example
    if implementation == "auto":
        costs = estimated_costs(layers, params, t1.shape[0], None if t2 is None else t2.shape[0],
                                n_out, outputs)
        implementation = min(costs, key=costs.__getitem__)
    factored = factored_layers(layers, outputs, n_out)
    arguments = (model, t1, t2, params, buffers, batch_size, outputs)
    with torch.no_grad():
        if implementation == "structured" and factored:
            kernel = _structured_contraction(*arguments, factored, progress)
        elif implementation == "ntk_vector":
            kernel = _ntk_vector_products(*arguments, progress)
        else:
            kernel = _jacobian_contraction(*arguments, progress)
    # "mean": every implementation sums the O diagonal blocks; divide once here.
    return _check_finite(kernel / n_out if outputs == "mean" else kernel, "NTK")
