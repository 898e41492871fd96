"""Weight decompositions (numpy), rank rules and the MAC counts of each factored form.

Every function takes a float weight and returns the factors as float32 arrays
in the layout of the ONNX op that will hold them:

* :func:`svd_matrix`: ``W[K, N] ≈ A[K, r] · B[r, N]`` (Gemm/MatMul, 1×1 conv);
* :func:`spatial_svd`: ``W[o, i, y, x] ≈ Σ_r V[r, i, y] · H[o, r, x]``, a k×1
  conv with ``r`` channels then a 1×k conv (Jaderberg et al. 2014, scheme 2 as
  solved in closed form by Tai et al. 2016);
* :func:`tucker2`: Tucker-2 over the output and input channel modes (HOOI from
  the truncated HOSVD): 1×1 → k×k core → 1×1 (Kim et al. 2016);
* :func:`cp`: CP by alternating least squares: 1×1 → depthwise k×1 →
  depthwise 1×k → 1×1 (Lebedev et al. 2015), with the relative reconstruction
  error so callers can refuse degenerate fits;
* :func:`depthwise_separable`: per input channel, the best rank-``m`` fit of
  its ``O × (kh·kw)`` slice: a depthwise k×k conv with channel multiplier ``m``
  then a pointwise 1×1 conv.

Rank rules: :func:`rank_for_energy` (smallest rank keeping a fraction of the
squared singular values) and :func:`vbmf_rank` (empirical variational Bayes
matrix factorisation, Nakajima et al. 2013, the analytic solution; used for
Tucker-2 ranks by Kim et al. 2016).
"""

from __future__ import annotations

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
    return np.einsum("riy,orx->oiyx", vertical[..., 0], horizontal[:, :, 0, :], optimize=True)


def _leading(gram: np.ndarray, r: int) -> np.ndarray:
    """The ``r`` leading eigenvectors of a symmetric Gram matrix, largest first."""
    _, vecs = np.linalg.eigh(gram)
    return vecs[:, ::-1][:, :r]


def tucker2(w: np.ndarray, r_out: int, r_in: int, seed: int = 0, n_iter: int = 10, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first ``[r_in, I, 1, 1]``, core ``[r_out, r_in, kh, kw]``, last ``[O, r_out, 1, 1]``).

    Higher-order orthogonal iteration over the two channel modes, started from the truncated
    HOSVD, each factor the leading eigenvectors of a Gram matrix (``O × O`` or ``I × I``): at
    most ``n_iter`` rounds, fewer once the core's norm changes by less than ``tol`` (relative).
    Deterministic (``seed`` is not needed). tensorly's ``partial_tucker`` computes the same fit
    through full SVDs of the unfoldings: 40-140 s per 512-channel 3×3 conv here, against about
    a second this way."""
    o, i = w.shape[:2]
    r_out, r_in = min(r_out, o), min(r_in, i)
    w64 = w.astype(np.float64)
    m_out, m_in = w64.reshape(o, -1), w64.transpose(1, 0, 2, 3).reshape(i, -1)
    u_out, u_in = _leading(m_out @ m_out.T, r_out), _leading(m_in @ m_in.T, r_in)
    norm = None
    for _ in range(n_iter if r_out < o or r_in < i else 0):
        y = np.tensordot(w64, u_in, axes=([1], [0])).reshape(o, -1)  # [O, kh·kw·r_in]
        u_out = _leading(y @ y.T, r_out)
        y = np.tensordot(u_out, w64, axes=([0], [0])).transpose(1, 0, 2, 3).reshape(i, -1)  # [I, r_out·kh·kw]
        u_in = _leading(y @ y.T, r_in)
        core_norm = float(np.linalg.norm(u_in.T @ y))
        if norm is not None and abs(core_norm - norm) <= tol * core_norm:
            break
        norm = core_norm
    core = np.einsum("oiyx,os,ir->sryx", w64, u_out, u_in, optimize=True)
    first = u_in.T[:, :, None, None]
    last = u_out[:, :, None, None]
    return first.astype(np.float32), core.astype(np.float32), last.astype(np.float32)


def tucker2_rebuild(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    # optimize: contracted pairwise through BLAS (the plain loop over all six indices took minutes
    # on one 512-channel conv of a ResNet-18)
    return np.einsum("ab,bcyx,cd->adyx", last[:, :, 0, 0], core, first[:, :, 0, 0], optimize=True)


CP_FLOPS_PER_LAYER = 4e10  # ALS work one layer may take (sets the sweeps of large layers)


def cp(w: np.ndarray, r: int, seed: int = 0, n_iter: int | None = None, tol: float = 1e-7) -> tuple[tuple[np.ndarray, ...], float]:
    """((first ``[r, I, 1, 1]``, vertical dw ``[r, 1, kh, 1]``, horizontal dw ``[r, 1, 1, kw]``,
    last ``[O, r, 1, 1]``), relative reconstruction error).

    Alternating least squares, started from the leading eigenvectors of each mode's Gram matrix
    (seeded noise for the columns past a mode's size). Each sweep contracts the weight with one
    channel factor at a time (two ``O·I·kh·kw·r`` products, the spatial modes from the second),
    so no Khatri-Rao product of two channel modes is ever formed; the fit error comes from the
    Gram matrices. Sweeps: at most 100, fewer for large layers (about ``CP_FLOPS_PER_LAYER`` of
    work: 10 for a 512-channel 3×3 conv at half its MACs), stopping once the error changes by
    less than ``tol``. tensorly's ``parafac`` took 75-180 s for two sweeps of that layer here
    (its SVD initialisation and unfoldings)."""
    o, i, kh, kw = w.shape
    w64 = w.astype(np.float64)
    rng = np.random.default_rng(seed)
    unfold = [w64.reshape(o, -1), w64.transpose(1, 0, 2, 3).reshape(i, -1),
              w64.transpose(2, 0, 1, 3).reshape(kh, -1), w64.transpose(3, 0, 1, 2).reshape(kw, -1)]

    def init(m: np.ndarray) -> np.ndarray:
        lead = _leading(m @ m.T, min(r, m.shape[0]))
        extra = rng.standard_normal((m.shape[0], r - lead.shape[1])) / np.sqrt(m.shape[0])
        return np.concatenate([lead, extra], axis=1)

    a, b, c, d = (init(m) for m in unfold)
    if n_iter is None:
        n_iter = int(min(100, max(10, CP_FLOPS_PER_LAYER // max(1.0, 4.0 * w.size * r))))
    norm2 = float(np.sum(w64 * w64))
    ridge = 1e-12

    def solve(gram: np.ndarray, mttkrp: np.ndarray) -> np.ndarray:
        gram = gram + ridge * (np.trace(gram) / r + 1e-300) * np.eye(r)
        return np.linalg.solve(gram, mttkrp.T).T

    err, prev = 1.0, None
    for _ in range(n_iter):
        t = np.tensordot(w64, b, axes=([1], [0]))  # [O, kh, kw, r]
        a = solve((b.T @ b) * (c.T @ c) * (d.T @ d), np.einsum("oyxr,yr,xr->or", t, c, d, optimize=True))
        t = np.tensordot(w64, a, axes=([0], [0]))  # [I, kh, kw, r]
        ga = a.T @ a
        b = solve(ga * (c.T @ c) * (d.T @ d), np.einsum("iyxr,yr,xr->ir", t, c, d, optimize=True))
        c = solve(ga * (b.T @ b) * (d.T @ d), np.einsum("iyxr,ir,xr->yr", t, b, d, optimize=True))
        m_d = np.einsum("iyxr,ir,yr->xr", t, b, c, optimize=True)
        d = solve(ga * (b.T @ b) * (c.T @ c), m_d)
        inner = float(np.sum(m_d * d))  # <W, X>
        fit2 = float(np.sum(ga * (b.T @ b) * (c.T @ c) * (d.T @ d)))  # ||X||^2
        err = float(np.sqrt(max(0.0, norm2 - 2.0 * inner + fit2) / max(norm2, 1e-300)))
        if not np.isfinite(err):
            break
        if prev is not None and abs(prev - err) < tol:
            break
        prev = err
        # unit columns for b, c, d (their scale moves into a, which the next sweep solves first)
        for f in (b, c, d):
            f /= np.maximum(np.linalg.norm(f, axis=0, keepdims=True), 1e-300)
    norms = [np.linalg.norm(f, axis=0) for f in (a, b, c, d)]
    lam = np.prod(norms, axis=0)
    a_o, a_i, a_y, a_x = (f / np.maximum(n, 1e-300) for f, n in zip((a, b, c, d), norms))
    first = a_i.T[:, :, None, None]
    vert = a_y.T[:, None, :, None]
    horiz = a_x.T[:, None, None, :]
    last = (a_o * lam)[:, :, None, None]
    factors = tuple(np.ascontiguousarray(f, dtype=np.float32) for f in (first, vert, horiz, last))
    err = relative_error(w, cp_rebuild(*factors))
    return factors, err


def cp_rebuild(first, vert, horiz, last) -> np.ndarray:
    return np.einsum("or,ri,ry,rx->oiyx", last[:, :, 0, 0], first[:, :, 0, 0], vert[:, 0, :, 0], horiz[:, 0, 0, :], optimize=True)


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
    return np.einsum("oim,imyx->oiyx", p, d, optimize=True)


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
