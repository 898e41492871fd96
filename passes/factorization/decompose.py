"""Weight decompositions (numpy and tensorly), rank rules and the MAC counts of each factored form.

Every function takes a float weight and returns the factors as float32 arrays
in the layout of the ONNX op that will hold them:

* :func:`svd_matrix`: ``W[K, N] ≈ A[K, r] · B[r, N]`` (Gemm/MatMul, 1×1 conv);
* :func:`spatial_svd`: ``W[o, i, y, x] ≈ Σ_r V[r, i, y] · H[o, r, x]``, a k×1
  conv with ``r`` channels then a 1×k conv (Jaderberg et al. 2014, scheme 2 as
  solved in closed form by Tai et al. 2016);
* :func:`tucker2`: tensorly ``partial_tucker`` over the output and input
  channel modes: 1×1 → k×k core → 1×1 (Kim et al. 2016);
* :func:`cp`: tensorly ``parafac``: 1×1 → depthwise k×1 → depthwise 1×k → 1×1
  (Lebedev et al. 2015), with the relative reconstruction error so callers can
  refuse degenerate fits;
* :func:`depthwise_separable`: per input channel, the best rank-``m`` fit of
  its ``O × (kh·kw)`` slice: a depthwise k×k conv with channel multiplier ``m``
  then a pointwise 1×1 conv.

Rank rules: :func:`rank_for_energy` (smallest rank keeping a fraction of the
squared singular values) and :func:`vbmf_rank` (empirical variational Bayes
matrix factorisation, Nakajima et al. 2013, the analytic solution; used for
Tucker-2 ranks by Kim et al. 2016).
"""

from __future__ import annotations

import warnings

import numpy as np


def svd_matrix(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``w[K, N] ≈ a[K, r] @ b[r, N]`` (singular values split evenly between the factors)."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    r = min(r, s.size)
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32)


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    o, i, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


def spatial_svd(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(vertical ``[r, I, kh, 1]``, horizontal ``[O, r, 1, kw]``) with ``Σ_r V·H ≈ w``."""
    o, i, kh, kw = w.shape
    a, b = svd_matrix(spatial_matrix(w), r)  # a[(i, y), r], b[r, (o, x)]
    r = a.shape[1]
    vertical = a.reshape(i, kh, r).transpose(2, 0, 1)[..., None]
    horizontal = b.reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(vertical), np.ascontiguousarray(horizontal)


def spatial_svd_rebuild(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    return np.einsum("riy,orx->oiyx", vertical[..., 0], horizontal[:, :, 0, :])


def tucker2(w: np.ndarray, r_out: int, r_in: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first ``[r_in, I, 1, 1]``, core ``[r_out, r_in, kh, kw]``, last ``[O, r_out, 1, 1]``)."""
    from tensorly.decomposition import partial_tucker

    o, i = w.shape[:2]
    r_out, r_in = min(r_out, o), min(r_in, i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (core, (u_out, u_in)), _ = partial_tucker(w.astype(np.float64), rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=50, random_state=seed)
    first = u_in.T[:, :, None, None]
    last = u_out[:, :, None, None]
    return first.astype(np.float32), np.asarray(core, np.float32), last.astype(np.float32)


def tucker2_rebuild(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    return np.einsum("ab,bcyx,cd->adyx", last[:, :, 0, 0], core, first[:, :, 0, 0])


def cp(w: np.ndarray, r: int, seed: int = 0) -> tuple[tuple[np.ndarray, ...], float]:
    """((first ``[r, I, 1, 1]``, vertical dw ``[r, 1, kh, 1]``, horizontal dw ``[r, 1, 1, kw]``,
    last ``[O, r, 1, 1]``), relative reconstruction error)."""
    from tensorly.decomposition import parafac

    w64 = w.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = parafac(w64, rank=r, init="svd", n_iter_max=100, tol=1e-7, random_state=seed, normalize_factors=True)
    lam, (a_o, a_i, a_y, a_x) = res.weights, res.factors
    first = a_i.T[:, :, None, None]
    vert = a_y.T[:, None, :, None]
    horiz = a_x.T[:, None, None, :]
    last = (a_o * lam)[:, :, None, None]
    factors = tuple(np.ascontiguousarray(f, dtype=np.float32) for f in (first, vert, horiz, last))
    err = relative_error(w, cp_rebuild(*factors))
    return factors, err


def cp_rebuild(first, vert, horiz, last) -> np.ndarray:
    return np.einsum("or,ri,ry,rx->oiyx", last[:, :, 0, 0], first[:, :, 0, 0], vert[:, 0, :, 0], horiz[:, 0, 0, :])


def depthwise_separable(w: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(depthwise ``[I·m, 1, kh, kw]``, pointwise ``[O, I·m, 1, 1]``): per input channel, rank-``m`` SVD."""
    o, i, kh, kw = w.shape
    m = min(m, o, kh * kw)
    dw = np.zeros((i * m, 1, kh, kw), np.float32)
    pw = np.zeros((o, i * m), np.float32)
    for c in range(i):
        a, b = svd_matrix(w[:, c].reshape(o, kh * kw), m)  # a[O, m], b[m, kh·kw]
        k = a.shape[1]
        dw[c * m : c * m + k, 0] = b.reshape(k, kh, kw)
        pw[:, c * m : c * m + k] = a
    return dw, pw[:, :, None, None]


def depthwise_rebuild(dw: np.ndarray, pw: np.ndarray, in_channels: int) -> np.ndarray:
    m = dw.shape[0] // in_channels
    o = pw.shape[0]
    p = pw[:, :, 0, 0].reshape(o, in_channels, m)
    d = dw[:, 0].reshape(in_channels, m, *dw.shape[2:])
    return np.einsum("oim,imyx->oiyx", p, d)


def relative_error(w: np.ndarray, rebuilt: np.ndarray) -> float:
    n = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - rebuilt)) / n if n > 0 else 0.0


# ----------------------------------------------------------------------------- rank rules
def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the total squared sum."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(np.searchsorted(e / e[-1], energy - 1e-12) + 1)


def vbmf_rank(y: np.ndarray) -> int:
    """Rank estimated by empirical VBMF (Nakajima, Sugiyama, Babacan, Tomioka 2013), noise variance unknown.

    The analytic global solution: the noise variance minimises the free energy
    over the singular values (a 1-D bounded search), and the rank is the number
    of singular values above ``sqrt(M σ² (1 + τ̄)(1 + α/τ̄))``.
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    ll, mm = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    h = ll
    alpha = ll / mm
    tau_bar = 2.5129 * np.sqrt(alpha)
    residual = 0.0  # all L singular values are kept
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    eh_ub = int(min(np.ceil(ll / (1 + alpha)) - 1, h)) - 1
    upper = (np.sum(s**2) + residual) / (ll * mm)
    tail = s[eh_ub + 1 :] if eh_ub + 1 < s.size else s[-1:]
    lower = max(tail[0] ** 2 / (mm * xubar), np.mean(tail**2) / mm)
    if not (upper > lower > 0):
        return int(np.sum(s > 1e-12 * s[0])) if s[0] > 0 else 1

    def tau(x):
        return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0)))

    def free_energy(sigma2):
        x = s**2 / (mm * sigma2)
        z1, z2 = x[x > xubar], x[x <= xubar]
        t1 = tau(z1)
        return (
            np.sum(z2 - np.log(z2))
            + np.sum(z1 - t1)
            + np.sum(np.log((t1 + 1) / z1))
            + alpha * np.sum(np.log(t1 / alpha + 1))
            + residual / (mm * sigma2)
            + (ll - h) * np.log(sigma2)
        )

    sigma2 = minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
    threshold = np.sqrt(mm * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))
