r"""Multi-head self-attention: infinite-width kernel rule and finite twin side by side.

References: Hron, Bahri, Sohl-Dickstein and Novak (2020), "Infinite attention: NNGP and
NTK for deep attention networks" (ICML), and Neural Tangents' ``GlobalSelfAttention``
(``neural_tangents/_src/stax/linear.py``), whose conventions and numbers this layer
reproduces. The notation below is ours.

Tokens. An input ``(N, C, L)`` has ``P = L`` tokens; an image ``(N, C, H, W)`` has
``P = H W`` tokens in row-major order (attention runs over all pixels jointly). ``K(x, s;
y, t)`` is the input's NNGP covariance (per channel) between token ``s`` of input ``x``
and token ``t`` of input ``y``, ``T`` the NTK, and ``K_x(s, s') = K(x, s; x, s')`` the
covariance of one input with itself.

Finite twin (NTK parameterization, all weights standard normal). Per head ``h``:
keys ``k = x W_K / sqrt(C)``, queries ``q = x W_Q / sqrt(C)`` (with ``linear_scaling``
one matrix serves both, ``q = k``), values ``v = x W_V / sqrt(C)``, logits
``QK q_s . k_s' / n_key`` (``linear_scaling``) or ``QK q_s . k_s' / sqrt(n_key)``,
weights ``G = f(logits)`` (``f`` row-wise softmax over keys, or elementwise identity,
abs, relu), head output ``G v``; the layer output is the concatenation of the heads times
``W_out``, times ``OV / sqrt(n_heads n_val)``, plus ``b_std b``. Only the products
``QK = W_query_std W_key_std`` and ``OV = W_out_std W_value_std`` matter.

Kernel, ``linear_scaling=True``. ``q_s . k_s' / n_key`` converges to the constant
``K_x(s, s')`` (tying keys and queries keeps it from vanishing), so the attention weights
become deterministic, ``G_x = f(QK K_x)``, and the layer is linear in the values::

    K'(x,s; y,t) = OV^2 sum_{s',t'} G_x(s,s') K(x,s'; y,t') G_y(t,t') + b_std^2
    T'(x,s; y,t) = OV^2 sum_{s',t'} G_x(s,s') [T + 2 K](x,s'; y,t') G_y(t,t') + b_std^2

(``2 K``: the gradients of the value and output weights; the key weights add nothing in
the limit, and no gradient flows through ``G``).

Kernel, ``linear_scaling=False``: only ``attention="identity"`` has a closed form. With
``S_AB(x,y) = sum_{s',t'} A(x,s'; y,t') B(x,s'; y,t')``::

    K' = (QK OV)^2 S_KK K + b_std^2
    T' = (QK OV)^2 [2 S_KT K + S_KK (T + 4 K)] + b_std^2

The other mechanisms raise a ``ValueError`` at construction: estimate their kernel with
``wn.monte_carlo_kernel`` of the finite twin instead.

Positional embeddings: one trainable embedding ``E`` per twin, shared by all inputs, with
covariance ``C_E(s, s') = W_pos_emb_std^2 R(s, s')`` where ``R`` is the identity
(``pos_emb_decay=None``) or ``pos_emb_decay(d)`` of the token distances ``d(s, s') =
sum over positional axes |s_i - s'_i|^p`` (``p = pos_emb_p_norm``). ``"sum"`` adds ``E``
(``C`` channels) to the input of the keys and queries, so their covariance becomes
``K_x + C_E``; ``"concat"`` appends it, and the key/query covariance becomes ``(1 - f) K_x
+ f C_E`` with ``f = pos_emb_fraction``, the share of the attention input's channels that
are embedding (Neural Tangents' concat is ``f = n_pos_emb / (C + n_pos_emb)``, ``1/2`` by
default; the twin here gives the two parts the weights ``sqrt(1 - f)`` and ``sqrt(f)``
so that any ``f`` is exact). Write ``A = w_in K + w_E C_E`` for that mixture
(``w_in, w_E = 1, 1`` for ``"sum"``, ``1 - f, f`` for ``"concat"``). With
``val_pos_emb`` the values see the embedding too, and ``A`` replaces ``K`` in the value
path (for same- and cross-input pairs alike: the embedding is shared by all inputs),
and ``w_in T + w_E C_E`` replaces ``T`` (the embedding is a trained parameter), as in
Neural Tangents; without it only the attention weights change.

Causal attention (``causal=True``, not in Neural Tangents): query ``s`` sees only keys
``s' <= s`` (row-major order for images); masked weights are 0 and the softmax is taken
over the allowed keys. The same restriction applies in the formulas (and to the sums
``S`` of the ``linear_scaling=False`` case, which become sums over allowed pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from ..inputs import check_hyperparameter, check_positive_int, scale_value
from ..kernel import Kernel, PairList
from ..paths import fast_paths_enabled
from ..requirements import Needs, WeightIdentity
from ..side_inputs import current_mask
from .base import KernelState, Layer, Shape, single_kernel, single_shape, standard_normal

__all__ = ["ATTENTIONS", "POS_EMBS", "FiniteSelfAttention", "SelfAttention",
           "attention_weights", "embedding_covariance"]

#: The attention mechanisms ``f`` applied to the logits.
ATTENTIONS = ("softmax", "identity", "abs", "relu")
#: The kinds of positional embedding.
POS_EMBS = ("none", "sum", "concat")

#: A map of moments (the key/query or value mixture with the embedding).
_MomentMap = Callable[[torch.Tensor], torch.Tensor]
#: New ``(var1, var2, nngp, ntk)`` in token form, before the bias.
_Moments = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None"]

_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "abs": torch.abs,
    "relu": torch.relu,
}


def allowed_keys(
    shape: tuple[int, ...],
    causal: bool,
    key_mask: torch.Tensor | None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The bool mask of allowed (query, key) pairs for logits of ``shape`` ``(N, ..., P,
    P)``, broadcastable to it, or ``None`` when every pair is allowed."""
    n_tokens = shape[-1]
    allowed: torch.Tensor | None = None
    if causal:
        allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=device).tril()
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.shape != (shape[0], n_tokens):
            raise ValueError(
                f"key_mask must be a bool tensor (N, P) = ({shape[0]}, {n_tokens}), got "
                f"{key_mask.dtype} of shape {tuple(key_mask.shape)}"
            )
        keys = key_mask.to(device).reshape(shape[0], *(1,) * (len(shape) - 2), n_tokens)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def attention_weights(
    logits: torch.Tensor,
    attention: str,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights ``G = f(logits)`` of logits ``(N, ..., P, P)`` (query
    axis, then key axis), with disallowed keys at weight 0.

    ``attention``: ``"softmax"`` (over the allowed keys of each query; a query with no
    allowed key gets all-zero weights), ``"identity"``, ``"abs"`` or ``"relu"``
    (elementwise, no normalisation). ``causal``: query ``s`` sees only keys ``s' <= s``.
    ``key_mask``: bool ``(N, P)``, ``True`` for a real token; the keys of example ``n``
    that are ``False`` get weight 0 in every row (so the weights of the real tokens equal
    those computed without the masked positions at all).
    """
    allowed = allowed_keys(tuple(logits.shape), causal, key_mask, logits.device)
    if attention == "softmax":
        if allowed is None:
            return torch.softmax(logits, dim=-1)
        allowed = allowed.expand(logits.shape)
        # a row without any allowed key is computed over all keys and zeroed afterwards
        # (no NaN, neither in the values nor in the gradients)
        usable = allowed | ~allowed.any(dim=-1, keepdim=True)
        weights = torch.softmax(logits.masked_fill(~usable, -math.inf), dim=-1)
        return torch.where(allowed, weights, torch.zeros((), dtype=weights.dtype,
                                                         device=weights.device))
    if attention not in _ELEMENTWISE:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    weights = _ELEMENTWISE[attention](logits)
    if allowed is None:
        return weights
    return torch.where(allowed, weights, torch.zeros((), dtype=weights.dtype,
                                                     device=weights.device))


def token_distances(
    sizes: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """``d(s, s') = sum_i |s_i - s'_i|^p`` over the positional axes, ``(P, P)`` in
    row-major token order."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=dtype, device=device) for n in sizes),
                           indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], dim=-1)  # (P, ndim)
    return (coords[:, None, :] - coords[None, :, :]).abs().pow(p).sum(dim=-1)


def embedding_covariance(
    sizes: tuple[int, ...],
    decay: Callable[[torch.Tensor], torch.Tensor] | None,
    p: float,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``R (P, P)``: the correlation of the positional embedding between tokens, the
    identity for ``decay=None``, else ``decay(d)`` of :func:`token_distances`; checked to
    be a finite, symmetric, positive semi-definite ``(P, P)`` matrix (``ValueError``
    naming ``pos_emb_decay`` otherwise)."""
    n_tokens = math.prod(sizes)
    if decay is None:
        return torch.eye(n_tokens, dtype=dtype, device=device)
    value = decay(token_distances(sizes, p, dtype, device))
    if not isinstance(value, torch.Tensor) or value.shape != (n_tokens, n_tokens):
        raise ValueError(
            "pos_emb_decay must map the (P, P) tensor of token distances to a tensor of "
            f"the same shape ({n_tokens}, {n_tokens}), got "
            f"{type(value).__name__ if not isinstance(value, torch.Tensor) else tuple(value.shape)}"
        )
    value = value.to(dtype)
    plain = value.detach().to(torch.float64)
    if not bool(torch.isfinite(plain).all()):
        raise ValueError("pos_emb_decay gave non-finite values")
    scale = float(plain.abs().max())
    if float((plain - plain.T).abs().max()) > 1e-12 * max(scale, 1e-300):
        raise ValueError("pos_emb_decay must give a symmetric matrix")
    if scale > 0 and float(torch.linalg.eigvalsh(plain)[0]) < -1e-10 * scale:
        raise ValueError(
            "pos_emb_decay must give a positive semi-definite covariance over the tokens "
            "(it has a negative eigenvalue); e.g. lambda d: torch.exp(-d) with "
            "pos_emb_p_norm 1 or 2"
        )
    return value


def sandwich(left: torch.Tensor, moments: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = left[i] @ moments[i, j] @ right[j]^T`` for ``left`` ``(n1, S, P)``,
    ``moments`` ``(n1, n2, P, Q)`` and ``right`` ``(n2, T, Q)``, as two batched matrix
    products with large matrices (a batch per example, not per pair of examples: twice
    as fast as the three-operand ``einsum`` on the benchmark's attention layers). Both
    products are wide, ``(few, few) @ (few, many)``: MKL is about twice as slow on the
    tall and thin transposed form."""
    n1, n2, p, q = moments.shape
    t = right.shape[1]
    # batch over j: (t, q) @ (q, i p)
    step = torch.bmm(right, moments.transpose(0, 1).reshape(n2, n1 * p, q).transpose(1, 2))
    # (j, t, i, p) -> batch over i: (s, p) @ (p, j t)
    step = step.reshape(n2, t, n1, p).permute(2, 3, 0, 1).reshape(n1, p, n2 * t)
    out = torch.bmm(left, step).reshape(n1, left.shape[1], n2, t)
    return out.transpose(1, 2)


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class SelfAttention(Layer):
    r"""Multi-head scaled dot-product self-attention over all positions of ``(N, C, L)``
    sequences or ``(N, C, H, W)`` images (``H W`` tokens): see
    the module ``widenets.layers.attention`` for the finite twin and the kernel formulas
    (Hron et al. 2020; Neural Tangents' ``GlobalSelfAttention``).

    Args:
        n_heads: heads of the finite twin (the kernel does not depend on it).
        attention: ``"softmax"``, ``"identity"``, ``"abs"`` or ``"relu"``.
        linear_scaling: logits scaled by ``1/n_key`` with tied keys and queries
            (deterministic attention in the limit, every mechanism has a kernel), or by
            ``1/sqrt(n_key)`` with independent keys and queries (kernel only for
            ``"identity"``).
        W_key_std, W_query_std, W_value_std, W_out_std: weight scales; the kernel
            depends only on ``W_query_std * W_key_std`` and ``W_out_std * W_value_std``.
        b_std: scale of the output bias, ``None`` (or 0) for none.
        pos_emb: ``"none"``, ``"sum"`` or ``"concat"`` positional embedding of the
            key/query input (and of the values with ``val_pos_emb``).
        pos_emb_decay: ``None`` (embeddings of different tokens independent) or a
            function of the ``(P, P)`` tensor of token distances giving their correlation
            (e.g. ``lambda d: torch.exp(-d)``; it must be positive semi-definite).
        pos_emb_p_norm: ``p`` of the distance ``sum_i |s_i - s'_i|^p``.
        W_pos_emb_std: scale of the embedding.
        pos_emb_fraction: for ``"concat"``, the share ``f`` of the attention input that is
            embedding, in ``(0, 1)``.
        val_pos_emb: whether the values see the embedding too.
        causal: each query sees only the keys at or before it (row-major for images).
        channels: the finite twin's output channels and its key and value channels per
            head: its width (``width_argument``), which the kernel does not depend on.
    """

    needs = Needs(full_covariance=True)
    width_argument = "channels"

    def __init__(
        self,
        n_heads: int = 1,
        attention: str = "softmax",
        linear_scaling: bool = True,
        W_key_std: float | torch.Tensor = 1.0,
        W_query_std: float | torch.Tensor = 1.0,
        W_value_std: float | torch.Tensor = 1.0,
        W_out_std: float | torch.Tensor = 1.0,
        b_std: float | torch.Tensor | None = None,
        pos_emb: str = "none",
        pos_emb_decay: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pos_emb_p_norm: float = 2,
        W_pos_emb_std: float | torch.Tensor = 1.0,
        pos_emb_fraction: float = 0.5,
        val_pos_emb: bool = False,
        causal: bool = False,
        channels: int = 64,
    ) -> None:
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.attention = _check_choice(attention, "attention", ATTENTIONS)
        self.linear_scaling = _check_flag(linear_scaling, "linear_scaling")
        if not self.linear_scaling and self.attention != "identity":
            raise ValueError(
                f"SelfAttention(attention={attention!r}, linear_scaling=False) has no known "
                "closed-form kernel (only attention='identity' does); use "
                "linear_scaling=True, or estimate the kernel of the finite twin with "
                "wn.monte_carlo_kernel"
            )
        self.W_key_std = check_hyperparameter(W_key_std, "W_key_std", nonnegative=True)
        self.W_query_std = check_hyperparameter(W_query_std, "W_query_std", nonnegative=True)
        self.W_value_std = check_hyperparameter(W_value_std, "W_value_std", nonnegative=True)
        self.W_out_std = check_hyperparameter(W_out_std, "W_out_std", nonnegative=True)
        b_std = None if b_std is None else check_hyperparameter(b_std, "b_std",
                                                                nonnegative=True)
        # a plain 0 means no bias; a tensor stays (its gradient is asked for, even at 0)
        self.b_std = None if isinstance(b_std, float) and b_std == 0 else b_std
        self.pos_emb = _check_choice(pos_emb, "pos_emb", POS_EMBS)
        if pos_emb_decay is not None and not callable(pos_emb_decay):
            raise TypeError(f"pos_emb_decay must be None or a function, got {pos_emb_decay!r}")
        self.pos_emb_decay = pos_emb_decay
        p_norm = check_hyperparameter(pos_emb_p_norm, "pos_emb_p_norm", nonnegative=True)
        if isinstance(p_norm, torch.Tensor) or p_norm <= 0:
            raise ValueError(f"pos_emb_p_norm must be a number > 0, got {pos_emb_p_norm!r}")
        self.pos_emb_p_norm = pos_emb_p_norm
        self.W_pos_emb_std = check_hyperparameter(W_pos_emb_std, "W_pos_emb_std",
                                                  nonnegative=True)
        fraction = check_hyperparameter(pos_emb_fraction, "pos_emb_fraction")
        if isinstance(fraction, torch.Tensor) or not 0 < fraction < 1:
            raise ValueError(
                f"pos_emb_fraction must be a number strictly between 0 and 1, got "
                f"{pos_emb_fraction!r}"
            )
        self.pos_emb_fraction = pos_emb_fraction
        self.val_pos_emb = _check_flag(val_pos_emb, "val_pos_emb")
        self.causal = _check_flag(causal, "causal")
        self.channels = check_positive_int(channels, "channels")

    # ``with_hidden_width`` sets ``layer.width``: the twin's channels
    @property
    def width(self) -> int:
        """The finite twin's width, its ``channels``."""
        return self.channels

    @width.setter
    def width(self, value: int) -> None:
        self.channels = check_positive_int(value, "width")

    # ----------------------------------------------------------------- kernel
    def _weights(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The weights ``(input, embedding)`` of the key/query mixture: ``(1, W_pe^2)``
        for ``"sum"``, ``(1 - f, f W_pe^2)`` for ``"concat"``."""
        emb = self.W_pos_emb_std ** 2
        if self.pos_emb == "concat":
            f = float(self.pos_emb_fraction)
            return 1.0 - f, f * emb
        return 1.0, emb

    def takes_pair_list(self) -> bool:
        return self.own_rule(SelfAttention) and bool(self.linear_scaling)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)

        def keys(mask: torch.Tensor | None) -> torch.Tensor | None:
            return None if mask is None else mask.flatten(1)

        # masked keys get weight 0 here; outputs at masked queries are zeroed after
        # every layer (``Kernel.masked``)
        return self.attention_rule(k, keys(k.mask1), keys(k.second_mask))

    def attention_rule(
        self,
        k: Kernel,
        key_mask1: torch.Tensor | None = None,
        key_mask2: torch.Tensor | None = None,
    ) -> Kernel:
        """The kernel rule, with optional key masks: bool ``(N1, P)`` for ``x1`` and
        ``(N2, P)`` for ``x2`` (``key_mask2`` is ignored when ``x2`` is ``x1``), ``True``
        for a real token. Masked keys get attention weight 0 (the softmax renormalises
        over the real ones), so the output at a real token equals that of the input
        without the masked tokens. The outputs at masked tokens are not zeroed here."""
        sizes = k.layout.sizes
        if not sizes:
            raise ValueError(
                "SelfAttention needs inputs with positions, (N, C, L) sequences or "
                "(N, C, H, W) images, got a representation (N, features)"
            )
        if not k.layout.paired:
            raise ValueError(
                "SelfAttention mixes positions: it needs the full spatial covariance "
                "(spatial='full' or 'auto', not 'diagonal')"
            )
        layout = k.layout
        var1 = layout.as_matrix(k.var1)
        var2 = None if k.var2 is None else layout.as_matrix(k.var2)
        nngp = layout.as_matrix(k.nngp)
        ntk = None if k.ntk is None else layout.as_matrix(k.ntk)
        if var2 is None:
            key_mask2 = key_mask1

        embedding: torch.Tensor | None = None
        input_weight: float | torch.Tensor = 1.0
        if self.pos_emb != "none":
            input_weight, emb_weight = self._weights()
            correlation = embedding_covariance(sizes, self.pos_emb_decay,
                                               float(self.pos_emb_p_norm), nngp.dtype,
                                               nngp.device)
            embedding = emb_weight * correlation

        def mixed(moment: torch.Tensor) -> torch.Tensor:
            """The key/query covariance: the input's mixed with the embedding's."""
            if embedding is None:
                return moment
            return input_weight * moment + embedding

        def valued(moment: torch.Tensor) -> torch.Tensor:
            """The covariance (or NTK) of the values' input."""
            return mixed(moment) if self.val_pos_emb else moment

        b2 = (self.b_std or 0.0) ** 2
        if self.linear_scaling:
            out = self._linear_rule(var1, var2, nngp, ntk, mixed, valued, key_mask1, key_mask2,
                                    k.pairs)
        else:
            out = self._identity_rule(var1, var2, nngp, ntk, mixed, valued, key_mask1,
                                      key_mask2, embedding is None)
        new_var1, new_var2, new_nngp, new_ntk = (_plus(m, b2) for m in out)
        assert new_var1 is not None and new_nngp is not None
        if var2 is None:
            k.write_self_entries(new_nngp, new_var1)
        return k.replace(
            nngp=layout.from_matrix(new_nngp),
            ntk=None if new_ntk is None else layout.from_matrix(new_ntk),
            var1=layout.from_matrix(new_var1),
            var2=None if new_var2 is None else layout.from_matrix(new_var2),
            width=self.channels, is_gaussian=True,
            sources=frozenset({WeightIdentity()}),
        )

    def _linear_rule(
        self, var1: torch.Tensor, var2: torch.Tensor | None, nngp: torch.Tensor,
        ntk: torch.Tensor | None, mixed: _MomentMap, valued: _MomentMap,
        mask1: torch.Tensor | None, mask2: torch.Tensor | None, pairs: PairList | None,
    ) -> _Moments:
        """``linear_scaling=True``: deterministic weights ``G_x = f(QK A_x)``; ``pairs``:
        the moments are those of listed pairs (one product per pair)."""
        qk = self.W_query_std * self.W_key_std
        ov2 = (self.W_out_std * self.W_value_std) ** 2
        g1 = attention_weights(qk * mixed(var1), self.attention, self.causal, mask1)
        g2 = g1 if var2 is None else attention_weights(qk * mixed(var2), self.attention,
                                                       self.causal, mask2)

        scaled1 = ov2 * g1  # (the scale on the small factor: one pass less)

        def cross(moment: torch.Tensor) -> torch.Tensor:
            if pairs is not None:
                return torch.bmm(torch.bmm(scaled1[pairs.rows], moment),
                                 g2[pairs.cols].transpose(1, 2))
            return sandwich(scaled1, moment, g2)

        def same(g: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
            return ov2 * torch.bmm(torch.bmm(g, moment), g.transpose(1, 2))

        new_nngp = cross(valued(nngp))
        new_ntk = None if ntk is None else cross(torch.add(valued(ntk), valued(nngp), alpha=2))
        new_var1 = same(g1, valued(var1))
        new_var2 = None if var2 is None else same(g2, valued(var2))
        return new_var1, new_var2, new_nngp, new_ntk

    def _identity_rule(
        self, var1: torch.Tensor, var2: torch.Tensor | None, nngp: torch.Tensor,
        ntk: torch.Tensor | None, mixed: _MomentMap, valued: _MomentMap,
        mask1: torch.Tensor | None, mask2: torch.Tensor | None, no_emb: bool,
    ) -> _Moments:
        """``linear_scaling=False``, identity attention: the logits are Gaussian in the
        limit; the output covariance is ``A(s,t)`` times a sum over the allowed key
        pairs (Neural Tangents' closed form, with the causal or key masks as sums over
        the allowed pairs only)."""
        std2 = (self.W_query_std * self.W_key_std * self.W_out_std * self.W_value_std) ** 2
        shape1 = (var1.shape[0], var1.shape[-1], var1.shape[-1])
        allowed1 = allowed_keys(shape1, self.causal, mask1, var1.device)
        if var2 is None:
            allowed2 = allowed1
        else:
            shape2 = (var2.shape[0], var2.shape[-1], var2.shape[-1])
            allowed2 = allowed_keys(shape2, self.causal, mask2, var2.device)

        def matrix(allowed: torch.Tensor | None, like: torch.Tensor, count: int) -> torch.Tensor:
            """The allowed (query, key) pairs as a 0/1 matrix ``(count, P, P)``."""
            n_tokens = like.shape[-1]
            if allowed is None:
                return torch.ones(count, n_tokens, n_tokens, dtype=like.dtype,
                                  device=like.device)
            return allowed.to(like.dtype).expand(count, n_tokens, n_tokens)

        def pair_sum(product: torch.Tensor, first: torch.Tensor | None,
                     second: torch.Tensor | None, cross: bool) -> torch.Tensor:
            """``sum_{s' allowed for s, t' allowed for t} product(s', t')``."""
            if first is None and second is None:
                return product.sum(dim=(-2, -1), keepdim=True)
            m1 = matrix(first, product, product.shape[0])
            if cross:
                m2 = matrix(second, product, product.shape[1])
                return sandwich(m1, product, m2)
            return torch.bmm(torch.bmm(m1, product), m1.transpose(1, 2))

        def same(var: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
            a = mixed(var)
            return std2 * pair_sum(a * valued(var), allowed, allowed, False) * a

        a12 = mixed(nngp)
        dot12 = pair_sum(a12 * valued(nngp), allowed1, allowed2, True)
        new_nngp = std2 * dot12 * a12
        new_ntk = None
        if ntk is not None:
            t12 = mixed(ntk)
            if self.val_pos_emb or no_emb:
                term = 2 * pair_sum(a12 * t12, allowed1, allowed2, True)
            else:
                term = (pair_sum(a12 * ntk, allowed1, allowed2, True)
                        + pair_sum(nngp * t12, allowed1, allowed2, True))
            new_ntk = std2 * (term * a12 + dot12 * (t12 + 4 * a12))
        new_var1 = same(var1, allowed1)
        new_var2 = None if var2 is None else same(var2, allowed2)
        return new_var1, new_var2, new_nngp, new_ntk

    # ----------------------------------------------------------------- finite twin
    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        if len(shape) < 2:
            raise ValueError(
                "SelfAttention needs inputs with positions, (N, C, L) sequences or "
                f"(N, C, H, W) images, got per-example shape {shape}"
            )
        module = FiniteSelfAttention(self, shape[0], tuple(shape[1:]), generator)
        return module, (self.channels, *shape[1:])


class FiniteSelfAttention(nn.Module):
    """The finite twin of :class:`SelfAttention` for inputs ``(N, in_channels, *sizes)``
    (see the module ``widenets.layers.attention`` for its parameterization)."""

    def __init__(
        self,
        layer: SelfAttention,
        in_channels: int,
        sizes: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        self.layer, self.in_channels, self.sizes = layer, in_channels, sizes
        heads, width = layer.n_heads, layer.channels
        concat = layer.pos_emb == "concat"
        # NT's concat embedding has as many channels as the input (n_chan_pos_emb=None)
        self.emb_channels = in_channels
        key_rows = in_channels + (self.emb_channels if concat else 0)
        value_rows = key_rows if layer.val_pos_emb else in_channels
        self.key_weight = nn.Parameter(standard_normal((heads, key_rows, width), generator))
        self.query_weight = None if layer.linear_scaling else nn.Parameter(
            standard_normal((heads, key_rows, width), generator))
        self.value_weight = nn.Parameter(standard_normal((heads, value_rows, width),
                                                         generator))
        self.out_weight = nn.Parameter(standard_normal((heads * width, width), generator))
        b_std = scale_value(layer.b_std)
        self.bias = nn.Parameter(standard_normal((width,), generator)) if b_std else None
        n_tokens = math.prod(sizes)
        self.pos_emb: nn.Parameter | None = None
        root = None
        if layer.pos_emb != "none":
            self.pos_emb = nn.Parameter(standard_normal((n_tokens, self.emb_channels),
                                                        generator))
            if layer.pos_emb_decay is not None:
                correlation = embedding_covariance(sizes, layer.pos_emb_decay,
                                                   float(layer.pos_emb_p_norm), torch.float64)
                eigenvalues, vectors = torch.linalg.eigh(correlation.detach())
                root = (vectors * eigenvalues.clamp_min(0.0).sqrt()) @ vectors.T
        self.register_buffer("pos_emb_root", root)

    def embedding(self) -> torch.Tensor | None:
        """The positional embedding ``(P, emb_channels)`` (``W_pos_emb_std`` included)."""
        if self.pos_emb is None:
            return None
        emb: torch.Tensor = self.pos_emb
        if isinstance(self.pos_emb_root, torch.Tensor):
            emb = self.pos_emb_root.to(emb.dtype) @ emb
        return cast(float, scale_value(self.layer.W_pos_emb_std)) * emb

    def _project(self, tokens: torch.Tensor, weight: torch.Tensor,
                 with_emb: bool) -> torch.Tensor:
        """``(N, P, C)`` tokens (with the embedding if ``with_emb``) times per-head
        weights ``(H, rows, m)``, normalised by the fan-in: ``(N, H, P, m)``."""
        c = self.in_channels
        emb = self.embedding() if with_emb else None
        if emb is None or self.layer.pos_emb == "sum":
            source = tokens if emb is None else tokens + emb
            return torch.einsum("npc,hcm->nhpm", source, weight[:, :c]) / math.sqrt(c)
        f = float(self.layer.pos_emb_fraction)
        own = torch.einsum("npc,hcm->nhpm", tokens, weight[:, :c]) / math.sqrt(c)
        extra = torch.einsum("pc,hcm->hpm", emb, weight[:, c:]) / math.sqrt(
            self.emb_channels)
        return math.sqrt(1 - f) * own + math.sqrt(f) * extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if x.ndim != len(self.sizes) + 2 or x.shape[1] != self.in_channels or tuple(
                x.shape[2:]) != self.sizes:
            raise ValueError(
                f"SelfAttention expects inputs (N, {self.in_channels}, "
                f"{', '.join(map(str, self.sizes))}), got shape {tuple(x.shape)}"
            )
        n = x.shape[0]
        tokens = x.flatten(2).transpose(1, 2)  # (N, P, C)
        keys = self._project(tokens, self.key_weight, True)
        queries = keys if self.query_weight is None else self._project(
            tokens, self.query_weight, True)
        n_key = keys.shape[-1]
        qk = cast(float, scale_value(layer.W_query_std)) * cast(
            float, scale_value(layer.W_key_std))
        norm = n_key if layer.linear_scaling else math.sqrt(n_key)
        logits = (qk / norm) * queries @ keys.transpose(-1, -2)  # (N, H, P, P)
        mask = current_mask(x)  # the real tokens of a masked batch are its keys
        weights = attention_weights(logits, layer.attention, layer.causal,
                                    None if mask is None else mask.flatten(1))
        values = self._project(tokens, self.value_weight, layer.val_pos_emb)
        heads = (weights @ values).permute(0, 2, 1, 3).reshape(n, tokens.shape[1], -1)
        ov = cast(float, scale_value(layer.W_out_std)) * cast(
            float, scale_value(layer.W_value_std))
        out = (ov / math.sqrt(heads.shape[-1])) * heads @ self.out_weight
        if self.bias is not None:
            out = out + cast(float, scale_value(layer.b_std)) * self.bias
        return out.transpose(1, 2).reshape(n, -1, *self.sizes)

    def extra_repr(self) -> str:
        return repr(self.layer)


def _plus(moment: torch.Tensor | None, b2: float | torch.Tensor) -> torch.Tensor | None:
    """``moment + b2`` (the bias variance), without a temporary of a full tile when the
    fast paths are on and nothing is differentiated: in place on the rules' fresh
    results, or for a transposed one written contiguous in the same pass (the copy that
    :meth:`~widenets.kernel.Layout.from_matrix` would make otherwise)."""
    if moment is None:
        return None
    if isinstance(b2, float) and b2 == 0.0:
        return moment
    if fast_paths_enabled() and not moment.requires_grad and not isinstance(
            b2, torch.Tensor):
        if moment.is_contiguous():
            return moment.add_(b2)
        result = torch.empty(moment.shape, dtype=moment.dtype, device=moment.device)
        return torch.add(moment, b2, out=result)
    return moment + b2
