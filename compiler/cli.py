"""The ``onnxcc`` command line.

Exit codes: 0 success, 1 verification or budget failure, 2 bad input. Every
error is one line on stderr (``onnxcc: error: ...``); ``--verbose`` adds the
traceback. Commands that write a model check the output path before doing
any work, never overwrite the input unless ``--in-place``, and write
atomically, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

import click

from compiler.errors import BadInputError, OnnxccError

logger = logging.getLogger("onnxcc")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="onnxcc: %(levelname)s: %(message)s", stream=sys.stderr, force=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"{path}: report folder '{parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".onnxcc-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _load_labels(path: str | None):
    if path is None:
        return None
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: cannot read labels: {e}") from e


metric_option = click.option(
    "--metric", type=click.Choice(["top1", "top5"]), default="top1", show_default=True,
    help="with --labels: accuracy metric (without labels: top-1 agreement with the original)",
)

common_model_options = [
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDxD", help="concrete shape for an input with dynamic dims"),
]

# Every command that writes a model: where, its JSON report, and whether OUT may be the input.
output_options = [
    click.option("-o", "--output", "out", required=True, type=click.Path(), help="where to write the result"),
    click.option("--report", type=click.Path(), help="write a JSON report"),
    click.option("--in-place", is_flag=True, help="allow OUT to be the input file"),
]

# Commands whose lossy result is gated: labels make the metric accuracy, the budget bounds its drop.
budget_options = [
    click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy"),
    click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points; exceeded: exit 1, nothing written"),
]


def _budget(max_drop: float | None):
    from compiler.pipeline import Budget

    return Budget(max_drop=max_drop) if max_drop is not None else None


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="debug logging and tracebacks")
@click.option("--quiet", "-q", is_flag=True, help="errors only")
@click.version_option(package_name="onnxcc")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """onnxcc: make exported ONNX CNNs smaller and faster, verified by onnxruntime."""
    _setup_logging(verbose, quiet)
    from compiler import progress

    progress.enable(not quiet)
    ctx.obj = {"verbose": verbose, "quiet": quiet}


# --------------------------------------------------------------------------- transform commands
def run_transform(
    ctx: click.Context,
    src: str,
    out: str,
    specs: Sequence[Any],
    *,
    calib: str | None = None,
    labels: str | None = None,
    budget: Any = None,
    report: str | None = None,
    in_place: bool = False,
    input_shapes: Sequence[str] = (),
    external_data: bool | None = None,
    verify: bool = True,
    seed: int = 0,
    metric: str = "top1",
    verify_samples: int = 8,
) -> None:
    from compiler.analysis import analyze, compare_table
    from compiler.calibration import CalibrationSet, parse_input_shapes
    from compiler.ir_utils import check_output_path, load_model, save_model
    from compiler.pipeline import Pipeline

    check_output_path(out, src, in_place=in_place)
    if report:
        check_output_path(report, src)
    shapes = parse_input_shapes(input_shapes)
    pipeline = Pipeline(
        specs, budget=budget, input_shapes=shapes, labels=_load_labels(labels), verify=verify, seed=seed,
        top_k=5 if metric == "top5" else 1, verify_samples=verify_samples,
    )
    model = load_model(src)
    calibration = CalibrationSet.load(calib, model) if calib else None
    before = analyze(model, path=src)
    result = pipeline.run(model, calibration)
    save_model(result.model, out, external_data=external_data)
    after = analyze(result.model, path=out)
    quiet = ctx.obj.get("quiet") if ctx.obj else False
    if not quiet:
        for step in result.steps:
            verdict = ""
            if step.vs_previous is not None:
                verdict = f", max rel. error {step.vs_previous.max_rel:.2e}"
                if not step.exact and step.vs_original is not None:
                    drop = step.vs_original.metric_drop()
                    sq = step.vs_original.min_sqnr
                    verdict += f", SQNR {sq:.1f} dB vs original" + (f", metric drop {drop:.2f} pts" if drop is not None else "")
            size = step.report.stats.get("size_after") if isinstance(step.report.stats, dict) else None
            if size:
                verdict += f", {size['bytes'] / 1e6:.2f} MB, zipped {size['zipped_bytes'] / 1e6:.2f} MB"
            click.echo(
                f"{step.name}: {'exact' if step.exact else 'lossy'}, {len(step.report.changed)} changes, "
                f"{len(step.report.skipped)} skipped{verdict}"
            )
            for s in step.report.skipped[:20]:
                click.echo(f"  skipped {s.layer}: {s.reason}")
            if len(step.report.skipped) > 20:
                click.echo(f"  ... {len(step.report.skipped) - 20} more in the report")
        click.echo(compare_table(before, after))
        click.echo(f"wrote {out}")
    if report:
        write_json_atomic(report, {"input": str(src), "output": str(out), "before": before.to_json(), "after": after.to_json(), **result.to_json()})


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--opset", type=int, default=None, help="upgrade the default-domain opset first")
@click.option("--no-bn", is_flag=True, help="keep BatchNormalization nodes")
@click.option("--external-data/--no-external-data", default=None, help="store weights in OUT.data (default: only over 2 GB)")
@_apply(common_model_options)
@click.pass_context
def fold(ctx, src, out, opset, no_bn, report, in_place, external_data, input_shapes):
    """Exact clean-up: fold constants, BatchNorm, shape chains; drop dead and no-op nodes."""
    opts: dict[str, Any] = {"fold_batchnorm": not no_bn}
    if opset is not None:
        opts["opset"] = opset
    run_transform(ctx, src, out, [("fold", opts)], report=report, in_place=in_place, input_shapes=input_shapes, external_data=external_data)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--recipe", help="a shipped recipe (lossless, int8-x86, faster-2x, smallest) or a YAML/JSON file")
@click.option("--pass", "pass_names", multiple=True, metavar="NAME[:k=v,...]", help="add a pass (repeatable)")
@click.option("--prune", "prune_ratio", type=float, default=None, help="shortcut: structured pruning at this channel ratio (+ reconstruction with --calib)")
@click.option("--factorize", "factorize_spec", metavar="METHOD[:RANK]", default=None, help="shortcut: e.g. spatial-svd:0.25")
@click.option("--sparsify", "sparsity", type=float, default=None, help="shortcut: magnitude sparsity")
@click.option("--codebook", "codebook_bits", type=click.IntRange(2, 8), default=None, help="shortcut: k-means weight sharing with this many bits")
@click.option("--quantize", "quant_method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default=None, help="shortcut: INT8 QDQ (equalize first)")
@click.option("--calib", type=click.Path(), help="calibration data (.npy, .npz or image folder), read once for every pass")
@_apply(budget_options)
@click.option("--html", "html_path", type=click.Path(), help="write a self-contained HTML report with plots (report extra)")
@click.option("--no-latency", is_flag=True, help="do not time the model before and after")
@click.option("--seed", type=int, default=0)
@_apply(common_model_options)
@metric_option
@click.pass_context
def compile(ctx, src, out, recipe, pass_names, prune_ratio, factorize_spec, sparsity, codebook_bits, quant_method, calib, labels, budget, report, html_path, no_latency, in_place, seed, input_shapes, metric):  # noqa: A001
    """Run a verified pipeline from a recipe, --pass entries and/or shortcut flags (sound order)."""
    from compiler.api import compile_model, json_report, resolve_recipe, specs_from_flags
    from compiler.calibration import CalibrationSet, parse_input_shapes
    from compiler.ir_utils import check_output_path, load_model, save_model
    from compiler.pipeline import PassSpec

    check_output_path(out, src, in_place=in_place)
    for extra in (report, html_path):
        if extra:
            check_output_path(extra, src)
    if html_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise BadInputError("--html needs matplotlib: pip install 'onnxcc[report]'") from e
    specs: list[PassSpec] = resolve_recipe(recipe) if recipe else []
    for item in pass_names:
        name, _, rest = item.partition(":")
        opts = {}
        for kv in filter(None, rest.split(",")):
            k, sep, v = kv.partition("=")
            if not sep:
                raise BadInputError(f"--pass {item}: options are k=v pairs")
            opts[k] = v
        specs.append(PassSpec(name, opts))
    if any(x is not None for x in (prune_ratio, factorize_spec, sparsity, codebook_bits, quant_method)):
        flags = specs_from_flags(prune=prune_ratio, factorize=factorize_spec, sparsify=sparsity, codebook=codebook_bits,
                                 quantize=quant_method, calibrated=bool(calib))
        specs += flags[1:] if specs else flags  # a recipe already folds first
    if not specs:
        raise BadInputError("nothing to do: give --recipe, --pass or a shortcut flag")
    model = load_model(src)
    calibration = CalibrationSet.load(calib, model) if calib else None
    res = compile_model(
        model, specs, calibration=calibration, labels=_load_labels(labels), budget=budget, seed=seed,
        input_shapes=parse_input_shapes(input_shapes), top_k=5 if metric == "top5" else 1,
        measure_latency=not no_latency, profile_layers=bool(html_path), verify_samples=64 if budget is not None else 8,
    )
    res.report.update(input=str(src), output=str(out))
    page = None
    if html_path:  # rendered before anything is written: a failure leaves no output behind
        from compiler.report_html import render

        page = render(res.report, res.report["_models"]["before"], res.model)
    save_model(res.model, out)
    quiet = ctx.obj.get("quiet") if ctx.obj else False
    if not quiet:
        for step in res.result.steps:
            v = step.vs_original
            extra = "" if v is None else f", SQNR {v.min_sqnr:.1f} dB" + (f", drop {v.metric_drop():.2f} pts" if v.metric_drop() is not None else "")
            click.echo(f"{step.name}: {'exact' if step.exact else 'lossy'}, {len(step.report.changed)} changed, {len(step.report.skipped)} skipped{extra}")
        b, a = res.report["before"], res.report["after"]
        lat = f", latency {res.report['latency_ratio']:.2f}x" if "latency_ratio" in res.report else ""
        click.echo(f"MACs {a['macs'] / max(b['macs'], 1):.2f}x, parameters {a['params'] / max(b['params'], 1):.2f}x, file {a['file_bytes'] / max(b['file_bytes'], 1):.2f}x{lat}")
        click.echo(f"wrote {out}")
    if report:
        write_json_atomic(report, json_report(res.report))
    if page is not None:
        tmp = f"{html_path}.tmp-{os.getpid()}"
        Path(tmp).write_text(page, encoding="utf-8")
        os.replace(tmp, html_path)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--ratio", type=float, default=0.5, show_default=True, help="fraction of channels to remove per space (overall with --global)")
@click.option("--criterion", type=click.Choice(["l1", "l2", "bn_scale", "fpgm", "activation", "zero", "reconstruction"]), default="l1", show_default=True)
@click.option("--global", "global_ranking", is_flag=True, help="rank channels across spaces (each capped by --max-space-ratio)")
@click.option("--max-space-ratio", type=float, default=0.9, show_default=True)
@click.option("--round-to", type=int, default=1, show_default=True, help="keep channel counts a multiple of N")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="leave the spaces of matching node names alone (repeatable)")
@click.option("--layer-ratio", multiple=True, metavar="PATTERN=R", help="ratio for the spaces of matching node names (repeatable)")
@click.option("--calib", type=click.Path(), help="calibration data: activation criterion and bias compensation")
@click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy")
@click.option("--allow-lossy", is_flag=True, help="criterion zero: also remove dead channels compensated only approximately")
@click.option("--no-compensate", is_flag=True, help="do not fold removed channels' mean activation into the next bias")
@click.option("--reconstruct", is_flag=True, help="refit the layers after each cut by least squares on --calib data")
@click.option("--target-macs", type=float, default=None, help="automatic per-space ratios so MACs <= this fraction (sensitivity on --calib)")
@click.option("--target-params", type=float, default=None, help="automatic per-space ratios so parameters <= this fraction")
@click.option("--target-latency", type=float, default=None, help="automatic per-space ratios so measured latency <= this fraction (batch 1, 2 threads)")
@click.option("--steps", type=int, default=1, show_default=True, help="reach the ratio/target in N prune(+reconstruct) increments")
@click.option("--samples", type=int, default=64, show_default=True, help="calibration samples used at most")
@click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points; exceeded: exit 1, nothing written")
@click.option("--force", is_flag=True, help="write the model even when the budget is exceeded (the report says by how much)")
@_apply(common_model_options)
@metric_option
@click.pass_context
def prune(ctx, src, out, ratio, criterion, global_ranking, max_space_ratio, round_to, exclude, layer_ratio, calib, labels, allow_lossy, no_compensate, reconstruct, target_macs, target_params, target_latency, steps, samples, budget, force, report, in_place, input_shapes, metric):
    """Structured channel pruning (runs fold first). --criterion zero is lossless."""
    opts = {
        "ratio": ratio, "criterion": criterion, "global_ranking": global_ranking, "max_space_ratio": max_space_ratio,
        "round_to": round_to, "exclude": tuple(exclude), "layer_ratio": tuple(layer_ratio),
        "allow_lossy": allow_lossy, "compensate": not no_compensate, "reconstruct": reconstruct, "calib_samples": samples,
        "target_macs": target_macs, "target_params": target_params, "target_latency": target_latency, "steps": steps,
    }
    run_transform(
        ctx, src, out, [("fold", {}), ("prune", opts)], calib=calib, labels=labels,
        budget=None if force else _budget(budget), report=report, in_place=in_place,
        input_shapes=input_shapes, metric=metric,
    )


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--method", type=click.Choice(["svd", "spatial-svd", "tucker", "cp", "depthwise"]), default="tucker", show_default=True,
              help="svd: Gemm/MatMul/1x1 conv; the others: kxk convs")
@click.option("--rank", type=float, default=None, help=">=1: absolute rank (depthwise: multiplier); <1: fraction of each layer's MACs kept [default 0.5]")
@click.option("--energy", type=float, default=None, help="rank keeping this fraction of the squared singular values")
@click.option("--vbmf", is_flag=True, help="ranks by empirical VBMF")
@click.option("--target-macs", type=float, default=None, help="whole-model MACs ratio to reach")
@click.option("--layer-rank", multiple=True, metavar="PATTERN=R", help="per-layer rank (repeatable)")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="leave matching node names alone (repeatable)")
@click.option("--calib", type=click.Path(), help="calibration data: refit each layer's last factor by least squares")
@click.option("--no-refit", is_flag=True, help="with --calib: do not refit")
@click.option("--samples", type=int, default=64, show_default=True, help="calibration samples used at most")
@click.option("--keep-if-faster", is_flag=True, help="keep only the factorizations onnxruntime measures faster (timing-dependent)")
@_apply(budget_options)
@_apply(common_model_options)
@metric_option
@click.pass_context
def factorize(ctx, src, out, method, rank, energy, vbmf, target_macs, layer_rank, exclude, calib, no_refit, samples, keep_if_faster, labels, budget, report, in_place, input_shapes, metric):
    """Low-rank (SVD, spatial SVD, Tucker-2, CP) or depthwise-separable factorization (runs fold first)."""
    if sum(x is not None and x is not False for x in (rank, energy, target_macs)) + bool(vbmf) > 1:
        raise BadInputError("--rank, --energy, --vbmf and --target-macs are alternatives: give one")
    opts = {
        "method": method, "rank": 0.5 if rank is None else rank, "energy": energy, "vbmf": vbmf, "target_macs": target_macs,
        "layer_rank": tuple(layer_rank), "exclude": tuple(exclude), "refit": not no_refit, "calib_samples": samples,
        "keep_if_faster": keep_if_faster,
    }
    run_transform(
        ctx, src, out, [("fold", {}), ("factorize", opts)], calib=calib, labels=labels,
        budget=_budget(budget), report=report, in_place=in_place,
        input_shapes=input_shapes, metric=metric,
    )


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@click.option("--calib", type=click.Path(), required=True, help="calibration data: the evaluation samples")
@click.option("--labels", type=click.Path(), help="labels (.npy): metric is accuracy drop, else top-1 disagreement")
@click.option("--ratios", default="0.1,0.3,0.5,0.7", show_default=True)
@click.option("--criterion", type=click.Choice(["l1", "l2", "bn_scale", "fpgm"]), default="l1", show_default=True)
@click.option("--reconstruct", is_flag=True, help="measure with least-squares reconstruction")
@click.option("--samples", type=int, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(), help="PNG of metric loss vs ratio per space (needs the report extra)")
@metric_option
@_apply(common_model_options)
def sensitivity(src, calib, labels, ratios, criterion, reconstruct, samples, as_json, plot, metric, input_shapes):
    """Prune each channel space alone at each ratio and measure the metric."""
    from compiler.calibration import CalibrationSet
    from compiler.ir_utils import load_model
    from compiler.pipeline import Pipeline
    from passes.pruning import sensitivity as S

    try:
        rs = tuple(float(r) for r in ratios.split(","))
    except ValueError as e:
        raise BadInputError(f"--ratios: {e}") from e
    if plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise BadInputError("--plot needs matplotlib: pip install 'onnxcc[report]'")
    model = load_model(src)
    cal = CalibrationSet.load(calib, model)
    lab = _load_labels(labels)
    Pipeline(["fold"], verify=False).run(model)

    def progress(done, total):
        if not as_json:
            click.echo(f"\r{done}/{total} cuts measured", nl=False, err=True)

    res = S.analyse(model, cal, labels=lab, ratios=rs, criterion=criterion, reconstruct=reconstruct, samples=samples,
                    progress=progress, top_k=5 if metric == "top5" else 1)
    if not as_json:
        click.echo("", err=True)
    if plot:
        _sensitivity_plot(res, plot)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
    else:
        click.echo(f"metric: {res.metric}; {len(res.curves)} spaces in {res.seconds:.1f}s")
        click.echo(res.table())


def _sensitivity_plot(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in res.curves:
        ax.plot(c.ratios, c.loss, marker="o", label=f"{c.space}: {c.members[0] if c.members else ''}")
    ax.set_xlabel("channels removed (ratio)")
    ax.set_ylabel(res.metric)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--calib", type=click.Path(), help="calibration data (.npy, .npz or image folder); not needed for --weight-only/--fp16")
@click.option("--weight-only", type=click.Choice(["int8", "int4", "binary", "ternary"]), default=None, help="compress weights only (float compute, no calibration); binary/ternary lose much accuracy without fine-tuning")
@click.option("--block-size", type=int, default=32, show_default=True, help="--weight-only int4: weights per scale")
@click.option("--fp16", is_flag=True, help="store weights as float16 (float32 compute, inputs and outputs)")
@click.option("--dynamic", is_flag=True, help="dynamic INT8 for MatMul/Gemm (activations quantized at run time, no calibration)")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax", show_default=True)
@click.option("--percentile", type=float, default=99.999, show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True)
@click.option("--activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True)
@click.option("--equalize", is_flag=True, help="cross-layer equalization first (exact in float)")
@click.option("--bias-correction", is_flag=True, help="correct biases for the weights' quantization error")
@click.option("--speed-guard", is_flag=True, help="profile INT8 against fp32: layers whose integer kernel is slower stay float, and the model stays float if still slower (timing-dependent)")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="keep matching node names in float (repeatable)")
@click.option("--weight-rounding", type=click.Choice(["gptq", "nearest"]), default="gptq", show_default=True, help="int8 weight codes: GPTQ (chosen for each layer's output on the calibration data) or nearest")
@click.option("--float-excitation", is_flag=True, help="keep squeeze-excite branches (one value per channel) in float: more accurate, a little slower")
@click.option("--samples", type=int, default=256, show_default=True, help="calibration samples used at most")
@click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy")
@click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points")
@_apply(common_model_options)
@metric_option
@click.pass_context
def quantize(ctx, src, out, calib, weight_only, block_size, fp16, dynamic, method, percentile, per_channel, activations, equalize, bias_correction, speed_guard, exclude, weight_rounding, float_excitation, samples, labels, budget, report, in_place, input_shapes, metric):
    """INT8 QDQ quantization that onnxruntime fuses into integer kernels (runs fold first); or weight-only INT8/INT4/FP16."""
    from compiler.ir_utils import default_opset, load_model
    if sum(map(bool, (weight_only, fp16, dynamic))) > 1:
        raise BadInputError("--weight-only, --fp16 and --dynamic are alternatives: give one")
    opset = default_opset(load_model(src, check=False))
    specs: list = [("fold", {"opset": 13} if opset is not None and opset < 13 else {})]
    if weight_only or fp16:
        specs.append(("weight-only", {"dtype": "fp16" if fp16 else weight_only, "block_size": block_size, "exclude": tuple(exclude)}))
    elif dynamic:
        specs.append(("quantize-dynamic", {"exclude": tuple(exclude)}))
    else:
        if not calib:
            raise BadInputError("INT8 quantization needs calibration data: give --calib (or --weight-only / --fp16 / --dynamic)")
        if equalize:
            specs.append(("equalize", {}))
        specs.append(("quantize", {
            "method": method, "percentile": percentile, "per_channel": per_channel, "activations": activations,
            "bias_correction": bias_correction, "exclude": tuple(exclude), "calib_samples": samples, "speed_guard": speed_guard,
            "float_excitation": float_excitation, "weight_rounding": weight_rounding,
            # --budget drives mixed precision: the most harmful layers stay float until the drop fits
            "max_drop": budget, "eval_samples": 64,
        }))
    run_transform(
        ctx, src, out, specs, calib=calib, labels=labels, budget=_budget(budget),
        report=report, in_place=in_place, input_shapes=input_shapes, metric=metric,
        verify_samples=64 if budget is not None else 8,  # the samples mixed precision measured its drop on
    )


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--sparsity", type=float, required=True, help="fraction of weights set to zero")
@click.option("--global", "global_threshold", is_flag=True, help="one magnitude threshold over all layers")
@click.option("--steps", type=int, default=1, show_default=True)
@click.option("--calib", type=click.Path(), help="calibration data: refit the kept weights (sparsity pattern kept)")
@click.option("--exclude", multiple=True, metavar="PATTERN")
@_apply(budget_options)
@_apply(common_model_options)
@metric_option
@click.pass_context
def sparsify(ctx, src, out, sparsity, global_threshold, steps, calib, exclude, labels, budget, report, in_place, input_shapes, metric):
    """Unstructured magnitude sparsity; the report gives the zipped size."""
    opts = {"sparsity": sparsity, "global_threshold": global_threshold, "steps": steps, "reconstruct": bool(calib), "exclude": tuple(exclude)}
    run_transform(ctx, src, out, [("fold", {}), ("sparsify", opts)], calib=calib, labels=labels,
                  budget=_budget(budget), report=report, in_place=in_place,
                  input_shapes=input_shapes, metric=metric)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True, help="2^bits shared values per layer")
@click.option("--layers", multiple=True, metavar="PATTERN", help="compress only matching node names (repeatable)")
@click.option("--exclude", multiple=True, metavar="PATTERN")
@click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy (with --calib)")
@click.option("--calib", type=click.Path(), help="data to verify on (default: random inputs)")
@click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points; exceeded: exit 1, nothing written")
@_apply(common_model_options)
@metric_option
@click.pass_context
def codebook(ctx, src, out, bits, layers, exclude, labels, calib, budget, report, in_place, input_shapes, metric):
    """k-means weight sharing: packed indices + codebook, rebuilt in-graph (same speed)."""
    run_transform(ctx, src, out, [("fold", {}), ("codebook", {"bits": bits, "layers": tuple(layers), "exclude": tuple(exclude)})],
                  calib=calib, labels=labels, budget=_budget(budget),
                  report=report, in_place=in_place, input_shapes=input_shapes, metric=metric)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--calib", type=click.Path(), required=True, help="calibration data (reconstruction and verification)")
@click.option("--prune", "prune_ratio", type=float, default=0.0, show_default=True, help="structured channel ratio (0: no pruning)")
@click.option("--sparsity", type=float, default=0.6, show_default=True)
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option("--int8", "int8", is_flag=True, help="INT8 activations too: quantize before the codebook, which then shares int8 levels (still fused)")
@_apply(budget_options)
@_apply(common_model_options)
@metric_option
@click.pass_context
def compress(ctx, src, out, calib, prune_ratio, sparsity, bits, int8, labels, budget, report, in_place, input_shapes, metric):
    """Deep-Compression-style: prune (structured) → sparsify → [INT8] → codebook, sizes and metric at each stage."""
    specs: list = [("fold", {})]
    if prune_ratio > 0:
        specs.append(("prune", {"ratio": prune_ratio, "reconstruct": True, "round_to": 1}))
    specs.append(("sparsify", {"sparsity": sparsity, "reconstruct": True, "steps": 2}))
    if int8:
        specs.append(("quantize", {"method": "minmax", "bias_correction": True}))
    specs.append(("codebook", {"bits": bits}))
    run_transform(ctx, src, out, specs, calib=calib, labels=labels, budget=_budget(budget),
                  report=report, in_place=in_place, input_shapes=input_shapes, metric=metric, verify_samples=64)


# --------------------------------------------------------------------------- read-only commands
@cli.command()
@click.argument("model_path", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--channels", is_flag=True, help="print the channel spaces (what pruning can remove together, or the blocker)")
def inspect(model_path, as_json, channels):
    """Per-layer table: shapes, parameters, MACs, weight statistics."""
    from compiler.analysis import analyze, summary_table
    from compiler.ir_utils import load_model

    model = load_model(model_path)
    if channels:
        from passes.pruning.dependency import ChannelGraph
        from passes.pruning.prune import prepare, space_table, spaces_json

        prepare(model)
        cg = ChannelGraph(model)
        if as_json:
            click.echo(json.dumps(spaces_json(cg), indent=2))
        else:
            click.echo(space_table(cg))
            n_ok = sum(1 for sp in cg.spaces if not sp.blocked)
            click.echo(f"{len(cg.spaces)} spaces, {n_ok} prunable")
        return
    summary = analyze(model, path=model_path)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, default=_json_default))
    else:
        click.echo(summary_table(summary))


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=True))
@click.argument("candidate", type=click.Path(dir_okay=True))
@click.option("--data", type=click.Path(), help="inputs (.npy/.npz/image folder); default seeded random")
@click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy")
@click.option("--samples", type=int, default=8, show_default=True)
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="max |ref-cand| / max |ref| per output")
@click.option("--atol", type=float, default=0.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--seed", type=int, default=0)
@metric_option
@_apply(common_model_options)
def verify(reference, candidate, data, labels, samples, rtol, atol, as_json, seed, metric, input_shapes):
    """Compare two models in onnxruntime on the same inputs (exit 1 outside tolerance)."""
    from compiler import verify as V
    from compiler.analysis import format_table
    from compiler.calibration import CalibrationSet, parse_input_shapes
    from compiler.ir_utils import load_model

    ref = load_model(reference)
    cand = load_model(candidate)
    calib = CalibrationSet.load(data, ref) if data else None
    feeds = V.verification_feeds(ref, calib, samples=samples, seed=seed, overrides=parse_input_shapes(input_shapes))
    lab = _load_labels(labels)
    if lab is not None:
        lab = lab[: sum(next(iter(f.values())).shape[0] for f in feeds)]
    comp = V.compare_outputs(V.run_model(ref, feeds), V.run_model(cand, feeds), lab, 5 if metric == "top5" else 1)
    ok = comp.within(rtol, atol)
    if as_json:
        click.echo(json.dumps({"ok": ok, "rtol": rtol, "atol": atol, **comp.to_json()}, indent=2, default=_json_default))
    else:
        rows = []
        for o in comp.outputs:
            if o.problem:
                rows.append([o.name, "-", "-", "-", "-", "-", o.problem])
            else:
                rows.append([o.name, f"{o.max_abs:.3g}", f"{o.rel:.3g}", f"{o.sqnr_db:.1f}", f"{o.cosine:.6f}",
                             f"{o.top1:.3f}" if o.top1 is not None else "-", ""])
        click.echo(format_table(rows, ["output", "max abs", "rel", "SQNR dB", "cosine", "top-1 agree", "problem"]))
        if comp.accuracy_ref is not None:
            click.echo(f"{metric} accuracy: reference {comp.accuracy_ref:.4f}, candidate {comp.accuracy_cand}")
        click.echo("within tolerance" if ok else "OUTSIDE tolerance")
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--runs", type=int, default=15, show_default=True, help="timed runs per block")
@click.option("--rounds", type=int, default=5, show_default=True, help="rounds of blocks")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--no-memory", is_flag=True, help="skip the per-model peak-memory probe")
@click.option("--json", "as_json", is_flag=True)
@_apply(common_model_options)
def bench(models, threads, batch, runs, rounds, warmup, no_memory, as_json, input_shapes):
    """Latency (alternating blocks, one process), file size and peak memory; ratios to the first model."""
    from compiler.bench import bench_models
    from compiler.calibration import parse_input_shapes

    res = bench_models(
        [(m, m) for m in models], threads=threads, batch=batch, rounds=rounds, block=runs, warmup=warmup,
        input_shapes=parse_input_shapes(input_shapes), measure_memory=not no_memory,
    )
    click.echo(json.dumps(res.to_json(), indent=2) if as_json else res.table())


@cli.command("passes")
def list_passes():
    """List registered passes and their options."""
    from compiler.registry import config_fields, registered_passes

    for name, cls in registered_passes().items():
        click.echo(f"{name} ({'exact' if cls.exact else 'lossy'}{', needs --calib' if cls.needs_calibration else ''}): {cls.summary}")
        for fname, tname, default, help_ in config_fields(cls):
            click.echo(f"    {fname.replace('_', '-')}: {tname} = {default!r}  {help_}")


def main(argv: Sequence[str] | None = None) -> None:
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="onnxcc", standalone_mode=False)
    except OnnxccError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"onnxcc: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("onnxcc: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"onnxcc: error: {e.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("onnxcc: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # a bug in onnxcc, not in the input: say so on one line
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        click.echo(f"onnxcc: error: internal error ({type(e).__name__}): {msg}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
