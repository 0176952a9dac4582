"""High-precision (mpmath) kernels of fully connected networks, for the numerics tests.

Each activation's maps are written here in their textbook forms, which cancel badly in
floating point but are exact at 50 digits, and the layer recursion is run on the exact
values of the inputs. The library computes the same kernels with rearranged, stable
forms in float64/float32; the tests compare the two.

Maps ``F(q1, q2, c)`` (NNGP, ``E[phi(u) phi(v)]``) and ``G(q1, q2, c)`` (derivative,
``E[phi'(u) phi'(v)]``) for ``(u, v) ~ N(0, [[q1, c], [c, q2]])``; dense layers
``K' = W^2 K + b^2``, ``T' = W^2 T + K'`` (NTK parameterization); activations
``K' = F``, ``T' = T G``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mpmath
import numpy as np

mp = mpmath.mp
mp.dps = 50

Maps = tuple[Callable, Callable]


def _angles(q1, q2, c):
    rho = c / mp.sqrt(q1 * q2) if q1 * q2 > 0 else mp.mpf(0)
    rho = max(mp.mpf(-1), min(mp.mpf(1), rho))
    return rho, mp.acos(rho)


def ab_relu(a: float, b: float) -> Maps:
    a, b = mp.mpf(a), mp.mpf(b)

    def nngp(q1, q2, c):
        rho, theta = _angles(q1, q2, c)
        arc = (mp.sin(theta) + (mp.pi - theta) * rho) / (2 * mp.pi)
        return mp.sqrt(q1 * q2) * ((a - b) ** 2 * arc + a * b * rho)

    def derivative(q1, q2, c):
        _, theta = _angles(q1, q2, c)
        return (a - b) ** 2 * (mp.pi - theta) / (2 * mp.pi) + a * b

    return nngp, derivative


def _arc_cosine_j(order: int, theta):
    j_prev = mp.pi - theta
    if order == 0:
        return j_prev
    j_curr = mp.sin(theta) + j_prev * mp.cos(theta)
    for n in range(2, order + 1):
        j_prev, j_curr = j_curr, ((2 * n - 1) * mp.cos(theta) * j_curr
                                  + (n - 1) ** 2 * mp.sin(theta) ** 2 * j_prev)
    return j_curr


def rectified_monomial(degree: int) -> Maps:
    def moments(order, q1, q2, c):
        if order == 0 and q1 * q2 == 0:
            return mp.mpf(0)  # an input of variance 0 is exactly 0, and step(0) = 0
        _, theta = _angles(q1, q2, c)
        return (q1 * q2) ** (mp.mpf(order) / 2) * _arc_cosine_j(order, theta) / (2 * mp.pi)

    def nngp(q1, q2, c):
        return moments(degree, q1, q2, c)

    def derivative(q1, q2, c):
        return 0 if degree == 0 else degree**2 * moments(degree - 1, q1, q2, c)

    return nngp, derivative


def sign() -> Maps:
    def nngp(q1, q2, c):
        rho, _ = _angles(q1, q2, c)
        return 2 / mp.pi * mp.asin(rho)

    return nngp, lambda q1, q2, c: mp.mpf(0)


def erf(a: float = 1.0, b: float = 1.0, shift: float = 0.0) -> Maps:
    a, b, shift = mp.mpf(a), mp.mpf(b), mp.mpf(shift)
    s = 2 * b * b

    def nngp(q1, q2, c):
        return a**2 * 2 / mp.pi * mp.asin(s * c / mp.sqrt((1 + s * q1) * (1 + s * q2))) + shift**2

    def derivative(q1, q2, c):
        return a**2 * 2 * s / mp.pi / mp.sqrt((1 + s * q1) * (1 + s * q2) - s * s * c * c)

    return nngp, derivative


def gelu() -> Maps:
    def parts(q1, q2, c):
        s_sq = (1 + q1) * (1 + q2)
        det = s_sq - c * c
        return s_sq, det, mp.asin(c / mp.sqrt(s_sq))

    def nngp(q1, q2, c):
        s_sq, det, arcsin = parts(q1, q2, c)
        return c / 4 + (c * arcsin + mp.sqrt(det) * (q1 * q2 - 1) / s_sq
                        + 1 / mp.sqrt(det)) / (2 * mp.pi)

    def derivative(q1, q2, c):
        s_sq, det, arcsin = parts(q1, q2, c)
        return mp.mpf(1) / 4 + (arcsin + c * (2 + q1 + q2) / (s_sq * mp.sqrt(det))
                                + c / det ** mp.mpf(1.5)) / (2 * mp.pi)

    return nngp, derivative


def sin(a: float = 1.0, b: float = 1.0, phase: float = 0.0) -> Maps:
    a, b, phase = mp.mpf(a), mp.mpf(b), mp.mpf(phase)

    def moments(shift, q1, q2, c):
        return (mp.exp(-b * b * (q1 + q2 - 2 * c) / 2)
                - mp.cos(2 * shift) * mp.exp(-b * b * (q1 + q2 + 2 * c) / 2)) / 2

    def nngp(q1, q2, c):
        return a**2 * moments(phase, q1, q2, c)

    def derivative(q1, q2, c):
        return (a * b) ** 2 * moments(phase + mp.pi / 2, q1, q2, c)

    return nngp, derivative


def rbf(gamma: float) -> Maps:
    gamma = mp.mpf(gamma)

    def nngp(q1, q2, c):
        return mp.exp(-gamma * (q1 + q2 - 2 * c))

    def derivative(q1, q2, c):
        return 2 * gamma * mp.exp(-gamma * (q1 + q2 - 2 * c))

    return nngp, derivative


#: A layer of the reference network: ("dense", W_std, b_std) or ("act", Maps).
Spec = tuple


def mlp_kernels(layers: Sequence[Spec], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNGP and NTK ``(N, N)`` of the network ``layers`` on the rows of ``x``, computed at
    50 digits from the exact values of ``x`` and returned as float64."""
    rows = [[mp.mpf(float(v)) for v in row] for row in np.asarray(x, dtype=np.float64)]
    n, d = len(rows), len(rows[0])
    k = [[mp.fsum(a * b for a, b in zip(rows[i], rows[j])) / d for j in range(n)]
         for i in range(n)]
    t = [[mp.mpf(0)] * n for _ in range(n)]
    for layer in layers:
        if layer[0] == "dense":
            w2, b2 = mp.mpf(layer[1]) ** 2, mp.mpf(layer[2] or 0) ** 2
            k = [[w2 * k[i][j] + b2 for j in range(n)] for i in range(n)]
            t = [[k[i][j] + w2 * t[i][j] for j in range(n)] for i in range(n)]
        else:
            f, g = layer[1]
            var = [k[i][i] for i in range(n)]
            new_k = [[f(var[i], var[j], k[i][j]) for j in range(n)] for i in range(n)]
            t = [[t[i][j] * g(var[i], var[j], k[i][j]) for j in range(n)] for i in range(n)]
            k = new_k
    as_array = lambda m: np.array([[float(v) for v in row] for row in m])  # noqa: E731
    return as_array(k), as_array(t)
