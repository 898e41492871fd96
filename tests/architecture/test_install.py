"""What ``pip install .`` puts in site-packages: one top-level package, ``onnxcc``, that a user's own
``compiler/`` or ``passes/`` folder on ``sys.path`` cannot shadow."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, cwd=out)
    return next(out.glob("onnxcc-*.whl"))


def test_the_wheel_installs_only_onnxcc_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"onnxcc"}
    for must in ("onnxcc/__init__.py", "onnxcc/compiler/pipeline.py", "onnxcc/passes/__init__.py",
                 "onnxcc/passes/quantization/qdq.py", "onnxcc/compiler/recipes/int8-x86.yaml", "onnxcc/models/builders.py"):
        assert must in names, must
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "onnxcc = onnxcc.compiler.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_a_users_own_passes_and_compiler_folders_do_not_break_the_api(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    user = tmp_path / "project"  # a user's project with folders of the same names on sys.path
    for pkg in ("passes", "compiler"):
        (user / pkg).mkdir(parents=True)
        (user / pkg / "__init__.py").write_text("raise ImportError('the user package was imported')\n")
    code = (
        "import onnxcc, numpy as np\n"
        "from onnxcc import compile_model\n"
        "from onnxcc.models.builders import build\n"
        "from onnxcc.compiler.registry import registered_passes\n"
        f"assert onnxcc.__file__.startswith({str(target)!r}), onnxcc.__file__\n"
        "assert 'fold' in registered_passes() and 'quantize' in registered_passes()\n"
        "r = compile_model(build('resnet', 'tiny', seed=0), ['fold'], measure_latency=False)\n"
        "print(r.report['passes'][0]['pass'])\n"
    )
    env = {"PYTHONPATH": f"{target}:{user}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=user, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fold"
