"""`onnxcc search`: Optuna over prune ratios (and factorization, INT8, storage) under the budget,
on the bundled trained sample: the budget holds for every trial and for the written model, the
written model is its trial's recipe compiled again, a study resumes, a failing trial is recorded
with its message, a trial whose worker died is retried, and a Ray local cluster finds the same
best trial as the in-process executor for one seed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from onnxcc.compiler import search as S  # noqa: E402
from onnxcc.compiler.api import compile_model  # noqa: E402
from onnxcc.compiler.errors import VerificationError  # noqa: E402
from tests.test_budget import CALIB, EVAL, LABELS, SAMPLE, accuracy  # noqa: E402

FAST = dict(calibration=CALIB, budget=1.0, factorize=())


def _weights(model) -> dict[str, bytes]:
    return {v.name: v.const_value.numpy().tobytes() for v in model.graph.initializers.values()}


def test_search_cli_reaches_the_target_inside_the_budget_and_writes_its_best_trial(cli, tmp_path):
    out, rep, study = tmp_path / "s.onnx", tmp_path / "r.json", tmp_path / "study.db"
    r = cli("search", SAMPLE, "-o", out, "--target", "macs=0.5", "--calib", CALIB, "--data", EVAL, "--labels", LABELS,
            "--budget", "1", "--trials", "3", "--no-factorize", "--study", study, "--report", rep, "--html", tmp_path / "r.html")
    assert r.code == 0, r.err
    assert "Search trials and their Pareto front" in (tmp_path / "r.html").read_text()
    s = json.loads(rep.read_text())["search"]
    done = [t for t in s["trials"] if t["state"] == "COMPLETE"]
    assert len(done) == 3 and all(t["drop"] <= 1.0 for t in done)
    best = next(t for t in done if t["number"] == s["best"])
    assert s["reached"] and best["ratio"] <= 0.5 and s["best"] in s["pareto"]
    assert accuracy(out) >= accuracy(SAMPLE) - 0.01  # the budget, recomputed on the written model
    assert any(step["name"] == "prune" for step in done[0]["recipe"])  # the greedy allocation went first
    again = compile_model(SAMPLE, [(x["name"], x["options"]) for x in best["recipe"]], calibration=CALIB, measure_latency=False)
    from onnxcc.compiler.ir_utils import load_model

    assert _weights(again.model) == _weights(load_model(out))  # reproducible from the recorded recipe
    assert "trial" in r.out and "Pareto front" in r.out


def test_a_search_resumes_from_its_study(tmp_path):
    study = tmp_path / "study.db"
    first = S.search(SAMPLE, "macs=0.5", trials=2, study=study, **FAST).report["search"]["trials"]
    second = S.search(SAMPLE, "macs=0.5", trials=3, study=study, **FAST).report["search"]["trials"]
    assert [t["number"] for t in second] == [0, 1, 2]
    assert [t["params"] for t in second[:2]] == [t["params"] for t in first]  # not run again


def test_a_failing_trial_is_recorded_with_its_message(tmp_path):
    calls = []

    def runner(job, recipe):
        calls.append(recipe)
        if len(calls) == 2:
            raise VerificationError("pass 'prune' produced a model onnxruntime rejects: injected")
        return S.run_trial(job, recipe)

    trials = S.search(SAMPLE, "macs=0.5", trials=3, trial_runner=runner, sampler="nsga2", **FAST).report["search"]["trials"]
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert len(failed) == 1 and "injected" in failed[0]["error"] and "VerificationError" in failed[0]["error"]
    assert sum(t["state"] == "COMPLETE" for t in trials) == 2


def test_a_trial_whose_worker_died_is_retried_with_its_parameters(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "GRACE_S", 1)
    monkeypatch.setattr(S, "HEARTBEAT_S", 1)
    study = tmp_path / "study.db"
    S.search(SAMPLE, "macs=0.5", trials=1, study=study, **FAST)
    url = f"sqlite:///{study.resolve()}"
    st = optuna.load_study(study_name="onnxcc-macs", storage=S.study_storage(url))
    prev = st.trials[0]
    st.enqueue_trial(prev.params)
    dead = st.ask(fixed_distributions=prev.distributions)  # a worker took it, then died: no tell, no heartbeat
    st._storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    trials = S.search(SAMPLE, "macs=0.5", trials=2, study=study, **FAST).report["search"]["trials"]
    assert trials[dead.number]["state"] == "FAIL"
    retry = [t for t in trials if t.get("retry_of") == dead.number]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE" and retry[0]["params"] == prev.params


@pytest.mark.slow
def test_local_processes_and_a_ray_cluster_share_one_study_and_ray_finds_the_in_process_best(tmp_path):
    pytest.importorskip("ray")
    local = S.search(SAMPLE, "macs=0.4", trials=3, seed=3, **FAST).report["search"]
    on_ray = S.search(SAMPLE, "macs=0.4", trials=3, seed=3, ray="local", **FAST).report["search"]
    by_number = {t["number"]: t for t in local["trials"]}
    assert on_ray["executor"] == "ray" and on_ray["best"] == local["best"]
    assert on_ray["trials"][on_ray["best"]]["params"] == by_number[local["best"]]["params"]
    pool = S.search(SAMPLE, "macs=0.4", trials=2, workers=2, study=tmp_path / "p.db", **FAST).report["search"]
    assert pool["executor"] == "process" and sum(t["state"] == "COMPLETE" for t in pool["trials"]) >= 2
    assert all(t["drop"] <= 1.0 for t in pool["trials"] if t["state"] == "COMPLETE")


def test_bad_targets_are_bad_input(cli, tmp_path):
    r = cli("search", SAMPLE, "-o", tmp_path / "s.onnx", "--target", "speed=2", "--calib", CALIB)
    assert r.code == 2 and "--target speed=2" in r.err and not (tmp_path / "s.onnx").exists()
    assert np.isclose(S.parse_target("file=0.25").value, 0.25)
    r = cli("search", SAMPLE, "-o", tmp_path / "s.onnx", "--target", "macs=0.5", "--calib", CALIB, "--trials", "0")
    assert r.code == 2 and "--trials" in r.err


def test_sensitivity_shared_over_two_processes_gives_the_same_curves(cli):
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.compiler.pipeline import Pipeline

    model = load_model(SAMPLE)
    Pipeline(["fold"], verify=False).run(model)
    cal = CalibrationSet.load(CALIB, model)
    one = S.sensitivity(model, cal, ratios=(0.5,), samples=16)
    two = S.sensitivity(model, cal, workers=2, ratios=(0.5,), samples=16)
    assert len(one.curves) >= 6
    assert [(c.key, c.loss, c.macs_saved) for c in two.curves] == [(c.key, c.loss, c.macs_saved) for c in one.curves]
    r = cli("sensitivity", SAMPLE, "--calib", CALIB, "--ratios", "0.5", "--samples", "16", "--workers", "2", "--json")
    assert r.code == 0 and len(json.loads(r.out)["spaces"]) == len(one.curves)


def test_first_trials_are_the_greedy_allocation_then_the_shipped_recipes():
    """Trial 0 is exactly ``prune --target-macs T --reconstruct`` under the budget (same ratios,
    same MACs), trial 1 the faster-2x recipe's factorization (spatial SVD at rank 0.2 on every
    layer), so the search's best is never worse than either."""
    from onnxcc.compiler.ir_utils import load_model

    space = S.build_space(load_model(SAMPLE), S.parse_target("latency=0.5"))
    assert space.recipes and all(p["quantize"] == "int8" for p in space.recipes)  # int8-x86 alone is the seed
    assert {(p["factorize"], p["factorize_rank"]) for p in space.recipes} == {("spatial-svd", 0.2)}
    rep = S.search(SAMPLE, "macs=0.3", trials=2, seed=0, calibration=CALIB, budget=1.0).report["search"]
    greedy = compile_model(SAMPLE, [("fold", {}), ("prune", {"target_macs": 0.3, "reconstruct": True}), ("fold", {})],
                           calibration=CALIB, budget=1.0, measure_latency=False).report
    t0, t1 = rep["trials"][0], rep["trials"][1]
    assert abs(t0["ratio"] - greedy["after"]["macs"] / greedy["before"]["macs"]) < 1e-4
    ratios = next(p for p in greedy["passes"] if p["pass"] == "prune")["stats"]["steps"][-1]["ratios"]
    assert {k[6:]: v for k, v in t0["params"].items() if k.startswith("prune:") and v} == pytest.approx(
        {k: v for k, v in ratios.items() if v})
    fact = next(s for s in t1["recipe"] if s["name"] == "factorize")["options"]
    assert fact["method"] == "spatial-svd" and fact["rank"] == 0.2 and not fact.get("layer_rank") and not fact.get("exclude")
    assert not any(s["name"] == "prune" for s in t1["recipe"]) and t1["ratio"] < 1.0
    best = next(t for t in rep["trials"] if t["number"] == rep["best"])
    assert best["ratio"] <= max(0.3, min(t0["ratio"], t1["ratio"])) + 1e-9


def test_heavy_layers_choose_their_own_factorization_and_precision():
    """Per-layer choices: a layer that chose rank 0 stays one node, one that chose float stays
    float while its neighbours run integer kernels, and the recipe is what the pipeline ran."""
    from onnxcc.compiler.analysis import layer_precisions
    from onnxcc.compiler.ir_utils import load_model

    model = load_model(SAMPLE)
    space = S.build_space(model, S.parse_target("latency=0.5"), factorize=("tucker",))
    assert len(space.layers) == min(S.PER_LAYER, sum(1 for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")))
    assert space.seed["quantize"] == "int8" and all(space.seed[f"int8:{n}"] for n in space.layers)
    keep, cut, fp = space.layers[0], space.layers[1], space.layers[2]
    params = {**{k: v for k, v in space.seed.items() if k.startswith("prune:")}, "factorize": "tucker", "factorize_rank": 0.5,
              **{f"factorize:{n}": 0.0 for n in space.layers}, f"factorize:{cut}": 0.5,
              "quantize": "int8", **{f"int8:{n}": True for n in space.layers}, f"int8:{fp}": False}
    recipe = space.sample(optuna.trial.FixedTrial(params))
    fact = dict(recipe)["factorize"]
    assert keep in fact["exclude"] and fact["layer_rank"] == (f"{cut}=0.5",)
    res = compile_model(SAMPLE, recipe, calibration=CALIB, measure_latency=False)
    names = {n.name for n in res.model.graph}
    assert keep in names  # rank 0: left alone
    prec = layer_precisions(res.model)
    assert prec[fp] == "float32" and prec[keep] == "int8", prec
    assert f"{cut}_f1" in names and cut not in names, sorted(names)  # its own rank: factorized


@pytest.mark.slow
def test_a_search_killed_with_sigkill_mid_trial_resumes_and_retries_that_trial(tmp_path, monkeypatch):
    """A real worker death: ``onnxcc search`` in its own process, SIGKILLed while a trial runs
    (no tell, no clean-up); the next search fails that trial once its heartbeat is stale and
    retries it with the same parameters."""
    import os
    import signal
    import subprocess
    import sys

    study = tmp_path / "study.db"
    cmd = [sys.executable, "-c", "from onnxcc.compiler.cli import main; main()", "search", str(SAMPLE), "-o", str(tmp_path / "s.onnx"),
           "--target", "macs=0.5", "--calib", str(CALIB), "--budget", "1", "--trials", "6", "--no-factorize", "--study", str(study)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage, running = f"sqlite:///{study.resolve()}", None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and running is None and proc.poll() is None:
            time.sleep(0.2)
            try:
                st = optuna.load_study(study_name="onnxcc-macs", storage=S.study_storage(storage))
            except Exception:  # the study is not created yet
                continue
            done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials)
            # mid-trial: running with its parameters drawn (a trial killed before its first
            # suggestion has none to retry with, and is retried with fresh ones)
            running = next((t for t in st.trials if t.state == optuna.trial.TrialState.RUNNING and t.params), None) if done >= 1 else None
        assert running is not None, "the search never had a running trial after a finished one"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    monkeypatch.setattr(S, "GRACE_S", 1)
    time.sleep(1.5)
    trials = S.search(SAMPLE, "macs=0.5", study=study, trials=done + 1, **FAST).report["search"]["trials"]
    assert trials[running.number]["state"] == "FAIL"
    retry = [t for t in trials if t.get("retry_of") == running.number]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE" and retry[0]["params"] == trials[running.number]["params"]


def test_ray_tasks_never_ask_for_more_cpus_than_a_node_has():
    """A task asking for 2 CPUs on a cluster of 1-CPU nodes would wait forever (Ray calls it
    infeasible and keeps it pending): the request is capped; a resource no node offers is bad input."""
    from onnxcc.compiler.errors import BadInputError

    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.0, "serve": 1.0}},
                    {"Alive": False, "Resources": {"CPU": 8.0}}]

    assert S.feasible_threads(FakeRay, 2, None) == 1
    assert S.feasible_threads(FakeRay, 1, "serve") == 1
    with pytest.raises(BadInputError, match="no node"):
        S.feasible_threads(FakeRay, 1, "gpu-box")
