"""benchmarks/gpu_bundle + gpu_check.sh on a bare GPU image: the pieces import nothing the image and bundle lack.

A stock PyTorch image is emulated by a ``sitecustomize`` that refuses every installed distribution outside
:data:`benchmarks.gpu_bundle.IMAGE`, ``BUNDLED``, ``CODE_ONLY`` and their declared dependencies (the bundled
packages themselves come from this environment: building the bundle needs a package index, which tests do not
use).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import gpu_bundle
from tests.cli import exit_code

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ALWAYS = ("pip", "setuptools", "wheel")  # every Python image has them; site.py may have imported them already

GUARD = '''
import importlib.abc, importlib.machinery, re, sys
FORBIDDEN = set({forbidden!r})  # top-level modules
FORBIDDEN_DISTS = set({dists!r})  # distribution names: hidden from importlib.metadata as well
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in FORBIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the emulated GPU image)", name=name)
        return None
sys.meta_path.insert(0, Guard())
_find_distributions = importlib.machinery.PathFinder.find_distributions
def _visible(*args, **kwargs):
    for dist in _find_distributions(*args, **kwargs):
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() not in FORBIDDEN_DISTS:
            yield dist
importlib.machinery.PathFinder.find_distributions = staticmethod(_visible)
'''


def requirements(name: str) -> list[str]:
    """The distributions ``name`` requires as installed here (no extras; markers for this Python)."""
    try:
        lines = md.requires(name) or []
    except md.PackageNotFoundError:
        return []
    reqs = [Requirement(line) for line in lines]
    return [canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def image_distributions() -> set[str]:
    """The emulated stock image: IMAGE and what it requires, as installed here."""
    seen: set[str] = set()
    stack = [canonicalize_name(n) for n in (*gpu_bundle.IMAGE, *ALWAYS)]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(requirements(name))
    return seen


def allowed_distributions() -> set[str]:
    """What a GPU machine has once the bundle is installed: the image, BUNDLED and CODE_ONLY (no dependencies)."""
    return image_distributions() | {canonicalize_name(n) for n in (*gpu_bundle.BUNDLED, *gpu_bundle.CODE_ONLY)}


def forbidden_modules(allowed: set[str]) -> list[str]:
    """Top-level modules installed here whose distributions are all outside ``allowed``."""
    return sorted(module for module, dists in md.packages_distributions().items()
                  if not module.startswith("_") and all(canonicalize_name(d) not in allowed for d in dists))


def guarded_env(tmp_path: Path, allowed: set[str], also_forbidden: tuple[str, ...] = ()) -> dict:
    """The environment of a subprocess that sees only the ``allowed`` distributions (and not ``also_forbidden``)."""
    dists = sorted({canonicalize_name(d.metadata["Name"]) for d in md.distributions()} - allowed)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD.format(forbidden=forbidden_modules(allowed) + list(also_forbidden),
                                                         dists=dists))
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_BUDGET_S": "900",
            "PYTHONPATH": str(guard), "GPU_BUNDLE": str(tmp_path / "no_bundle")}


def test_bundle_brings_every_dependency_the_image_lacks() -> None:
    have = allowed_distributions()
    missing = {f"{name} -> {dep}" for name in gpu_bundle.BUNDLED for dep in requirements(name) if dep not in have}
    assert not missing


def test_the_emulated_image_lacks_what_the_bundle_brings() -> None:
    forbidden = forbidden_modules(image_distributions())
    # the guard is not vacuous: outside the image are libraries this environment has and the pieces could reach
    assert {"pydicom", "optuna", "kornia", "wandb", "torchio", "monai", "hydra", "SimpleITK"} <= set(forbidden)
    assert {"torch", "lightning", "einops", "numpy"}.isdisjoint(forbidden)


def test_script_refuses_a_python_that_lacks_a_library(tmp_path: Path) -> None:
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          env=guarded_env(tmp_path, allowed_distributions(), ("monai",)), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.sh: error:") and "monai (ModuleNotFoundError" in lines[0]
    assert "python -m benchmarks.gpu_bundle" in lines[0]
    assert "== env" not in proc.stdout and not any(out.iterdir())


def test_bundle_cli_refuses_bad_arguments(tmp_path: Path, capsys) -> None:
    assert exit_code(gpu_bundle.main, ["--out", str(tmp_path / "b"), "--python-version", "3.x"]) == 2
    assert "--python-version" in capsys.readouterr().err
    assert exit_code(gpu_bundle.main, ["--out", str(tmp_path / "b"), "--max-mib", "0"]) == 2
    assert not (tmp_path / "b").exists()


def test_code_only_copy_drops_data_and_keeps_the_renderers(tmp_path: Path) -> None:
    size = gpu_bundle.copy_code("diffdrr", tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert "diffdrr/renderers.py" in files and "diffdrr/__init__.py" in files
    assert all(f.endswith(".py") for f in files) and not any("/data/" in f for f in files)
    assert size < 2 * 2**20  # the 34 MB example CT stays behind


@pytest.mark.slow
def test_script_dry_run_imports_only_the_image_and_the_bundle(tmp_path: Path) -> None:
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          env=guarded_env(tmp_path, allowed_distributions()), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failed_or_missing"] == []
