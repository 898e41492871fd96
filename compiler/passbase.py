"""The pass base class, pass results and option parsing (core layer: imports no pass).

Every onnxcc pass is an ``onnx_ir.passes.InPlacePass`` (so ``requires`` →
``call`` → ``ensures`` and the in-place contract are enforced by onnx_ir) with

* ``name``: the registry key used by the CLI, recipes and the Python API;
* ``exact``: True when the output must agree with the input to float rounding
  (folding, removing all-zero channels), False for lossy passes;
* ``Config``: a frozen dataclass of options; each field's ``metadata["help"]``
  is what ``onnxcc passes`` prints;
* a :class:`PassReport` result recording what changed and every layer skipped
  with the reason.

Options arrive as plain dicts (from click, YAML/JSON recipes or Python) and go
through :func:`make_config`, which rejects unknown names and wrong types with a
:class:`BadInputError` that names the pass and the option. Which passes exist is
data in :mod:`onnxcc.passes` (``PASSES``), read by :mod:`onnxcc.compiler.registry`.
"""


from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, ClassVar, Mapping

import onnx_ir as ir

from onnxcc.compiler.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A layer (node, channel space, …) a pass left alone, and why."""

    layer: str
    reason: str


@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    """``PassResult`` plus what the pass did, for the report and the tests."""

    changed: list[str] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "changed": list(self.changed),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "stats": self.stats,
        }


@dataclasses.dataclass
class PassContext:
    """What a pass may need besides its options: calibration data, a seed."""

    calibration: Any = None  # compiler.calibration.CalibrationSet
    seed: int = 0
    labels: Any = None  # labels of the evaluation samples, when given (accuracy-driven passes)
    # The evaluation samples, as feeds: the pipeline's verification inputs (--data, else the first
    # calibration samples). ``labels`` and every budget figure are about these; None outside a pipeline.
    eval_feeds: Any = None
    metric: Any = 1  # what the budget measures: top-k (an int) or a compiler.verify.Metric
    # Activation statistics of the *input* model, keyed by tensor name, that a caller running many
    # variants of one model (sensitivity analysis) computed once; passes may read them instead of
    # running the collector again. Only valid while the model a pass receives is that input model.
    stats_cache: dict = dataclasses.field(default_factory=dict)
    # Activation ranges keyed by tensor content fingerprint, shared by every pass of one pipeline
    # run: valid across rewrites, since a changed computation has a new fingerprint.
    activation_cache: dict = dataclasses.field(default_factory=dict)
    # How a pass runs an exact pass inside itself (``quantize`` runs ``lower-int8``): the pipeline
    # sets a runner that verifies the nested pass at the exact tolerance like any exact step.
    exact_runner: Callable[["OnnxccPass", ir.Model], "PassReport"] | None = None
    # The model the pipeline was given (a copy), for passes that set ``needs_original`` (distill's teacher).
    original: Any = None

    def run_exact(self, p: "OnnxccPass", model: ir.Model) -> "PassReport":
        """Run the exact pass ``p`` on ``model``, verified when a pipeline supplied a runner."""
        if not p.exact:
            raise TypeError(f"pass '{p.name}' is not exact: run it as a pipeline step")
        return self.exact_runner(p, model) if self.exact_runner is not None else p(model)


class OnnxccPass(ir.passes.InPlacePass):
    name: ClassVar[str]
    exact: ClassVar[bool]
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    #: said after "needs calibration data (--calib)" when it is missing: what to use instead
    without_calibration: ClassVar[str] = ""
    # The pipeline runs the pass with the graph inputs at their concrete shapes (ir_utils.shape_hint)
    # so spatial sizes and MACs are known; the declared dynamic shapes are restored afterwards. A
    # pass that folds shapes into constants (fold) must not see them: it sets this False.
    concrete_shapes: ClassVar[bool] = True
    # The pipeline keeps a copy of its input model in ``context.original`` for this pass (a teacher).
    needs_original: ClassVar[bool] = False

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None, context: PassContext | None = None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context or PassContext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def requires(self, model: ir.Model) -> None:
        if self.needs_calibration and self.context.calibration is None:
            raise ir.passes.PreconditionError(missing_calibration(type(self)))

    # How an accuracy budget drives a lossy pass (the pipeline's budget search, see
    # compiler.pipeline): ``milder`` gives the config at ``strength`` in (0, 1) of the change asked
    # for (1: as asked; towards 0: no change), or None when this config has nothing to weaken;
    # ``with_budget`` hands a pass that trades accuracy itself (quantize's mixed precision) the
    # points it may spend and the verification sample count, before it runs.
    @classmethod
    def milder(cls, config: Any, strength: float) -> Any | None:
        return None

    @classmethod
    def with_budget(cls, config: Any, points: float, samples: int) -> Any:
        return config


def scaled_overrides(items: tuple[str, ...], scale: Callable[[float], float]) -> tuple[str, ...]:
    """``PATTERN=R`` overrides (per-layer ratios, ranks) with each R mapped through ``scale``."""
    out = []
    for item in items:
        key, sep, value = item.rpartition("=")
        try:
            out.append(f"{key}={scale(float(value)):.6g}" if sep else item)
        except ValueError:
            out.append(item)
    return tuple(out)


def missing_calibration(cls: type[OnnxccPass]) -> str:
    """The one message for a pass run without the calibration data it needs."""
    return f"pass '{cls.name}' needs calibration data: give --calib" + (f" ({cls.without_calibration})" if cls.without_calibration else "")


def config_fields(cls: type[OnnxccPass]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each option of a pass."""
    hints = typing.get_type_hints(cls.Config)
    rows = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        rows.append((f.name, _type_name(hints.get(f.name, Any)), default, f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def make_config(cls: type[OnnxccPass], options: Mapping[str, Any] | None) -> Any:
    """Build ``cls.Config`` from a dict, coercing CLI/recipe strings and naming bad options."""
    options = dict(options or {})
    hints = typing.get_type_hints(cls.Config)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    kwargs = {}
    for key, raw in options.items():
        k = key.replace("-", "_")
        if k not in names:
            raise BadInputError(
                f"pass '{cls.name}' has no option '{key}' (options: {', '.join(sorted(names)) or 'none'})"
            )
        try:
            kwargs[k] = _coerce(raw, hints.get(k, Any))
        except (TypeError, ValueError) as e:
            raise BadInputError(f"pass '{cls.name}' option '{key}': {e}") from e
    try:
        return cls.Config(**kwargs)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"pass '{cls.name}': {e}") from e


def _coerce(raw: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return raw
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if raw is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(raw, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if raw in args:
            return raw
        raise ValueError(f"expected one of {', '.join(map(str, args))}, got {raw!r}")
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        inner = args[0] if args else Any
        return tuple(_coerce(i.strip() if isinstance(i, str) else i, inner) for i in items if i != "")
    if origin in (dict, Mapping) or tp in (dict,):
        if isinstance(raw, Mapping):
            return dict(raw)
        raise ValueError(f"expected a mapping, got {raw!r}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError(f"expected an integer, got {raw!r}")
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"expected an integer, got {raw!r}")
        return int(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        return float(raw)
    if tp is str:
        return str(raw)
    return raw
