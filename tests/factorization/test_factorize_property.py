"""Property tests: each decomposition reproduces the layer at full rank, for any conv geometry.

Random conv geometries (channels, kernel, stride, asymmetric padding, dilation,
bias) are factorized at full rank by every method and run in onnxruntime: the
output shape is the original's and the output agrees to float rounding. CP is
not exact at any practical rank, so its graph is checked against the conv with
the weight its factors rebuild. Error falls as the rank grows.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model, const_array, infer_shapes
from onnxcc.compiler.verify import compare_outputs, run_model
from onnxcc.passes.factorization import decompose as D
from onnxcc.passes.factorization.factorize import factorize_layer
from tests.conftest import named_model_from_text

FULL = {"spatial-svd": 10**6, "tucker": (10**6, 10**6), "depthwise": 10**6, "svd": 10**6}


def conv_model(cin, cout, k, stride, pads, dil, bias, hw, seed=0) -> ir.Model:
    kh, kw = k
    rng = np.random.default_rng(seed)
    attrs = f"kernel_shape: ints = [{kh}, {kw}], strides: ints = [{stride[0]}, {stride[1]}], pads: ints = [{', '.join(map(str, pads))}], dilations: ints = [{dil[0]}, {dil[1]}]"
    b_in = ", B" if bias else ""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {cin}, {hw[0]}, {hw[1]}] x) => (float[N, {cout}, ?, ?] y) {{
        y = Conv <{attrs}> (x, W{b_in})
    }}
    """
    inits = {"W": rng.normal(size=(cout, cin, kh, kw)).astype(np.float32)}
    if bias:
        inits["B"] = rng.normal(size=cout).astype(np.float32)
    m = named_model_from_text(text, **inits)
    infer_shapes(m)
    return m


geometry = st.fixed_dictionaries({
    "cin": st.integers(1, 6), "cout": st.integers(1, 6),
    "k": st.tuples(st.integers(1, 4), st.integers(1, 4)),
    "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "pads": st.tuples(*[st.integers(0, 2)] * 4),
    "dil": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "bias": st.booleans(),
    "hw": st.tuples(st.integers(7, 12), st.integers(7, 12)),
})


def _kernel_for(method: str, k) -> tuple[int, int]:
    """The drawn kernel, moved to one the method applies to (no filtering: hypothesis draws stay valid)."""
    if method == "svd":
        return (1, 1)
    if method in ("spatial-svd", "cp"):
        return (max(2, k[0]), max(2, k[1]))
    return (3, k[1]) if k == (1, 1) else k


def _run_pair(ref: ir.Model, model: ir.Model):
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = random_inputs(input_specs(ref), batch=2, seed=1)
    return run_model(ref, feeds), run_model(model, feeds)


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "tucker", "depthwise"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometry)
def test_full_rank_reproduces_the_conv(method, g):
    g = dict(g, k=_kernel_for(method, g["k"]))
    model = conv_model(**g)
    ref = clone_model(model)
    info = factorize_layer(model.graph, next(iter(model.graph)), method, FULL[method])
    assert isinstance(info, dict), info
    assert info["weight_rel_error"] < 1e-5
    a, b = _run_pair(ref, model)
    assert a["y"].shape == b["y"].shape
    assert compare_outputs(a, b).within(1e-4), compare_outputs(a, b).to_json()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometry, r=st.integers(1, 6))
def test_cp_graph_computes_exactly_its_factors(g, r):
    """The four CP convs compute the conv whose weight is the CP reconstruction (any geometry)."""
    g = dict(g, k=_kernel_for("cp", g["k"]))
    model = conv_model(**g)
    w = const_array(next(iter(model.graph)).inputs[1])
    info = factorize_layer(model.graph, next(iter(model.graph)), "cp", r)
    if isinstance(info, str):
        assert "degenerate" in info or "CP fit failed" in info
        return
    by_name = {n.name: n for n in model.graph}
    factors = [const_array(by_name[f].inputs[1]) for f in info["factors"]]
    rebuilt = D.cp_rebuild(*factors)
    ref = conv_model(**g)
    conv = next(iter(ref.graph))
    conv.inputs[1].const_value = ir.tensor(rebuilt.astype(np.float32))
    a, b = _run_pair(ref, model)
    assert a["y"].shape == b["y"].shape
    assert compare_outputs(a, b).within(1e-4)
    assert abs(D.relative_error(w, rebuilt) - info["weight_rel_error"]) < 1e-4


@pytest.mark.parametrize("method", ["svd", "spatial-svd", "tucker", "depthwise", "cp"])
def test_error_falls_as_the_rank_grows(method):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 8, 1, 1) if method == "svd" else (12, 8, 3, 3)).astype(np.float32)
    if method == "svd":
        ranks = [1, 2, 4, 8]
        errs = [D.relative_error(w[:, :, 0, 0].T, np.matmul(*D.svd_matrix(w[:, :, 0, 0].T, r))) for r in ranks]
    elif method == "spatial-svd":
        errs = [D.relative_error(w, D.spatial_svd_rebuild(*D.spatial_svd(w, r))) for r in (1, 4, 8, 16, 24)]
    elif method == "tucker":
        errs = [D.relative_error(w, D.tucker2_rebuild(*D.tucker2(w, r, min(r, 8)))) for r in (1, 3, 6, 12)]
    elif method == "depthwise":
        errs = [D.relative_error(w, D.depthwise_rebuild(*D.depthwise_separable(w, m), 8)) for m in (1, 3, 6, 9)]
    else:
        errs = [D.cp(w, r)[1] for r in (2, 8, 32, 96)]
    assert all(b <= a + 1e-3 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]
    if method != "cp":
        assert errs[-1] < 1e-5  # full rank


def test_rank_rules_find_the_planted_rank():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(64, 6)) @ rng.normal(size=(6, 90)) + 0.05 * rng.normal(size=(64, 90))
    assert D.vbmf_rank(y) == 6
    assert D.vbmf_rank(y.T) == 6
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert D.rank_for_energy(s, 0.9) == 2 and D.rank_for_energy(s, 1.0) == 3 and D.rank_for_energy(s, 0.5) == 1


@pytest.mark.parametrize("shape, r", [((12, 8, 3, 3), 8), ((32, 16, 3, 3), 20), ((64, 64, 3, 3), 40)])
def test_tucker_and_cp_fit_as_well_as_tensorly(shape, r):
    """The hand-written HOOI and CP-ALS (tensorly took minutes per 512-channel layer) against
    tensorly's partial_tucker and parafac as the reference: Tucker-2 as close, CP within 0.01."""
    import warnings

    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac, partial_tucker

    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    r_out, r_in = min(r, shape[0]), min(r // 2, shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (core, (u_out, u_in)), _ = partial_tucker(w.astype(np.float64), rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=50, random_state=0)
        ref_cp = parafac(w.astype(np.float64), rank=r, init="svd", n_iter_max=100, tol=1e-7, random_state=0)
    ref_tucker = D.relative_error(w, np.einsum("ab,bcyx,dc->adyx", u_out, core, u_in))
    assert D.relative_error(w, D.tucker2_rebuild(*D.tucker2(w, r_out, r_in))) <= ref_tucker + 1e-3
    assert D.cp(w, r)[1] <= D.relative_error(w, tl.cp_to_tensor(ref_cp)) + 0.01
