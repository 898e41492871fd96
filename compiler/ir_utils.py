"""Loading, saving and small helpers on `onnx_ir` models.

Everything onnxcc rewrites is an ``onnx_ir.Model``. This module is the only
place that turns files, bytes or protos into one, and the only place that
writes models to disk:

* :func:`load_model` accepts a path, bytes, an ``onnx.ModelProto`` or an
  ``ir.Model`` and refuses, in one line, anything that is not a usable ONNX
  model (not ONNX, truncated, empty, a directory, failing the checker, missing
  external data, an opset outside :data:`SUPPORTED_OPSETS`). Opsets older than
  the range are upgraded with ``onnx.version_converter`` when it can.
* :func:`save_model` writes atomically: the model (and its external data, if
  any) goes to a temporary folder beside the destination and is renamed into
  place only when complete, so a failed or interrupted run leaves no
  half-written file. It refuses to overwrite the input unless asked.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.files import atomic_write

logger = logging.getLogger(__name__)

#: Default-domain opsets onnxcc's passes are tested on (the newest is the installed onnx's, which
#: the conformance suite covers: tests/reliability/test_conformance.py). Older models are
#: upgraded to ``UPGRADE_TARGET`` when onnx's version converter manages it.
SUPPORTED_OPSETS = (11, max(24, onnx.defs.onnx_opset_version()))
UPGRADE_TARGET = 13
#: Models whose initializers exceed this are saved with external data.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # leave headroom under protobuf's 2 GiB

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto, ir.Model]


# --------------------------------------------------------------------------- loading
def load_model(src: ModelLike, *, check: bool = True, upgrade_old_opsets: bool = True) -> ir.Model:
    """Load ``src`` into an ``ir.Model``; raise :class:`BadInputError` with a one-line reason."""
    if isinstance(src, ir.Model):
        return src
    if isinstance(src, onnx.ModelProto):
        proto, base_dir, label = src, None, "model"
    elif isinstance(src, (bytes, bytearray)):
        proto, base_dir, label = _parse_bytes(bytes(src), "model bytes"), None, "model bytes"
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        label = str(path)
        if not path.exists():
            raise BadInputError(f"{label}: no such file")
        if path.is_dir():
            raise BadInputError(f"{label}: is a directory, not an ONNX file")
        if path.stat().st_size == 0:
            raise BadInputError(f"{label}: empty file, not an ONNX model")
        proto = _parse_bytes(path.read_bytes(), label)
        base_dir = str(path.parent)
    else:
        raise BadInputError(f"cannot load a model from {type(src).__name__}")

    _check_proto_basics(proto, label)
    if base_dir is not None:
        _check_external_data(proto, base_dir, label)
    if check:
        _run_checker(proto, label, path=str(src) if base_dir is not None else None)
    proto = _check_opset(proto, label, upgrade_old_opsets)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # deserialisation of a checked model failing is still bad input
        raise BadInputError(f"{label}: cannot read the graph ({type(e).__name__}: {e})") from e
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def _parse_bytes(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise BadInputError(f"{label}: not an ONNX model or the file is truncated ({e})") from e
    return proto


def _check_proto_basics(proto: onnx.ModelProto, label: str) -> None:
    # Random bytes sometimes parse as a protobuf with unknown fields only.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise BadInputError(f"{label}: not an ONNX model (no IR version or no graph)")
    if len(proto.graph.node) == 0 and len(proto.graph.output) == 0:
        raise BadInputError(f"{label}: the graph is empty")


def _check_external_data(proto: onnx.ModelProto, base_dir: str, label: str) -> None:
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        # A location that leaves the model's folder is refused from its text alone, before the file
        # system is asked anything: a crafted model must not learn whether some file exists.
        norm = os.path.normpath(location) if location else ""
        if os.path.isabs(location) or norm == ".." or norm.startswith(".." + os.sep):
            raise BadInputError(f"{label}: external data location of tensor '{tensor.name}' points outside the model's folder")
        path = Path(base_dir) / location
        if not location or not path.is_file():
            raise BadInputError(
                f"{label}: external data file '{location}' of tensor '{tensor.name}' is missing"
            )
        need = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if need and path.stat().st_size < need:
            raise BadInputError(
                f"{label}: external data file '{location}' is shorter than tensor '{tensor.name}' needs"
            )


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for sub in attr.graphs:
                    yield from graph_tensors(sub)

    yield from graph_tensors(proto.graph)


def _run_checker(proto: onnx.ModelProto, label: str, path: str | None = None) -> None:
    try:
        if path is not None:
            # From a path the checker resolves external data next to the file.
            onnx.checker.check_model(path)
        elif proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{label}: fails the ONNX checker: {first}") from e
    except Exception as e:
        raise BadInputError(f"{label}: fails the ONNX checker: {e}") from e


def default_opset(proto_or_model: onnx.ModelProto | ir.Model) -> int | None:
    if isinstance(proto_or_model, ir.Model):
        return proto_or_model.opset_imports.get("")
    for op in proto_or_model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return None


def _check_opset(proto: onnx.ModelProto, label: str, upgrade: bool) -> onnx.ModelProto:
    opset = default_opset(proto)
    lo, hi = SUPPORTED_OPSETS
    if opset is None:
        if any(n.domain in ("", "ai.onnx") for n in proto.graph.node):
            raise BadInputError(f"{label}: no default-domain opset import")
        return proto
    if opset > hi:
        raise BadInputError(f"{label}: opset {opset} is newer than onnxcc supports ({lo} to {hi})")
    if opset < lo:
        if not upgrade:
            raise BadInputError(f"{label}: opset {opset} is older than onnxcc supports ({lo} to {hi})")
        # kept as it is: the pipeline upgrades it as its first, verified step (upgrade_model),
        # with the unconverted model as the reference
    return proto


def needs_upgrade(model: ir.Model) -> list[str]:
    """Why ``model`` must be upgraded before any pass (empty when it need not): an opset older than
    :data:`SUPPORTED_OPSETS`, or IR < 4 where every initializer is also a graph input."""
    why = []
    opset = default_opset(model)
    if opset is not None and opset < SUPPORTED_OPSETS[0]:
        why.append(f"opset {opset} to {UPGRADE_TARGET}")
    if any(v.is_initializer() for v in model.graph.inputs):
        why.append(f"IR version {model.ir_version}: initializers listed as graph inputs become constants")
    return why


def upgrade_model(model: ir.Model) -> ir.Model:
    """A new model at a supported opset (onnx's version converter) whose initializers are constants,
    not graph inputs (IR >= 4; the model-zoo files of IR 3 list every weight as an input, which no
    user feeds). The caller verifies that it computes what ``model`` does."""
    proto = ir.to_proto(model)
    inits = {t.name for t in proto.graph.initializer}
    kept = [v for v in proto.graph.input if v.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.ir_version = max(proto.ir_version, 4)
    opset = default_opset(proto)
    if opset is not None and opset < SUPPORTED_OPSETS[0]:
        try:
            proto = onnx.version_converter.convert_version(proto, UPGRADE_TARGET)
            onnx.checker.check_model(proto)
        except Exception as e:
            raise BadInputError(
                f"opset {opset} is older than onnxcc supports ({SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[1]}) and "
                f"onnx's version converter could not upgrade it: {str(e).splitlines()[0] if str(e) else e}"
            ) from e
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import)))
    upgraded = ir.serde.deserialize_model(proto)
    upgraded.meta.update(model.meta)
    _copy_base_dirs(model, upgraded)
    return upgraded


def convert_opset(model: ir.Model, target: int) -> ir.Model:
    """Return ``model`` converted to default-domain opset ``target`` (a new model)."""
    current = default_opset(model)
    if current == target:
        return model
    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot convert opset {current} to {target}: {msg}") from e
    return ir.serde.deserialize_model(converted)


# --------------------------------------------------------------------------- saving
def model_nbytes(model: ir.Model) -> int:
    """Bytes held by initializers (all graphs)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike | None, in_place: bool = False) -> Path:
    """Validate an output path before any work is done; refuse to overwrite an input.

    ``inputs[0]`` is the model (overwritten only with ``in_place``); the others (calibration data,
    labels, a recipe) are never overwritten. A path ending in a separator names a folder, not a file.
    """
    if str(out).endswith((os.sep, "/")):
        raise BadInputError(f"{out}: output path names a folder; give a file name")
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise BadInputError(f"{out}: output path is a directory")
    if not parent.is_dir():
        raise BadInputError(f"{out}: output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"{out}: output folder '{parent}' is not writable")
    for i, src in enumerate(inputs):
        if src is None or not isinstance(src, (str, os.PathLike)):
            continue
        src_p = Path(src)
        if src_p.exists() and out.exists() and out.resolve() == src_p.resolve():
            if i > 0:
                raise BadInputError(f"{out}: refusing to overwrite an input file ({src_p})")
            if not in_place:
                raise BadInputError(f"{out}: refusing to overwrite the input model (pass --in-place to allow it)")
    return out


def check_distinct_outputs(*outputs: str | os.PathLike | None) -> None:
    """Two outputs of one run (model, JSON report, HTML page) must be different files."""
    seen: dict[Path, str] = {}
    for o in outputs:
        if o is None:
            continue
        key = Path(os.path.abspath(o))
        if key in seen:
            raise BadInputError(f"{o}: given for two outputs; each output needs its own file")
        seen[key] = str(o)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> Path:
    """Save ``model`` to ``path`` atomically.

    ``external_data=None`` stores weights externally (``<name>.data`` beside the
    model) only when they would push the file past protobuf's 2 GB limit.
    """
    path = Path(path)
    if external_data is None:
        external_data = model_nbytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data" if external_data else None
    if not external_data:
        _materialise_external(model)  # else the output would point at the input's data file
    with atomic_write(path, *([data_name] if data_name else []), what="model") as tmp_model:
        if data_name:
            ir.save(model, tmp_model, external_data=data_name)
        else:
            proto = ir.to_proto(model)
            _drop_value_info(proto.graph)
            tmp_model.write_bytes(proto.SerializeToString())
    if data_name:  # the model in memory still points at the temporary file: repoint it
        ir.external_data.set_base_dir(model.graph, str(path.parent if str(path.parent) else Path(".")))
    return path


_INFERABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _drop_value_info(graph: onnx.GraphProto) -> None:
    """Type and shape entries that only repeat what ONNX shape inference finds again, dropped: those
    of initializers (the tensor carries them) and, when every node is a standard ONNX op, those of
    intermediate tensors (onnxruntime and onnxcc infer them on load). They are 3-4% of an INT8
    file whose layers are narrow (PP-OCR's detector: 45 kB of 1.37 MB). Entries with a doc string
    or metadata, and every entry of a graph with custom-domain ops, are kept."""
    inits = {t.name for t in graph.initializer}
    standard = all(n.domain in _INFERABLE_DOMAINS for n in graph.node)
    keep = [v for v in graph.value_info if v.doc_string or v.metadata_props or (v.name not in inits and not standard)]
    if len(keep) < len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def model_to_bytes(model: ir.Model) -> bytes:
    """Serialise for onnxruntime; models over 2 GB must go through :func:`saved_copy`."""
    return ir.to_proto(model).SerializeToString()


def has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()
    )


def needs_file(model: ir.Model) -> bool:
    """True when onnxruntime cannot take the model as bytes (over 2 GB, or external tensors)."""
    return model_nbytes(model) >= EXTERNAL_DATA_THRESHOLD or has_external_tensors(model)


@contextlib.contextmanager
def saved_copy(model: ir.Model) -> Iterator[str]:
    """Yield a path to a temporary on-disk copy of ``model`` (external data when needed)."""
    with tempfile.TemporaryDirectory(prefix="onnxcc-") as d:
        p = Path(d) / "model.onnx"
        if needs_file(model):
            ir.save(model, p, external_data="model.onnx.data")
        else:
            p.write_bytes(model_to_bytes(model))
        yield str(p)


#: Above this many bytes of weights, the checker and the size count read the graph without copying
#: the weights into a protobuf (serializing a 460 MB VGG-11 took 2 s a time, several times a run).
LARGE_MODEL_BYTES = 64 * 1024**2


def _stand_in(t: ir.TensorProtocol) -> ir.ExternalTensor:
    """A tensor of the same name, dtype and shape whose data lives 'elsewhere': it serializes as a
    few bytes of external-data reference, never touching the real data."""
    return ir.ExternalTensor("onnxcc-data-left-out", offset=0, length=t.nbytes, dtype=t.dtype, shape=t.shape, name=t.name)


def proto_without_data(model: ir.Model, min_bytes: int = 1024) -> onnx.ModelProto:
    """The model as a proto whose initializers of at least ``min_bytes`` refer to external data
    instead of holding it (the model itself is left as it was): the graph, names, dtypes and
    shapes, without the cost of copying the weights."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for v in graph.initializers.values():
                t = v.const_value
                if t is not None and not isinstance(t, ir.ExternalTensor) and t.nbytes >= min_bytes:
                    swapped.append((v, t))
                    v.const_value = _stand_in(t)
        return ir.to_proto(model)
    finally:
        for v, t in swapped:
            v.const_value = t


def serialized_size(model: ir.Model) -> int:
    """Bytes the model takes as one file: serialized when small; a large model (or one with external
    tensors) counts its tensors' bytes plus the graph serialized without them (exact to a few dozen
    bytes a tensor), instead of serializing the weights only to count them."""
    weights = model_nbytes(model)
    if weights < LARGE_MODEL_BYTES and not has_external_tensors(model):
        return len(model_to_bytes(model))
    return weights + len(proto_without_data(model).SerializeToString())


def check_model(model: ir.Model) -> None:
    """Run the ONNX checker on an in-memory model (through a temp file when it has external data)."""
    if model_nbytes(model) >= LARGE_MODEL_BYTES:
        # Copying hundreds of megabytes just to check is not worth it; the structure is checked
        # without weights. The weights become graph inputs of the same type and shape: a valid
        # model without data.
        proto = proto_without_data(model, min_bytes=0)
        names = {i.name for i in proto.graph.input}
        for t in proto.graph.initializer:
            if t.name not in names:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del proto.graph.initializer[:]
        onnx.checker.check_model(proto)
    elif has_external_tensors(model):
        with saved_copy(model) as p:
            onnx.checker.check_model(p)
    else:
        onnx.checker.check_model(ir.to_proto(model))


def is_dynamic_dim(d) -> bool:
    """A dim that is not a fixed size: symbolic, unknown, or stored as a negative number (some
    paddle2onnx exports write a dynamic batch as -1)."""
    return not (isinstance(d, int) and d >= 0)


def replace_node_output(graph: ir.Graph, gone: ir.Node, keep: ir.Value, *, take_name: bool = False) -> None:
    """Every use of ``gone``'s output reads ``keep`` instead, ``gone`` is removed, and ``keep`` takes
    the old name when that output was a graph output (users read outputs by name), or always with
    ``take_name`` (a rewrite's new node computing the same tensor keeps the exporter's name)."""
    out = gone.outputs[0]
    name, was_output = out.name, out.is_graph_output()
    out.replace_all_uses_with(keep, replace_graph_outputs=True)
    graph.remove(gone, safe=True)
    if was_output or take_name:
        keep.name = name


SHAPE_HINT = "onnxcc.input_shapes"  # model.meta key: a concrete shape per input with dynamic dims


def shape_hint(model: ir.Model) -> dict[str, tuple[int, ...]]:
    """The concrete input shapes (``--input-shape``, or the calibration data's) that analysis,
    targets, refits and timing use for dims the model leaves dynamic; {} when none was given."""
    return dict(model.meta.get(SHAPE_HINT) or {})


def set_shape_hint(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Record concrete input shapes on ``model`` (in memory only: the written model keeps its
    dynamic axes). Only inputs with a dynamic dim other than the batch are kept."""
    hint = {}
    for v in model.graph.inputs:
        if v.name not in shapes or v.shape is None or v.is_initializer():
            continue
        dims = tuple(int(d) for d in shapes[v.name])
        if len(dims) != len(v.shape):
            continue
        if any(is_dynamic_dim(d) for d in list(v.shape.dims)[1:]):
            hint[v.name] = dims
    if hint:
        model.meta[SHAPE_HINT] = hint
    else:
        model.meta.pop(SHAPE_HINT, None)


def apply_shape_hint(model: ir.Model) -> bool:
    """Give the graph inputs their hinted concrete shapes, all but a dynamic batch, and re-infer
    every shape; False when there is no hint."""
    hint = shape_hint(model)
    for v in model.graph.inputs:
        if v.name in hint and v.shape is not None:
            lead = v.shape[0]
            batch = hint[v.name][0] if not is_dynamic_dim(lead) else (None if isinstance(lead, int) else lead)  # -1: dynamic
            v.shape = ir.Shape([batch, *hint[v.name][1:]])  # the batch stays dynamic (any batch runs)
    if hint:
        infer_shapes(model)
    return bool(hint)


@contextlib.contextmanager
def concrete_inputs(model: ir.Model) -> Iterator[None]:
    """Inside the block, the graph inputs take their concrete shapes from :func:`shape_hint` and
    every intermediate shape is inferred from them (spatial sizes, MACs); afterwards the declared
    dynamic shapes, and the graph outputs' declared shapes, are back and re-inferred. Rewrites made
    inside must not bake those sizes into the graph: the pipeline verifies every pass, and fold
    (which would) runs outside it."""
    hint = shape_hint(model)
    if not hint:
        yield
        return
    graph = model.graph
    saved_in = {v.name: v.shape for v in graph.inputs}
    saved_out = [(v.name, v.shape) for v in graph.outputs]
    apply_shape_hint(model)
    try:
        yield
    finally:
        # by name: a pass may have replaced the input's value (quantize rebuilds the graph through
        # its proto), and the concrete sizes must not stay on the written model
        for v in model.graph.inputs:
            if v.name in saved_in:
                v.shape = saved_in[v.name]
        declared = dict(saved_out)
        for v in model.graph.outputs:
            if v.name in declared:
                v.shape = declared[v.name]
        infer_shapes(model)


def clone_model(model: ir.Model) -> ir.Model:
    """Deep copy through the proto (external tensors stay lazily referenced, in the same folders).

    The proto keeps an external tensor's relative location but not the folder it is relative to,
    so each cloned external tensor gets back its original's base directory.
    """
    clone = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    if SHAPE_HINT in model.meta:
        clone.meta[SHAPE_HINT] = dict(model.meta[SHAPE_HINT])
    # The proto has no room for in-memory node metadata (the BN scale fold records for pruning):
    # carry it over node by node; the round trip keeps every graph's node order.
    for src, dst in zip(_all_nodes(model), _all_nodes(clone)):
        if src.meta and src.op_type == dst.op_type:
            dst.meta.update(src.meta)
    _copy_base_dirs(model, clone)
    return clone


def _copy_base_dirs(src: ir.Model, dst: ir.Model) -> None:
    """Give each external tensor of ``dst`` the base directory of the same tensor in ``src`` (a
    proto round trip keeps the relative location, not the folder it is relative to)."""
    dirs = {(t.location, t.offset): t.base_dir for t in _external_tensors(src.graph)}
    if dirs:
        for t in _external_tensors(dst.graph):
            base = dirs.get((t.location, t.offset))
            if base is not None:
                t.base_dir = base


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from model.graph.all_nodes()
    for f in model.functions.values():
        yield from f.all_nodes()


def _materialise_external(model: ir.Model) -> None:
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            v.const_value = ir.tensor(t.numpy(), name=t.name)


def _external_tensors(graph: ir.Graph):
    for v in graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            yield v.const_value
    for node in graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                yield attr.value


# --------------------------------------------------------------------------- graph helpers
def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        # A weight fed as a graph input can be overridden at run time: not a constant.
        if value.is_graph_input():
            return None
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
        for key in ("value_float", "value_int"):
            if key in producer.attributes:
                return np.array(producer.attributes[key].value)
        for key in ("value_floats", "value_ints"):
            if key in producer.attributes:
                return np.array(producer.attributes[key].value)
    return None


def scalar_float(value: ir.Value | None) -> float | None:
    """The value of a one-element floating-point constant, else None."""
    c = const_array(value)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.floating) else None


def positive_scale(node: ir.Node, value: ir.Value) -> float | None:
    """``s`` when ``node`` computes ``value · s`` or ``value / (1/s)`` with a positive scalar
    constant ``s`` (``value`` the numerator of a Div), else None."""
    if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    if value is not node.inputs[0] and (node.op_type == "Div" or value is not node.inputs[1]):
        return None
    c = scalar_float(node.inputs[1] if value is node.inputs[0] else node.inputs[0])
    if c is None or c <= 0:
        return None
    return c if node.op_type == "Mul" else 1.0 / c


def concrete_shape(value: ir.Value | None, batch: int = 1) -> tuple[int, ...] | None:
    """Shape with the leading symbolic dim read as ``batch``; None if another dim is unknown."""
    if value is None or value.shape is None:
        return None
    dims = []
    for i, d in enumerate(value.shape.dims):
        if not is_dynamic_dim(d):
            dims.append(d)
        elif i == 0:  # symbolic, or stored as -1 (paddle2onnx): the batch
            dims.append(batch)
        else:
            return None
    return tuple(dims)


def infer_shapes(model: ir.Model) -> ir.Model:
    """Re-run ONNX shape inference in place, after dropping stale intermediate shapes."""
    from onnx_ir.passes.common import ShapeInferencePass

    graph_outputs = set(id(v) for v in model.graph.outputs)
    standins = []
    for node in model.graph.all_nodes():
        for out in node.outputs:
            if id(out) not in graph_outputs and not out.is_initializer():
                out.shape = None
        if (node.domain, node.op_type) in _SHAPE_STANDINS:  # ONNX cannot infer contrib ops: borrow the ONNX op's rule
            standins.append((node, node.domain, node.op_type, list(node.inputs)))
            node.op_type, node.domain = _SHAPE_STANDINS[node.domain, node.op_type]
            node.resize_inputs(1)
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    finally:
        for node, domain, op_type, inputs in standins:
            node.op_type, node.domain = op_type, domain
            node.resize_inputs(len(inputs))
            for i, v in enumerate(inputs):
                node.replace_input_with(i, v)
    return model


#: contrib ops whose outputs have the shapes of an ONNX op's given only input 0 and the attributes
_SHAPE_STANDINS = {("com.microsoft", "DynamicQuantizeLSTM"): ("LSTM", "")}


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : a name no initializer, graph input, node output or
    node uses."""
    taken = set(graph.initializers)
    taken.update(v.name for v in graph.inputs)
    for node in graph:
        taken.update(o.name for o in node.outputs if o.name)
        if node.name:
            taken.add(node.name)  # unique as a node name too: callers name nodes with it
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def name_unnamed_nodes(graph: ir.Graph) -> int:
    """Give every unnamed node a unique name (``conv_0``, ``relu_1``...); returns how many were named.

    ONNX allows unnamed nodes, but passes name what they add after the layer it belongs to
    (``<conv>_weight_dq``) and reports name layers by node: two unnamed convs would give two
    DequantizeLinear nodes of the same name, which onnxruntime refuses to load.
    """
    taken = {n.name for n in graph.all_nodes() if n.name}
    k = named = 0
    for node in graph.all_nodes():
        if node.name:
            continue
        while f"{node.op_type.lower()}_{k}" in taken:
            k += 1
        node.name = f"{node.op_type.lower()}_{k}"
        taken.add(node.name)
        named += 1
    return named


def c_order(arr) -> np.ndarray:
    """``arr`` as a C-contiguous numpy array of the same shape (``np.ascontiguousarray`` turns a
    0-d scale into shape (1,), which changes the graph's declared shapes)."""
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def add_initializer(graph: ir.Graph, name: str, value: "np.ndarray | ir.TensorProtocol") -> ir.Value:
    """Register a new initializer (numpy array or onnx_ir tensor) under a unique name based on ``name``."""
    if isinstance(value, ir.TensorProtocol):
        tensor = value
    else:
        tensor = ir.tensor(c_order(value))
    v = ir.Value(name=unique_name(graph, name), shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(v)
    return v


def set_input_const(graph: ir.Graph, node: ir.Node, idx: int, arr: np.ndarray) -> None:
    """Give ``node`` input ``idx`` the constant ``arr`` (a private copy when the constant is shared)."""
    v = node.inputs[idx] if idx < len(node.inputs) else None
    dtype = v.const_value.dtype if v is not None and v.const_value is not None else None
    t = ir.tensor(c_order(arr)) if dtype is None else ir.tensor(c_order(np.asarray(arr).astype(dtype.numpy())))
    if v is not None and v.const_value is not None and len(v.uses()) == 1 and not v.is_graph_input() and not v.is_graph_output():
        v.const_value = t
        v.shape = ir.Shape(arr.shape)
        return
    new = add_initializer(graph, f"{v.name if v is not None and v.name else node.name + '_param'}_pruned", t)
    if len(node.inputs) <= idx:
        node.resize_inputs(idx + 1)
    node.replace_input_with(idx, new)


def replace_contents(model: ir.Model, new: ir.Model) -> None:
    """Move ``new``'s graph, IR version and functions into ``model`` (passes must return the same object)."""
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)


def gemm_as_matmul(node: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """A Gemm with constant operands as ``x @ W + bias``: (W as [K, N] with transB and alpha folded in,
    beta·C or None, why not); why-not is set for transA=1 or a non-constant weight or bias."""
    a = node.attributes
    if a.get("transA") is not None and a["transA"].value:
        return None, None, "Gemm with transA=1"
    w = const_array(node.inputs[1])
    if w is None:
        return None, None, "weight is not a constant"
    if a.get("transB") is not None and a["transB"].value:
        w = w.T
    alpha = a["alpha"].value if a.get("alpha") is not None else 1.0
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_array(node.inputs[2])
        if c is None:
            return None, None, "bias is not a constant"
        beta = a["beta"].value if a.get("beta") is not None else 1.0
        bias = (beta * c).astype(np.float32)
    return (alpha * w).astype(np.float32), bias, ""


def attr(node: ir.Node, name: str, default=None):
    """The value of a node's attribute, or ``default`` when it is not set."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({', '.join(v.name or '?' for v in node.outputs)})"


def exclude_match(node: ir.Node, patterns: Sequence[str]) -> str | None:
    """The first of the user's ``--exclude`` patterns (fnmatch, case-sensitive) that ``node``'s
    name matches, else None."""
    name = node.name or ""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
