"""The ``onnxcc`` command line.

Exit codes: 0 success, 1 verification or budget failure, 2 bad input, 3 internal error. Every
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
import traceback
import types
from typing import Any, Mapping, Sequence

import click

from onnxcc.compiler.errors import INTERNAL_ERROR_EXIT, BadInputError, OnnxccError

logger = logging.getLogger("onnxcc")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="onnxcc: %(levelname)s: %(message)s", stream=sys.stderr, force=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    from onnxcc.compiler.files import atomic_write

    with atomic_write(path, what="report") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))


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
    "--metric", default="top1", show_default=True, metavar="top1|top5|MODULE:FUNCTION",
    help="what --budget measures: top-1/top-5 accuracy with --labels (without: top-1 agreement with the original), "
         "or a score function fn(outputs, labels) -> float, higher is better (outputs: dict by output name; labels: "
         "--labels, else the original model's outputs), from an importable module or a file.py",
)



def _store_image_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Image-folder options are gathered in ``ctx.meta`` (read by :func:`image_preprocessing`)
    rather than passed to every command function."""
    if value is not None:
        ctx.meta.setdefault("onnxcc.images", {})[param.name] = value
    return value


def _image_option(*decls: str, **kw: Any):
    return click.option(*decls, expose_value=False, callback=_store_image_option, default=None, **kw)


# How an image folder given to --calib / --data becomes input (Pillow decodes and resizes).
image_options = [
    _image_option("--image-size", metavar="HxW", help="image folders: input height x width (default: the model's input shape)"),
    _image_option("--resize", type=int, metavar="N", help="image folders: scale the shorter side to N, then centre-crop to the size (default: resize straight to the size)"),
    _image_option("--layout", type=click.Choice(["nchw", "nhwc"], case_sensitive=False), help="image folders: tensor layout (default: from the model's input)"),
    _image_option("--channels", type=click.Choice(["rgb", "bgr", "l"], case_sensitive=False), help="image folders: channel order, or l for grayscale (default: from the model's channel count)"),
    _image_option("--mean", metavar="M[,M,M]", help="image folders: per-channel mean after scaling (default: ImageNet's for RGB, 0 for grayscale)"),
    _image_option("--std", metavar="S[,S,S]", help="image folders: per-channel std (default: ImageNet's for RGB, 1 for grayscale)"),
    _image_option("--pixel-scale", type=float, metavar="F", help="image folders: pixel multiplier before mean/std (default 1/255)"),
]


def image_preprocessing(ctx: click.Context | None = None):
    """The :class:`~onnxcc.compiler.calibration.ImagePreprocessing` the image options give, or None."""
    from onnxcc.compiler.calibration import ImagePreprocessing

    ctx = ctx or click.get_current_context()
    given = ctx.meta.get("onnxcc.images", {})
    if not given:
        return None

    def floats(name: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in str(given[name]).split(","))
        except ValueError as e:
            raise BadInputError(f"--{name}: expected comma-separated numbers, got {given[name]!r}") from e

    kw: dict[str, Any] = {}
    if "image_size" in given:
        try:
            h, w = (int(v) for v in str(given["image_size"]).lower().split("x"))
        except ValueError as e:
            raise BadInputError(f"--image-size: expected HxW, got {given['image_size']!r}") from e
        kw["size"] = (h, w)
    for name in ("mean", "std"):
        if name in given:
            kw[name] = floats(name)
    if "resize" in given:
        kw["resize"] = int(given["resize"])
    if "layout" in given:
        kw["layout"] = given["layout"].upper()
    if "channels" in given:
        kw["channels"] = given["channels"].upper()
    if "pixel_scale" in given:
        kw["scale"] = float(given["pixel_scale"])
    return ImagePreprocessing(**kw)


common_model_options = [
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDxD", help="concrete shape for an input with dynamic dims"),
]
data_options = common_model_options + image_options

# Every command that writes a model: where, its JSON report, and whether OUT may be the input.
output_options = [
    click.option("-o", "--output", "out", required=True, type=click.Path(), help="where to write the result"),
    click.option("--report", type=click.Path(), help="write a JSON report"),
    click.option("--in-place", is_flag=True, help="allow OUT to be the input file"),
    click.option("--data", type=click.Path(), help="real inputs to verify every pass on (.npz by input name, or .npy); default: the calibration data, else seeded random inputs"),
]

# Commands whose lossy result is gated: labels make the metric accuracy, the budget bounds its drop.
budget_options = [
    click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy"),
    click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points; exceeded: exit 1, nothing written"),
]


def _budget(max_drop: float | None):
    from onnxcc.compiler.pipeline import Budget

    return Budget(max_drop=max_drop) if max_drop is not None else None


def _apply(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


class _ConfigOptions:
    """A placeholder for the options of one pass's ``Config``, built when the command first needs
    its parameters (so ``onnxcc --help`` and every other command do not import every pass)."""

    def __init__(self, pass_name: str, only, exclude, aliases, defaults):
        self.pass_name, self.only, self.exclude = pass_name, only, tuple(exclude)
        self.aliases, self.defaults = dict(aliases or {}), dict(defaults or {})

    def build(self) -> list[click.Option]:
        import dataclasses
        import typing

        from onnxcc.compiler.registry import get_pass

        cls = get_pass(self.pass_name)
        hints = typing.get_type_hints(cls.Config)
        opts = []
        for f in dataclasses.fields(cls.Config):
            if (self.only is not None and f.name not in self.only) or f.name in self.exclude:
                continue
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
                tp = args[0]  # Optional[X]
            default = self.defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
            flag = "--" + f.name.replace("_", "-")
            names = list(self.aliases.get(f.name, ()))
            help_ = f.metadata.get("help", "")
            if tp is bool:
                pair = next((n for n in names if "/" in n), None)
                decl = [pair] if pair else ([f"{flag}/--no-{flag[2:]}"] if default else [flag])
                decl += [n for n in names if "/" not in n]
                flag_kw = {} if "/" in decl[0] else {"is_flag": True}  # click infers on/off pairs itself
                opts.append(click.Option([*decl, f.name], default=default, show_default=True, help=help_, **flag_kw))
                continue
            kwargs: dict[str, Any] = {"default": default, "show_default": default not in (None, ()), "help": help_}
            origin = typing.get_origin(tp)
            if origin is typing.Literal:
                kwargs["type"] = click.Choice([str(a) for a in typing.get_args(tp)])
            elif origin is tuple:
                inner = typing.get_args(tp)[0]
                kwargs.update(multiple=True, type=inner if inner in (int, float) else str, metavar="VALUE")
            elif tp in (int, float, str):
                kwargs["type"] = tp
            opts.append(click.Option([flag, *names, f.name], **kwargs))
        return opts


class _Command(click.Command):
    """A command whose pass options are generated from the pass's ``Config`` on first use."""

    @property
    def params(self) -> list:
        if any(isinstance(p, _ConfigOptions) for p in self._params):
            self._params = [o for p in self._params for o in (p.build() if isinstance(p, _ConfigOptions) else [p])]
        return self._params

    @params.setter
    def params(self, value) -> None:
        self._params = list(value)


def config_options(pass_name: str, *, only: Sequence[str] | None = None, exclude: Sequence[str] = (),
                   aliases: Mapping[str, Sequence[str]] | None = None, defaults: Mapping[str, Any] | None = None):
    """Click options generated from a pass's ``Config``: one option per field, declared once there
    (name, type, choices, default, help). ``aliases`` adds names (``{"calib_samples": ["--samples"]}``)
    or, for a bool given as ``"--on/--off"``, replaces the flag pair; ``defaults`` overrides a
    default for one command. The click parameter is the field's name, so ``**options`` is the
    pass's option dict (:func:`pass_options` splits it per pass)."""

    def deco(fn):
        if not hasattr(fn, "__click_params__"):
            fn.__click_params__ = []
        fn.__click_params__.append(_ConfigOptions(pass_name, only, exclude, aliases, defaults))
        return fn

    return deco


def pass_options(pass_name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Take the options :func:`config_options` generated for ``pass_name`` out of a command's keyword arguments."""
    import dataclasses

    from onnxcc.compiler.registry import get_pass

    names = {f.name for f in dataclasses.fields(get_pass(pass_name).Config)}
    return {k: given.pop(k) for k in list(given) if k in names}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="debug logging and tracebacks")
@click.option("--quiet", "-q", is_flag=True, help="errors only")
@click.version_option(package_name="onnxcc")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """onnxcc: make exported ONNX CNNs smaller and faster, verified by onnxruntime."""
    _setup_logging(verbose, quiet)
    from onnxcc.compiler import progress

    progress.enable(not quiet)
    ctx.obj = {"verbose": verbose, "quiet": quiet}


cli.command_class = _Command


# --------------------------------------------------------------------------- transform commands
def run_pipeline(
    ctx: click.Context,
    src: str,
    out: str,
    specs: Sequence[Any],
    *,
    calib: str | None = None,
    data: str | None = None,
    labels: str | None = None,
    budget: Any = None,
    report: str | None = None,
    html_path: str | None = None,
    in_place: bool = False,
    input_shapes: Sequence[str] = (),
    external_data: bool | None = None,
    seed: int = 0,
    metric: str = "top1",
    verify_samples: int | None = None,
    measure_latency: bool = False,
    protect: Sequence[str] = (),
) -> None:
    """Every command that writes a model: a recipe through :func:`onnxcc.compiler.api.compile_model`.

    Output paths are checked before any work; the model, the JSON report and the HTML page are
    written only when everything succeeded (the page is rendered before anything is written).
    """
    from onnxcc.compiler.api import compile_model
    from onnxcc.compiler.calibration import CalibrationSet, parse_input_shapes
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.compiler.verify import load_metric

    # the model may be replaced with --in-place; its external data, the data and the recipe never
    check_outputs(out, report, html_path, (src, calib, data, labels, *protect), in_place=in_place)
    model = load_model(src)
    images = image_preprocessing(ctx)
    calibration = CalibrationSet.load(calib, model, images=images) if calib else None
    try:
        res = compile_model(
            model, list(specs), calibration=calibration, data=data, images=images, labels=_load_labels(labels), budget=budget, seed=seed,
            input_shapes=parse_input_shapes(input_shapes), metric=load_metric(metric),
            measure_latency=measure_latency, profile_layers=bool(html_path), verify_samples=verify_samples,
        )
    except OnnxccError as e:
        if report:  # CI reads why: the failing pass, the error, and the steps that passed (no model is written)
            write_json_atomic(report, failure_report(e, specs, src))
        raise
    write_outputs(ctx, res, src, out, report, html_path, external_data=external_data)


def check_outputs(out: str, report: str | None, html_path: str | None, inputs: Sequence[str | None], *,
                  in_place: bool = False) -> None:
    """Before any work: OUT, the report and the page are writable, distinct and none of the inputs
    (a model's external data included); --html has matplotlib."""
    from onnxcc.compiler.files import external_data_files
    from onnxcc.compiler.ir_utils import check_distinct_outputs, check_output_path

    src = inputs[0]
    inputs = (src, *external_data_files(src), *inputs[1:])
    check_output_path(out, *inputs, in_place=in_place)
    for extra in (report, html_path):
        if extra:
            check_output_path(extra, *inputs)
    check_distinct_outputs(out, report, html_path)
    if html_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise BadInputError("--html needs matplotlib: pip install 'onnxcc[report]'") from e


def write_outputs(ctx: click.Context, res: Any, src: str, out: str, report: str | None, html_path: str | None, *,
                  external_data: bool | None = None, title: str = "onnxcc compile report",
                  summary: Any = None) -> None:
    """Write a successful run: the page is rendered before anything is written, then the model,
    the file sizes as they are on disk (external data included), the printed summary (``summary``,
    else the passes and totals), the JSON report and the page."""
    from onnxcc.compiler.api import json_report
    from onnxcc.compiler.files import atomic_write, file_size
    from onnxcc.compiler.ir_utils import has_external_tensors, save_model

    page = None
    if html_path:
        from onnxcc.compiler.report_html import render

        page = render(res.report, res.before, res.model, title=title)
    save_model(res.model, out, external_data=external_data)
    res.report["before"]["file_bytes"] = file_size(src)
    res.report["after"]["file_bytes"] = file_size(out, external=has_external_tensors(res.model))
    res.report.update(input=str(src), output=str(out))
    if not (ctx.obj or {}).get("quiet"):
        if summary is not None:
            summary()
        else:
            _print_result(res)
            click.echo(f"wrote {out}")
    if report:
        write_json_atomic(report, json_report(res.report))
    if page is not None:
        with atomic_write(html_path, what="HTML report") as tmp:
            tmp.write_text(page, encoding="utf-8")


def failure_report(e: Exception, specs: Sequence[Any], src: str) -> dict[str, Any]:
    """The JSON report of a run that failed: ``status`` "failed", the exit code, the error line,
    the pass that failed and the verified steps before it; no ``after`` (nothing was written)."""
    from onnxcc.compiler.api import json_report, recipe_json

    steps = getattr(e, "completed_steps", [])
    return json_report({
        "status": "failed", "exit_code": getattr(e, "exit_code", 1), "error": str(e),
        "failed_pass": getattr(e, "failed_pass", None), "recipe": recipe_json(specs), "input": str(src), "output": None,
        "passes": [st.to_json() for st in steps],
    })


def _print_result(res: Any) -> None:
    from onnxcc.compiler.analysis import format_table, human

    for step in res.result.steps:
        verdict = ""
        if step.vs_previous is not None:
            verdict = f", max rel. error {step.vs_previous.max_rel:.2e}"
            if not step.exact and step.vs_original is not None:
                drop = step.vs_original.metric_drop()
                verdict += f", SQNR {step.vs_original.min_sqnr:.1f} dB vs original" + (f", metric drop {drop:.2f} pts" if drop is not None else "")
        size = step.report.stats.get("size_after") if isinstance(step.report.stats, dict) else None
        if size:
            verdict += f", {size['bytes'] / 1e6:.2f} MB, zipped {size['zipped_bytes'] / 1e6:.2f} MB"
        click.echo(f"{step.name}: {'exact' if step.exact else 'lossy'}, {len(step.report.changed)} changes, {len(step.report.skipped)} skipped{verdict}")
        for s in step.report.skipped[:20]:
            click.echo(f"  skipped {s.layer}: {s.reason}")
        if len(step.report.skipped) > 20:
            click.echo(f"  ... {len(step.report.skipped) - 20} more in the report")
    b, a = res.report["before"], res.report["after"]
    rows = []
    for key, label, unit in (("params", "parameters", ""), ("macs", "MACs", ""), ("nodes", "nodes", ""), ("file_bytes", "file size", "B"), ("latency_ms", "latency (ms)", "")):
        if b.get(key) is not None and a.get(key) is not None:
            rows.append([label, human(b[key], unit), human(a[key], unit), f"{a[key] / b[key]:.3f}x" if b[key] else "-"])
    click.echo(format_table(rows, ["", "before", "after", "ratio"]))
    m, ver = res.report.get("metric"), res.report.get("verification") or {}
    if m and ver:
        budget = res.report.get("budget")
        tail = f" (budget {budget:g})" if budget is not None else ""
        if m.get("accuracy_before") is not None and m.get("accuracy_after") is not None:
            click.echo(f"{ver['metric']} on {ver['samples']} {ver['source']} samples: {100 * m['accuracy_before']:.2f}% -> "
                       f"{100 * m['accuracy_after']:.2f}%, drop {m['drop_points']:.2f} points{tail}")
        elif m.get("top1_agreement") is not None:
            click.echo(f"top-1 agreement with the input on {ver['samples']} {ver['source']} samples: "
                       f"{100 * m['top1_agreement']:.2f}%{tail}")


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@config_options("fold", aliases={"fold_batchnorm": ["--fold-batchnorm/--no-bn"]})
@click.option("--external-data/--no-external-data", default=None, help="store weights in OUT.data (default: only over 2 GB)")
@_apply(data_options)
@click.pass_context
def fold(ctx, src, out, report, in_place, data, external_data, input_shapes, **options):
    """Exact clean-up: fold constants, BatchNorm, shape chains; drop dead and no-op nodes."""
    run_pipeline(ctx, src, out, [("fold", pass_options("fold", options))], report=report, in_place=in_place, data=data,
                 input_shapes=input_shapes, external_data=external_data)


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
@_apply(data_options)
@metric_option
@click.pass_context
def compile(ctx, src, out, recipe, pass_names, prune_ratio, factorize_spec, sparsity, codebook_bits, quant_method, calib, labels, budget, report, html_path, no_latency, in_place, data, seed, input_shapes, metric):  # noqa: A001
    """Run a verified pipeline from a recipe, --pass entries and/or shortcut flags (sound order)."""
    from onnxcc.compiler.api import resolve_recipe, specs_from_flags
    from onnxcc.compiler.pipeline import PassSpec

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
    recipe_file = [recipe] if recipe and os.path.isfile(recipe) else []
    run_pipeline(ctx, src, out, specs, calib=calib, labels=labels, budget=budget, report=report, html_path=html_path,
                 in_place=in_place, data=data, input_shapes=input_shapes, seed=seed, metric=metric, protect=recipe_file,
                 measure_latency=not no_latency)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@config_options("prune", aliases={"global_ranking": ["--global"], "calib_samples": ["--samples"]})
@click.option("--calib", type=click.Path(), help="calibration data: activation criterion, bias compensation, reconstruction, automatic ratios")
@_apply(budget_options)
@click.option("--force", is_flag=True, help="write the model even when the budget is exceeded (the report says by how much)")
@_apply(data_options)
@metric_option
@click.pass_context
@click.option("--distill", "distill_data", type=click.Path(), help="prune-distill cycles: after each of the --steps cuts, distill from the unpruned model on these training inputs (the train extra)")
@click.option("--distill-labels", type=click.Path(), help="labels of the --distill inputs (.npy)")
@click.option("--distill-epochs", type=int, default=1, show_default=True, help="distillation epochs after each cut")
@click.option("--distill-lr", type=float, default=None, help="distillation learning rate (default 1e-3)")
def prune(ctx, src, out, calib, labels, budget, force, report, in_place, data, input_shapes, metric, distill_data, distill_labels,
          distill_epochs, distill_lr, **options):
    """Structured channel pruning (runs fold first). --criterion zero is lossless."""
    prune_opts = pass_options("prune", options)
    specs: list = [("fold", {})]
    if distill_data:
        from onnxcc.compiler.api import prune_distill_specs

        if calib and os.path.abspath(calib) != os.path.abspath(distill_data):
            raise BadInputError("--distill DATA is also the calibration data of the cuts: give --calib the same file or leave it out")
        calib = distill_data
        specs += prune_distill_specs(prune_opts, {"epochs": distill_epochs, "lr": distill_lr, "labels": distill_labels})
    else:
        specs.append(("prune", prune_opts))
    run_pipeline(
        ctx, src, out, specs, calib=calib, labels=labels,
        budget=None if force else _budget(budget), report=report, in_place=in_place, data=data,
        input_shapes=input_shapes, metric=metric, protect=(distill_labels,),
    )


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="where to write the trained model")
@click.option("--teacher", required=True, type=click.Path(), help="the model to learn from (its inputs and outputs must match the student's)")
@click.option("--data", "train_data", required=True, type=click.Path(), help="training inputs: .npy, .npz by input name, or an image folder (labels are not needed)")
@click.option("--labels", "train_labels", type=click.Path(), help="labels of the training inputs (.npy): cross-entropy joins the distillation loss")
@config_options("distill", exclude=("teacher", "labels"))
@click.option("--eval-data", type=click.Path(), help="held-out inputs to verify and gate the result on (default: the first training samples)")
@click.option("--eval-labels", type=click.Path(), help="labels of --eval-data: the budget and the report in accuracy")
@click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points against the student as given")
@click.option("--report", type=click.Path(), help="write a JSON report")
@click.option("--html", "html_path", type=click.Path(), help="write an HTML report with the loss curve (needs matplotlib)")
@click.option("--in-place", is_flag=True, help="allow OUT to be the student file")
@_apply(data_options)
@metric_option
@click.pass_context
def distill(ctx, src, out, teacher, train_data, train_labels, eval_data, eval_labels, budget, report, html_path, in_place, input_shapes, metric, **options):
    """Fine-tune SRC on the graph itself to reproduce TEACHER (knowledge distillation; on a QDQ model
    this is quantization-aware training, on binary/ternary/codebook weights training under the
    projection). Needs the train extra (torch)."""
    opts = {**pass_options("distill", options), "teacher": teacher, "labels": train_labels}
    run_pipeline(
        ctx, src, out, [("distill", opts)], calib=train_data, data=eval_data, labels=eval_labels, budget=_budget(budget),
        report=report, html_path=html_path, in_place=in_place, input_shapes=input_shapes, metric=metric,
        protect=(teacher, train_labels),
    )


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@config_options("factorize", aliases={"calib_samples": ["--samples"]})
@click.option("--calib", type=click.Path(), help="calibration data: refit each layer's last factor by least squares")
@_apply(budget_options)
@_apply(data_options)
@metric_option
@click.pass_context
def factorize(ctx, src, out, calib, labels, budget, report, in_place, data, input_shapes, metric, **options):
    """Low-rank (SVD, spatial SVD, Tucker-2, CP) or depthwise-separable factorization (runs fold first)."""
    given = [k for k in ("rank", "energy", "vbmf", "target_macs") if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if len(given) > 1:
        raise BadInputError("--rank, --energy, --vbmf and --target-macs are alternatives: give one")
    run_pipeline(
        ctx, src, out, [("fold", {}), ("factorize", pass_options("factorize", options))], calib=calib, labels=labels,
        budget=_budget(budget), report=report, in_place=in_place, data=data, input_shapes=input_shapes, metric=metric,
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
@click.option("--workers", type=int, default=1, show_default=True, help="share the spaces out over this many processes (or Ray tasks)")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS|auto|local", help="run the shares as Ray tasks on this cluster")
@metric_option
@_apply(data_options)
def sensitivity(src, calib, labels, ratios, criterion, reconstruct, samples, as_json, plot, workers, ray_address, metric, input_shapes):
    """Prune each channel space alone at each ratio and measure the metric."""
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.compiler.verify import load_metric

    try:
        rs = tuple(float(r) for r in ratios.split(","))
    except ValueError as e:
        raise BadInputError(f"--ratios: {e}") from e
    if plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise BadInputError("--plot needs matplotlib: pip install 'onnxcc[report]'")
    model = load_model(src)
    cal = CalibrationSet.load(calib, model, images=image_preprocessing())
    lab = _load_labels(labels)
    Pipeline(["fold"], verify=False).run(model)

    from onnxcc.compiler.search import sensitivity as parallel_sensitivity

    res = parallel_sensitivity(model, cal, workers=workers, ray=ray_address, labels=lab, ratios=rs, criterion=criterion,
                               reconstruct=reconstruct, samples=samples, metric=load_metric(metric))  # progress: compiler.progress
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
    from onnxcc.compiler.files import atomic_write

    with atomic_write(path, what="plot") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--calib", type=click.Path(), help="calibration data (.npy, .npz or image folder); not needed for --weight-only/--fp16/--dynamic")
@click.option("--weight-only", type=click.Choice(["int8", "int4", "binary", "ternary"]), default=None, help="compress weights only (float compute, no calibration); binary/ternary lose much accuracy without fine-tuning")
@config_options("weight-only", only=("block_size",))
@click.option("--fp16", is_flag=True, help="store weights as float16 (float32 compute, inputs and outputs)")
@click.option("--dynamic", is_flag=True, help="dynamic INT8 for MatMul/Gemm (activations quantized at run time, no calibration)")
@config_options("quantize", exclude=("max_drop",), aliases={"calib_samples": ["--samples"], "per_channel": ["--per-channel/--per-tensor"]})
@click.option("--equalize", is_flag=True, help="cross-layer equalization first (exact in float)")
@click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy")
@click.option("--budget", type=float, default=None, help="max accuracy drop / top-1 disagreement in points: mixed precision keeps the most harmful layers float until it fits")
@_apply(data_options)
@metric_option
@click.pass_context
def quantize(ctx, src, out, calib, weight_only, fp16, dynamic, equalize, labels, budget, report, in_place, data, input_shapes, metric, **options):
    """INT8 QDQ quantization that onnxruntime fuses into integer kernels (runs fold first); or weight-only INT8/INT4/FP16."""
    if sum(map(bool, (weight_only, fp16, dynamic))) > 1:
        raise BadInputError("--weight-only, --fp16 and --dynamic are alternatives: give one")
    q = pass_options("quantize", options)  # first: the shared --exclude is quantize's
    block = pass_options("weight-only", options)
    dyn = {"reduce_range": q["reduce_range"]}  # one --reduce-range for static and dynamic INT8
    specs: list = [("fold", {})]  # quantize lowers opset < 13 itself (lower-int8), verified
    if weight_only or fp16:
        specs.append(("weight-only", {"dtype": "fp16" if fp16 else weight_only, "exclude": q["exclude"], **block}))
    elif dynamic:
        specs.append(("quantize-dynamic", {"exclude": q["exclude"], **dyn}))
    else:
        if equalize:
            specs.append(("equalize", {}))
        # --budget drives mixed precision (the pipeline hands it the budget and the sample count):
        # the most harmful layers stay float until the drop fits
        specs.append(("quantize", q))
    run_pipeline(
        ctx, src, out, specs, calib=calib, labels=labels, budget=_budget(budget),
        report=report, in_place=in_place, data=data, input_shapes=input_shapes, metric=metric,
    )


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@config_options("sparsify", exclude=("reconstruct",), aliases={"global_threshold": ["--global"], "calib_samples": ["--samples"]})
@click.option("--calib", type=click.Path(), help="calibration data: refit the kept weights (sparsity pattern kept)")
@_apply(budget_options)
@_apply(data_options)
@metric_option
@click.pass_context
def sparsify(ctx, src, out, calib, labels, budget, report, in_place, data, input_shapes, metric, **options):
    """Unstructured magnitude sparsity; the report gives the zipped size."""
    opts = {**pass_options("sparsify", options), "reconstruct": bool(calib)}
    run_pipeline(ctx, src, out, [("fold", {}), ("sparsify", opts)], calib=calib, labels=labels,
                 budget=_budget(budget), report=report, in_place=in_place, data=data,
                 input_shapes=input_shapes, metric=metric)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@config_options("codebook")
@click.option("--calib", type=click.Path(), help="data to verify on (default: random inputs)")
@_apply(budget_options)
@_apply(data_options)
@metric_option
@click.pass_context
def codebook(ctx, src, out, calib, labels, budget, report, in_place, data, input_shapes, metric, **options):
    """k-means weight sharing: packed indices + codebook, rebuilt in-graph (same speed)."""
    run_pipeline(ctx, src, out, [("fold", {}), ("codebook", pass_options("codebook", options))],
                 calib=calib, labels=labels, budget=_budget(budget),
                 report=report, in_place=in_place, data=data, input_shapes=input_shapes, metric=metric)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@_apply(output_options)
@click.option("--calib", type=click.Path(), required=True, help="calibration data (reconstruction and verification)")
@click.option("--prune", "prune_ratio", type=float, default=0.0, show_default=True, help="structured channel ratio (0: no pruning)")
@config_options("sparsify", only=("sparsity",), defaults={"sparsity": 0.6})
@config_options("codebook", only=("bits",))
@click.option("--int8", "int8", is_flag=True, help="INT8 activations too: quantize before the codebook, which then shares int8 levels (still fused)")
@_apply(budget_options)
@_apply(data_options)
@metric_option
@click.pass_context
def compress(ctx, src, out, calib, prune_ratio, sparsity, bits, int8, labels, budget, report, in_place, data, input_shapes, metric):
    """Deep-Compression-style: prune (structured) → sparsify → [INT8] → codebook, sizes and metric at each stage."""
    specs: list = [("fold", {})]
    if prune_ratio > 0:
        specs.append(("prune", {"ratio": prune_ratio, "reconstruct": True, "round_to": 1}))
    specs.append(("sparsify", {"sparsity": sparsity, "reconstruct": True, "steps": 2}))
    if int8:
        specs.append(("quantize", {"method": "minmax", "bias_correction": True, "force_int8": True}))  # asked for: no speed prediction
    specs.append(("codebook", {"bits": bits}))
    run_pipeline(ctx, src, out, specs, calib=calib, labels=labels, budget=_budget(budget),
                 report=report, in_place=in_place, data=data, input_shapes=input_shapes, metric=metric)


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="where to write the best model")
@click.option("--target", required=True, metavar="macs=R|params=R|latency=R|file=R", help="the ratio to the input to reach")
@click.option("--calib", type=click.Path(), required=True, help="calibration data for every trial (and the sensitivity sweep that seeds the search)")
@click.option("--labels", type=click.Path(), help="labels (.npy) of the evaluation samples (--data, else the calibration samples)")
@click.option("--budget", type=float, default=None, help="max drop of the metric in points: every trial stays inside it")
@click.option("--trials", type=int, default=32, show_default=True, help="finished trials in the study (a resumed study counts its own)")
@click.option("--time-limit", "time_limit", type=float, default=None, metavar="MIN", help="stop starting trials after this many minutes")
@click.option("--workers", type=int, default=1, show_default=True, help="trials in parallel (local processes, or Ray tasks with --ray)")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS|auto|local", help="run the trials as Ray tasks on this cluster (local: start one here)")
@click.option("--ray-resource", default=None, metavar="NAME", help="run trials only on Ray nodes with this custom resource (where latency is measured)")
@click.option("--study", type=click.Path(), default=None, help="the study: a SQLite file (default OUT.study.db) or an Optuna storage URL; a killed search resumes from it")
@click.option("--factorize/--no-factorize", "use_factorize", default=True, show_default=True, help="let trials factorize layers")
@click.option("--sampler", type=click.Choice(["tpe", "nsga2"]), default="tpe", show_default=True, help="Optuna's multi-objective sampler")
@click.option("--seed", type=int, default=0)
@click.option("--data", type=click.Path(), help="evaluation samples (.npz/.npy) the budget is judged on; default the calibration data")
@click.option("--report", type=click.Path(), help="write the JSON report (the best model's compile report with the search: trials, Pareto front)")
@click.option("--html", "html_path", type=click.Path(), help="write an HTML report with the Pareto plot (report extra)")
@metric_option
@click.pass_context
def search(ctx, src, out, target, calib, labels, budget, trials, time_limit, workers, ray_address, ray_resource, study, use_factorize,
           sampler, seed, data, report, html_path, metric):
    """Search prune ratios, factorization, INT8 and storage for the best model at a target under the budget (Optuna)."""
    from onnxcc.compiler.search import FACTORIZE, parse_target
    from onnxcc.compiler.search import search as run_search
    from onnxcc.compiler.verify import load_metric

    check_outputs(out, report, html_path, (src, calib, data, labels))
    study = study or f"{out}.study.db"
    res = run_search(src, parse_target(target), calibration=calib, data=data, labels=_load_labels(labels), metric=load_metric(metric),
                     budget=budget, trials=trials, time_limit_min=time_limit, workers=workers, ray=ray_address,
                     ray_resource=ray_resource, study=study, seed=seed, factorize=FACTORIZE[1:] if use_factorize else (),
                     sampler=sampler)
    s = res.report["search"]

    def summary() -> None:
        from onnxcc.compiler.analysis import format_table

        done = [t for t in s["trials"] if t["state"] == "COMPLETE"]
        rows = [[str(t["number"]), f"{t['ratio']:.3f}", f"{t['drop']:.2f}", f"{t['seconds']:.0f}", "best" if t["number"] == s["best"] else ""]
                for t in done if t["number"] in s["pareto"]]
        click.echo(f"{len(s['trials'])} trials ({len(done)} finished) in {s['seconds']:.0f}s; Pareto front ({s['target']['kind']} ratio, drop):")
        click.echo(format_table(rows, ["trial", "ratio", "drop", "s", ""]))
        _print_result(res)
        click.echo(f"wrote {out} (trial {s['best']}: {s['target']['kind']} ratio {next(t['ratio'] for t in done if t['number'] == s['best']):.3f}"
                   f"{'' if s['reached'] else ', target not reached'}); study {study}")

    write_outputs(ctx, res, src, out, report, html_path, title="onnxcc search report", summary=summary)


# --------------------------------------------------------------------------- read-only commands
@cli.command()
@click.argument("model_path", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--channels", is_flag=True, help="print the channel spaces (what pruning can remove together, or the blocker)")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxDxD",
              help="concrete shape for an input with dynamic dims: shapes and MACs are counted there")
def inspect(model_path, as_json, channels, input_shapes):
    """Per-layer table: shapes, parameters, MACs, weight statistics."""
    from onnxcc.compiler.analysis import analyze, summary_table
    from onnxcc.compiler.calibration import parse_input_shapes
    from onnxcc.compiler.ir_utils import load_model, set_shape_hint

    model = load_model(model_path)
    set_shape_hint(model, parse_input_shapes(input_shapes))
    if channels:
        from onnxcc.passes.pruning.dependency import ChannelGraph
        from onnxcc.passes.pruning.cut import prepare, space_table, spaces_json

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
@click.option("--data", type=click.Path(), help="inputs: one feed (.npz by input name, .npy) or samples on axis 0; default seeded random")
@click.option("--labels", type=click.Path(), help="labels (.npy) for accuracy")
@click.option("--samples", type=int, default=8, show_default=True)
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="max |ref-cand| / max |ref| per output")
@click.option("--atol", type=float, default=0.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--seed", type=int, default=0)
@metric_option
@_apply(data_options)
def verify(reference, candidate, data, labels, samples, rtol, atol, as_json, seed, metric, input_shapes):
    """Compare two models in onnxruntime on the same inputs (exit 1 outside tolerance)."""
    from onnxcc.compiler import verify as V
    from onnxcc.compiler.analysis import format_table
    from onnxcc.compiler.calibration import feed_samples, parse_input_shapes, verification_data
    from onnxcc.compiler.ir_utils import load_model

    ref = load_model(reference)
    cand = load_model(candidate)
    if data:
        feeds = verification_data(data, ref, limit=samples, images=image_preprocessing())
    else:
        feeds = V.verification_feeds(ref, None, samples=samples, seed=seed, overrides=parse_input_shapes(input_shapes))
    lab = _load_labels(labels)
    if lab is not None:
        lab = lab[: feed_samples(feeds)]
    comp = V.compare_outputs(V.run_model(ref, feeds), V.run_model(cand, feeds), lab, V.load_metric(metric))
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
    from onnxcc.compiler.bench import bench_models
    from onnxcc.compiler.calibration import parse_input_shapes

    res = bench_models(
        [(m, m) for m in models], threads=threads, batch=batch, rounds=rounds, block=runs, warmup=warmup,
        input_shapes=parse_input_shapes(input_shapes), measure_memory=not no_memory,
    )
    click.echo(json.dumps(res.to_json(), indent=2) if as_json else res.table())


@cli.command("passes")
def list_passes():
    """List registered passes and their options."""
    from onnxcc.compiler.passbase import config_fields
    from onnxcc.compiler.registry import registered_passes

    for name, cls in registered_passes().items():
        click.echo(f"{name} ({'exact' if cls.exact else 'lossy'}{', needs --calib' if cls.needs_calibration else ''}): {cls.summary}")
        for fname, tname, default, help_ in config_fields(cls):
            click.echo(f"    {fname.replace('_', '-')}: {tname} = {default!r}  {help_}")


_GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def hoist_global_flags(argv: Sequence[str]) -> list[str]:
    """``-q``/``-v`` may come after the subcommand too (``onnxcc fold m.onnx -o o.onnx -q``): they
    are moved in front of it, where the group reads them (no subcommand uses those letters)."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in _GLOBAL_FLAGS]
    return flags + [a for a in args[:end] if a not in _GLOBAL_FLAGS] + args[end:]


def main(argv: Sequence[str] | None = None) -> None:
    argv = hoist_global_flags(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    if not verbose:  # numpy's overflow/NaN notes from constant folding are not the user's business
        import warnings

        warnings.filterwarnings("ignore", category=RuntimeWarning)
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
        sys.exit(INTERNAL_ERROR_EXIT)


if __name__ == "__main__":
    main()
