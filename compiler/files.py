"""Files onnxcc writes and measures (core layer): one atomic writer, one file-size count.

Every output (model, external data, JSON report, HTML page, plot) is written
through :func:`atomic_write`: the bytes go to a temporary folder beside the
destination and are renamed into place only when writing succeeded, so a failed
or interrupted run leaves no half-written file and never touches what was there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from onnxcc.compiler.errors import BadInputError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *companions: str, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path to write ``path`` at; on success it (and each companion file name
    written beside it in the same temporary folder, e.g. external data) is renamed into place."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"{path}: output folder '{parent}' does not exist")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxcc-", dir=parent))
    except OSError as e:
        raise BadInputError(f"{path}: cannot write to '{parent}': {e.strerror}") from e
    try:
        yield tmpdir / path.name
        for name in companions:  # companions first: the main file is the one readers look for
            os.replace(tmpdir / name, parent / name)
        os.replace(tmpdir / path.name, path)
    except OSError as e:
        raise BadInputError(f"{path}: cannot write the {what}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files a model file references (that exist), each once. Read once per
    version of the file (a run asks about its input several times; parsing a 460 MB model takes
    half a second)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return []
    return list(_external_data_files(str(p.resolve()), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _external_data_files(path: str, mtime_ns: int, size: int) -> tuple[Path, ...]:
    import onnx

    p = Path(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model (or unreadable): no data files
        return ()
    seen: list[Path] = []
    for t in _tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if location:
            f = (p.parent / location).resolve()
            if f not in seen and f.is_file():
                seen.append(f)
    return tuple(seen)


def file_size(path: str | os.PathLike, *, external: bool = True) -> int:
    """Bytes of a model file plus every external-data file it references (the torch dynamo
    exporter's default layout), each counted once; ``external=False``: the caller knows the file
    references none (a model onnxcc just wrote with its weights inside)."""
    data = external_data_files(path) if external else []
    return Path(path).stat().st_size + sum(f.stat().st_size for f in data)


def _tensors(graph) -> Iterator:
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _tensors(g)
