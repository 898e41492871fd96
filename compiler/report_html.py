"""A single self-contained HTML page for a compile run: tables and matplotlib plots inlined as PNG.

Plots (each only when its data exists):

* per-layer MACs and parameters, before and after (factor nodes ``L_f1``,
  ``L_f2``, … are summed under their original layer ``L``);
* weight histograms of the largest layers, before and after (quantized,
  codebook and FP16 weights are rebuilt from their constants for the plot);
* sensitivity curves, when pruning computed them;
* per-layer latency before and after, from onnxruntime's profiler;
* the metric after each pass (SQNR against the input model, top-1 agreement
  or accuracy).

The page checks itself when it loads: every ``<img>`` must have decoded, and
then the title becomes ``onnxcc report: N plots rendered`` (or ``... ERROR``),
which the headless-browser test reads (at a desktop and at a phone width: ``, page wider than the
window`` is added when the page itself overflows instead of its tables scrolling).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.analysis import FACTOR_SUFFIX, layer_weight, per_layer_totals

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em auto;padding:0 1em;max-width:1100px;color:#222}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
td.name{min-width:14em;max-width:26em;overflow-wrap:anywhere;text-align:left}
tr.ok td{background:#e8f5e9}tr.warn td{background:#fff4e0}tr.fail td{background:#fdecea}
.banner{padding:.6em 1em;border-radius:4px;font-weight:600}.banner.ok{background:#e8f5e9;color:#1b5e20}
.banner.warn{background:#fff4e0;color:#8a4b00}.banner.fail{background:#fdecea;color:#b71c1c}
figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}img{max-width:100%;height:auto}
.skip{font-size:85%;color:#555}p,li,summary{overflow-wrap:anywhere}
@media (max-width:600px){body{padding:0 .4em}td,th{padding:3px 4px;font-size:85%}}
"""
_CHECK = """
<script>
window.addEventListener('error', function () { document.title = 'onnxcc report: ERROR'; });
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var fits = document.documentElement.scrollWidth <= window.innerWidth + 1;  // tables scroll on their own
  document.title = ok === imgs.length ? 'onnxcc report: ' + ok + ' plots rendered' + (fits ? '' : ', page wider than the window')
                                      : 'onnxcc report: ERROR ' + ok + '/' + imgs.length;
});
</script>
"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _bars(names, before, after, title, xlabel):
    import matplotlib.pyplot as plt

    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(names) + 1)))
    ax.barh(y - 0.2, before, 0.4, label="before")
    ax.barh(y + 0.2, after, 0.4, label="after")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _figures(report: Mapping[str, Any], before: ir.Model | None, after: ir.Model | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[tuple[str, str]] = []
    if before is not None and after is not None:
        b, a = per_layer_totals(before), per_layer_totals(after)
        names = sorted(b, key=lambda k: -b[k]["macs"])[:40]
        if names:
            figs.append(("Per-layer MACs (largest 40 layers of the input model)",
                         _bars(names, [b[n]["macs"] for n in names], [a.get(n, {}).get("macs", 0) for n in names], "MACs per layer", "MACs (batch 1)")))
            figs.append(("Per-layer parameters",
                         _bars(names, [b[n]["params"] for n in names], [a.get(n, {}).get("params", 0) for n in names], "Parameters per layer", "parameters")))
        nb = {n.name: n for n in before.graph if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")}
        na = {n.name: n for n in after.graph if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")}
        wb_all = {k: w for k, w in ((k, layer_weight(n)) for k, n in nb.items()) if w is not None}
        big = sorted(wb_all, key=lambda k: -wb_all[k].size)[:12]
        if big:
            cols = 4
            rows = math.ceil(len(big) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(11, 2.3 * rows), squeeze=False)
            for ax, name in zip(axes.flat, big):
                wb = wb_all[name].reshape(-1)
                lo, hi = float(wb.min()), float(wb.max())
                bins = np.linspace(lo, hi, 60) if hi > lo else 10
                ax.hist(wb, bins=bins, alpha=0.6, label="before")
                wa = layer_weight(na[name]) if name in na else None
                if wa is not None:
                    ax.hist(wa.reshape(-1), bins=bins, alpha=0.6, label="after")
                ax.set_title(name if name in na else f"{name} (replaced)", fontsize=8)
                ax.set_yscale("log")
                ax.set_xlabel("weight value", fontsize=6)
                ax.set_ylabel("count", fontsize=6)
                ax.tick_params(labelsize=6)
            for ax in list(axes.flat)[len(big):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=7)
            fig.tight_layout()
            figs.append(("Weight histograms of the 12 largest layers (log counts)", _png(fig)))
    curves = [c for p in report.get("passes", []) for s in (p.get("stats") or {}).get("steps", []) if isinstance(s, dict) and "sensitivity" in s for c in s["sensitivity"]["curves"]]
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colours = plt.get_cmap("tab20").colors
        for i, c in enumerate(curves[:60]):  # 20 colours x 3 line styles: no two curves look alike
            ax.plot(c["ratios"], c["loss"], marker="o", markersize=3, color=colours[i % 20], linestyle=("-", "--", ":")[i // 20 % 3],
                    label=c["layer"])
        ax.set_xlabel("channels removed (ratio)")
        ax.set_ylabel(f"metric loss ({report.get('sensitivity_metric', 'points')})")
        ax.set_title("Pruning sensitivity per channel space")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        figs.append(("Sensitivity curves (each channel space pruned alone)", _png(fig)))
    trainings = [(i, p) for i, p in enumerate(report.get("passes", [])) if (p.get("stats") or {}).get("history")]
    if trainings:  # the distill pass: loss curve and held-out metric per epoch
        fig, ax = plt.subplots(figsize=(8, 4))
        ax2 = None
        for i, p in trainings:
            hist = p["stats"]["history"]
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [h["train_loss"] for h in hist], marker="o", label=f"{i}:{p['pass']} training loss")
            if all("val_loss" in h for h in hist):
                ax.plot(ep, [h["val_loss"] for h in hist], marker="o", linestyle="--", label=f"{i}:{p['pass']} held-out loss")
            key = "val_accuracy" if all("val_accuracy" in h for h in hist) else ("val_agreement" if all("val_agreement" in h for h in hist) else None)
            if key:
                ax2 = ax2 or ax.twinx()
                ax2.plot(ep, [100 * h[key] for h in hist], marker="s", color="tab:green", label=f"{i}: held-out {key[4:]}")
                ax2.set_ylabel("held-out metric (%)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
        if ax2 is not None:
            ax2.legend(fontsize=7, loc="upper right")
        ax.set_title("Distillation: loss and held-out metric per epoch")
        fig.tight_layout()
        figs.append(("Training curves of the distill passes", _png(fig)))
    lat = report.get("layer_latency_us")
    if lat:
        lb, la = lat["before"], lat["after"]
        agg: dict[str, float] = {}
        for k, v in la.items():
            agg[FACTOR_SUFFIX.sub("", k)] = agg.get(FACTOR_SUFFIX.sub("", k), 0.0) + v
        names = sorted(lb, key=lambda k: -lb[k])[:40]
        if names:
            figs.append(("Per-layer latency from onnxruntime's profiler (batch 1, 2 threads; largest 40 layers)",
                         _bars(names, [lb[n] for n in names], [agg.get(n, 0.0) for n in names], "Kernel time per layer", "µs")))
    search = report.get("search")
    if search:
        done = [t for t in search["trials"] if t["state"] == "COMPLETE"]
        front = [t for t in done if t["number"] in search["pareto"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.scatter([t["ratio"] for t in done], [t["drop"] for t in done], s=18, color="tab:gray", label="trials")
        front.sort(key=lambda t: t["ratio"])
        ax.plot([t["ratio"] for t in front], [t["drop"] for t in front], marker="o", color="tab:blue", label="Pareto front")
        best = next((t for t in done if t["number"] == search["best"]), None)
        if best:
            ax.scatter([best["ratio"]], [best["drop"]], s=90, marker="*", color="tab:red", label=f"written (trial {best['number']})", zorder=3)
        ax.axvline(search["target"]["ratio"], color="tab:green", linestyle="--", label="target")
        if search.get("budget") is not None:
            ax.axhline(search["budget"], color="tab:orange", linestyle=":", label="budget")
        ax.set_xlabel(f"{search['target']['kind']} ratio to the input")
        ax.set_ylabel("metric drop (points)")
        ax.set_title("Search: every finished trial")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs.append(("Search trials and their Pareto front (ratio vs metric drop)", _png(fig)))
    passes = [p for p in report.get("passes", []) if p.get("verify_vs_original")]
    if passes:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        xs = np.arange(len(passes))
        sq = [120.0 if p["verify_vs_original"].get("identical") else min(float(p["verify_vs_original"].get("min_sqnr_db") or 0.0), 120.0)
              for p in passes]
        ax.plot(xs, sq, marker="o", color="tab:blue")
        ax.set_ylabel("SQNR vs input (dB, capped at 120)", color="tab:blue")
        ax.set_xticks(xs, [f"{i}:{p['pass']}" for i, p in enumerate(passes)], rotation=20, fontsize=8)
        ax2 = ax.twinx()
        acc = [p["verify_vs_original"].get("accuracy_cand") for p in passes]
        agree = [p["verify_vs_original"]["outputs"][0].get("top1") if p["verify_vs_original"].get("outputs") else None for p in passes]
        series, label = (acc, "accuracy") if all(a is not None for a in acc) else (agree, "top-1 agreement")
        if all(v is not None for v in series):
            ax2.plot(xs, [100 * v for v in series], marker="s", color="tab:orange")
            ax2.set_ylabel(f"{label} (%)", color="tab:orange")
        ax.set_title("Metric after each pass")
        fig.tight_layout()
        figs.append(("Metric after each pass, against the input model", _png(fig)))
    return figs


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[str]) -> str:
    """A table that scrolls sideways on its own at a narrow width, instead of the whole page."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def layer_rows(report: Mapping[str, Any], after: ir.Model | None) -> list[dict[str, Any]]:
    """One row per weighted layer of the output: precision, fused into an integer kernel or not
    (from onnxruntime's optimized graph), input scale, weight SQNR, the error it adds (dB of SQNR
    lost across it), profiled latency before and after, and why it stayed float."""
    precision = dict((report.get("provenance") or {}).get("precision") or {})
    quant: dict[str, Any] = {}
    why: dict[str, str] = {}
    for p in report.get("passes", []):
        stats = p.get("stats") or {}
        if isinstance(stats.get("layers"), Mapping) and p["pass"] in ("quantize", "quantize-dynamic", "weight-only"):
            quant = stats["layers"]
        for s in p.get("skipped", []):
            why.setdefault(str(s.get("layer")), str(s.get("reason")))
    lat = report.get("layer_latency_us") or {}
    lb, la = lat.get("before", {}), {}
    for k, v in lat.get("after", {}).items():
        la[FACTOR_SUFFIX.sub("", k)] = la.get(FACTOR_SUFFIX.sub("", k), 0.0) + v
    ops = {n.name: n.op_type for n in after.graph} if after is not None else {}
    names = list(precision) or [k for k, op in ops.items() if op in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    rows = []
    for name in names:
        q = quant.get(name, {})
        prec = precision.get(name, "float32")
        rows.append({
            "layer": name, "op": q.get("op") or ops.get(name), "precision": prec, "fused": q.get("fused"),
            "input_scale": q.get("input_scale"), "weight_sqnr_db": q.get("weight_sqnr_db"), "error_db": q.get("error_db"), "noise_added_db": q.get("noise_added_db"),
            "latency_before_us": lb.get(name), "latency_after_us": la.get(name),
            "why_float": why.get(name) if prec == "float32" else None,
        })
    return rows


def _banner(report: Mapping[str, Any]) -> str:
    m = report.get("metric") or {}
    drop = m.get("drop_points")
    budget = report.get("budget")
    if report.get("status") == "failed":
        return f"<p class='banner fail'>failed: {html.escape(str(report.get('error')))}</p>"
    if report.get("warning"):
        return f"<p class='banner warn'>{html.escape(str(report['warning']))}</p>"
    text = "verified" + (f": drop {drop:.2f} points" if drop is not None else "") + (f" within the budget of {budget:g}" if budget is not None else "")
    return f"<p class='banner ok'>{html.escape(text)}</p>"


def render(report: Mapping[str, Any], before: ir.Model | None = None, after: ir.Model | None = None, title: str = "onnxcc compile report") -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(_banner(report))
    if report.get("input"):
        parts.append(f"<p>{html.escape(str(report.get('input')))} → {html.escape(str(report.get('output', '')))}</p>")
    b, a = report.get("before", {}), report.get("after", {})
    if b:
        rows = []
        for key, label in (("params", "parameters"), ("macs", "MACs"), ("nodes", "nodes"), ("file_bytes", "file bytes"), ("latency_ms", "latency ms (batch 1)")):
            if b.get(key) is not None:
                ratio = a.get(key) / b[key] if b.get(key) and a.get(key) is not None else None
                rows.append(f"<tr><td>{label}</td><td>{_fmt(b[key])}</td><td>{_fmt(a.get(key))}</td><td>{'-' if ratio is None else f'{ratio:.3f}x'}</td></tr>")
        parts.append("<h2>Totals</h2>" + _table(["", "before", "after", "ratio"], rows))
        proto = report.get("latency_protocol")
        if proto:
            parts.append(f"<p class='skip'>latency: {html.escape(str(proto.get('method')))}, {proto.get('threads')} threads, batch {proto.get('batch')}</p>")
    metric = report.get("metric")
    if metric:
        parts.append(_table(list(metric), ["<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in metric.values()) + "</tr>"]))
    passes = report.get("passes", [])
    if passes:
        rows = []
        for p in passes:
            v = p.get("verify_vs_original") or {}
            drop = v.get("metric_drop")
            cls = "ok" if p.get("exact") or drop is None or drop <= (report.get("budget") if report.get("budget") is not None else 5.0) else "warn"
            rows.append(
                f"<tr class='{cls}'><td>{html.escape(p['pass'])}</td><td>{'exact' if p.get('exact') else 'lossy'}</td><td>{_fmt(p.get('seconds'))}</td>"
                f"<td>{len(p.get('changed', []))}</td><td>{len(p.get('skipped', []))}</td><td>{_fmt(v.get('min_sqnr_db'))}</td><td>{_fmt(v.get('metric_drop'))}</td></tr>"
            )
        parts.append("<h2>Passes</h2>" + _table(["pass", "kind", "seconds", "changed", "skipped", "SQNR vs input (dB)", "metric drop (pts)"], rows))
        for p in passes:
            sk = p.get("skipped", [])
            if sk:
                items = "".join(f"<li>{html.escape(str(s.get('layer')))}: {html.escape(str(s.get('reason')))}</li>" for s in sk[:50])
                more = f"<li>… {len(sk) - 50} more in the JSON report</li>" if len(sk) > 50 else ""
                parts.append(f"<details class='skip'><summary>{html.escape(p['pass'])}: {len(sk)} skipped</summary><ul>{items}{more}</ul></details>")
    layers = layer_rows(report, after)
    if layers:
        cols = [("layer", "layer"), ("op", "op"), ("precision", "precision"), ("fused", "fused (integer kernel)"),
                ("input_scale", "input scale"), ("weight_sqnr_db", "weight SQNR (dB)"), ("error_db", "SQNR lost (dB)"), ("noise_added_db", "noise added (dB)"),
                ("latency_before_us", "latency before (µs)"), ("latency_after_us", "latency after (µs)"), ("why_float", "why float")]
        rows = []
        for r in layers:
            cls = "warn" if r["fused"] is False or r["why_float"] else ""
            cells = "".join(f"<td class='name'>{_fmt(r[k])}</td>" if k in ("layer", "why_float") else f"<td>{_fmt(r[k])}</td>" for k, _ in cols)
            rows.append(f"<tr class='{cls}'>{cells}</tr>")
        parts.append("<h2>Layers</h2>" + _table([c for _, c in cols], rows))
    figs = _figures(report, before, after)
    if figs:
        parts.append("<h2>Plots</h2>")
        for caption, data in figs:
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(_CHECK + "</body></html>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike, report: Mapping[str, Any], before: ir.Model | None = None, after: ir.Model | None = None) -> None:
    """Write the page atomically (a temporary file renamed into place)."""
    from onnxcc.compiler.files import atomic_write

    text = render(report, before, after)
    with atomic_write(path, what="HTML report") as tmp:
        tmp.write_text(text, encoding="utf-8")
