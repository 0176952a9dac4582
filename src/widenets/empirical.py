"""Empirical NTK and NNGP of any finite ``torch.nn.Module`` (via ``torch.func``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .inputs import as_input_pair, check_positive_int


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _model_inputs(model: nn.Module, x1: object, x2: object | None):
    """Inputs as tensors on the model's device and dtype (NumPy data: float64)."""
    t1, t2 = as_input_pair(x1, x2)
    reference = next(iter(model.parameters()), None)
    if reference is not None and (t1.device != reference.device or t1.dtype != reference.dtype):
        if isinstance(x1, torch.Tensor) and t1.device != reference.device:
            raise ValueError(
                f"x1 is on {t1.device} but the model's parameters are on {reference.device}"
            )
        t1 = t1.to(dtype=reference.dtype, device=reference.device)
        t2 = None if t2 is None else t2.to(dtype=reference.dtype, device=reference.device)
    return t1, t2


def _as_outputs(out: torch.Tensor) -> torch.Tensor:
    """Model outputs as ``(N, O)``."""
    if out.ndim == 1:
        return out[:, None]
    if out.ndim != 2:
        raise ValueError(
            f"the model's output must be (N,) or (N, outputs), got shape {tuple(out.shape)}"
        )
    return out


OUTPUTS = ("mean", "full")
IMPLEMENTATIONS = ("auto", "jacobian", "ntk_vector")


def _check_choice(value: object, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _reduce_outputs(block: torch.Tensor, outputs: str) -> torch.Tensor:
    """``(N1, N2, O, O)`` as is (``full``), or the mean of its O diagonal blocks (``mean``)."""
    if outputs == "full":
        return block
    return torch.diagonal(block, dim1=2, dim2=3).mean(dim=2)


def _call(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs ``(N, O)`` at ``params``, with a clear error if it rejects ``x``."""
    try:
        out = functional_call(model, (params, buffers), (x,))
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"the model rejects inputs of shape {tuple(x.shape)}: {error}"
        ) from error
    return _as_outputs(out)


def _check_batch_norm_eval(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"empirical_ntk needs BatchNorm layers in eval mode (call model.eval()); "
                f"{name or 'the model'} is in training mode, where batch statistics couple "
                "the examples and the running statistics would be updated"
            )


def _buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers: a forward in training mode (BatchNorm running statistics)
    updates the copies, never the model."""
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def empirical_nngp(
    model: nn.Module, x1: object, x2: object | None = None, outputs: str = "mean"
) -> torch.Tensor:
    """The output inner products ``f_o(x1) f_o'(x2)``.

    ``outputs="full"``: ``(N1, N2, O, O)``; ``"mean"``: ``(N1, N2)``, the mean over the
    ``O`` outputs of ``f_o(x1) f_o(x2)``. Evaluated without gradients; the model is not
    changed.
    """
    model = _check_model(model)
    outputs = _check_choice(outputs, OUTPUTS, "outputs")
    t1, t2 = _model_inputs(model, x1, x2)
    params = dict(model.named_parameters())
    buffers = _buffer_copies(model)
    with torch.no_grad():
        f1 = _call(model, params, buffers, t1)
        f2 = f1 if t2 is None else _call(model, params, buffers, t2)
    if outputs == "mean":
        return f1 @ f2.T / f1.shape[1]
    return torch.einsum("ao,bp->abop", f1, f2)


def _jacobians(model: nn.Module, x: torch.Tensor, params: dict, buffers: dict):
    """Per-example Jacobians ``{name: (N, O, *param.shape)}`` of the model's outputs."""

    def single(p, example):
        return _call(model, p, buffers, example.unsqueeze(0)).squeeze(0)

    return vmap(jacrev(single), in_dims=(None, 0))(params, x)


def _jacobian_contraction(model, t1, t2, params, buffers, batch_size, outputs):
    """Per-example Jacobians contracted over the parameters: ``(N1, N2, O, O)``, or only
    the mean of the diagonal blocks ``(N1, N2)`` for ``outputs="mean"``."""
    equation = "aop,bop->ab" if outputs == "mean" else "aop,bqp->aboq"
    second = t1 if t2 is None else t2
    batches2 = [(j, _jacobians(model, second[j : j + batch_size], params, buffers))
                for j in range(0, second.shape[0], batch_size)]
    batches1 = batches2 if t2 is None else (
        (i, _jacobians(model, t1[i : i + batch_size], params, buffers))
        for i in range(0, t1.shape[0], batch_size)
    )
    blocks = {}
    for i, jac1 in batches1:
        for j, jac2 in batches2:
            blocks[i, j] = sum(
                torch.einsum(equation, jac1[name].flatten(2), jac2[name].flatten(2))
                for name in params
            )
            if outputs == "mean":
                blocks[i, j] /= next(iter(jac1.values())).shape[1]
    return _assemble(blocks, t1.shape[0], second.shape[0], batch_size)


def _ntk_vector_products(model, t1, t2, params, buffers, batch_size, outputs):
    """``(N1, N2, O, O)`` from NTK-vector products, without materialising Jacobians.

    For each batch of ``x2``, ``J(x2)^T v`` by a vjp for every basis vector ``v`` of its
    outputs, then ``J(x1) (J(x2)^T v)`` by a jvp (Novak et al. 2022, "Fast finite width
    neural tangent kernel": the NTK-vector products method).
    """
    second = t1 if t2 is None else t2
    blocks = {}
    for i in range(0, t1.shape[0], batch_size):
        rows = t1[i : i + batch_size]
        for j in range(0, second.shape[0], batch_size):
            cols = second[j : j + batch_size]
            out2, pullback = vjp(lambda p, x=cols: _call(model, p, buffers, x), params)
            n2, n_out = out2.shape

            def column(v, x=rows, pullback=pullback):
                (tangent,) = pullback(v)
                return jvp(lambda p: _call(model, p, buffers, x), (params,), (tangent,))[1]

            basis = torch.eye(n2 * n_out, dtype=out2.dtype, device=out2.device)
            products = vmap(column)(basis.reshape(n2 * n_out, n2, n_out))  # (n2 O, n1, O)
            block = products.reshape(n2, n_out, rows.shape[0], n_out).permute(2, 0, 3, 1)
            blocks[i, j] = _reduce_outputs(block, outputs)
    return _assemble(blocks, t1.shape[0], second.shape[0], batch_size)


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
) -> torch.Tensor:
    r"""The empirical NTK ``sum_p <df_o(x1)/dp, df_o'(x2)/dp>`` of any module.

    Sums over all parameters with ``requires_grad`` (frozen ones are left out); buffers
    (e.g. BatchNorm running statistics in eval mode) are used as they are. The model is
    not changed: parameters, buffers, mode and gradients stay as they were.

    Args:
        outputs: ``"full"``: the block kernel ``(N1, N2, O, O)`` with the cross terms
            between outputs; ``"mean"``: ``(N1, N2)``, the mean of the ``O`` diagonal
            blocks, directly comparable to ``net.kernel(x1, x2, get="ntk")``.
        implementation: ``"jacobian"`` (per-example Jacobians with ``torch.func.jacrev``
            under ``vmap``, contracted over the parameters), ``"ntk_vector"``
            (vjp then jvp, no Jacobian held) or ``"auto"`` (currently ``"jacobian"``).
            Both give the same numbers.
        batch_size: examples per block; memory is bounded by one block's Jacobians.

    BatchNorm layers must be in eval mode (a ``ValueError`` otherwise): in training mode
    their batch statistics couple the examples of a batch.
    """
    model = _check_model(model)
    outputs = _check_choice(outputs, OUTPUTS, "outputs")
    implementation = _check_choice(implementation, IMPLEMENTATIONS, "implementation")
    batch_size = check_positive_int(batch_size, "batch_size")
    t1, t2 = _model_inputs(model, x1, x2)
    _check_batch_norm_eval(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters: its NTK is zero")
    buffers = _buffer_copies(model)
    method = _ntk_vector_products if implementation == "ntk_vector" else _jacobian_contraction
    with torch.no_grad():
        return method(model, t1, t2, params, buffers, batch_size, outputs)
