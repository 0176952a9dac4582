"""Empirical NTK and NNGP of any finite ``torch.nn.Module`` (via ``torch.func``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .inputs import as_input_pair


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


def empirical_nngp(model: nn.Module, x1: object, x2: object | None = None) -> torch.Tensor:
    """``f(x1) f(x2)^T / O``: the output inner product, averaged over the O outputs."""
    model = _check_model(model)
    t1, t2 = _model_inputs(model, x1, x2)
    with torch.no_grad():
        f1 = _as_outputs(model(t1))
        f2 = f1 if t2 is None else _as_outputs(model(t2))
    return f1 @ f2.T / f1.shape[1]


def _jacobians(model: nn.Module, x: torch.Tensor, params: dict, buffers: dict):
    """Per-example Jacobians ``{name: (N, O, *param.shape)}`` of the model's outputs."""

    def single(p, example):
        out = functional_call(model, (p, buffers), (example.unsqueeze(0),))
        return _as_outputs(out).squeeze(0)

    return vmap(jacrev(single), in_dims=(None, 0))(params, x)


def empirical_ntk(
    model: nn.Module,
    x1: object,
    x2: object | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    r"""The empirical NTK ``sum_p <df_o(x1)/dp, df_o(x2)/dp>``, averaged over outputs ``o``.

    Sums over all parameters with ``requires_grad``; buffers are used as they are.
    Jacobians are computed ``batch_size`` examples at a time (Jacobian contraction,
    ``torch.func.jacrev`` under ``vmap``). Returns ``(N1, N2)``, directly comparable
    to the infinite-width kernel ``net.kernel(x1, x2, get="ntk")``.
    """
    model = _check_model(model)
    t1, t2 = _model_inputs(model, x1, x2)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters: its NTK is zero")
    buffers = dict(model.named_buffers())
    second = t1 if t2 is None else t2
    out = torch.zeros(t1.shape[0], second.shape[0], dtype=t1.dtype, device=t1.device)
    batches2 = [(j, _jacobians(model, second[j : j + batch_size], params, buffers))
                for j in range(0, second.shape[0], batch_size)]
    batches1 = batches2 if t2 is None else (
        (i, _jacobians(model, t1[i : i + batch_size], params, buffers))
        for i in range(0, t1.shape[0], batch_size)
    )
    for i, jac1 in batches1:
        for j, jac2 in batches2:
            block = out[i : i + batch_size, j : j + batch_size]
            for name in params:
                a = jac1[name].flatten(2)
                b = jac2[name].flatten(2)
                block += torch.einsum("aop,bop->ab", a, b)
            block /= next(iter(jac1.values())).shape[1]
    return out
