import argparse
import subprocess
import sys

import pytest

from dataset.cli import OneLineParser, check_range, exit_code_of, number, one_line, run_cli


def test_number_parses_and_rejects_nan_inf_and_out_of_range() -> None:
    scale = number(float, min=0.0)
    assert scale("1.5") == 1.5
    for bad in ("nan", "inf", "-inf", "abc", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale(bad)
    steps = number(int, min=1)
    assert steps("3") == 3
    for bad in ("0", "2.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            steps(bad)
    frac = number(float, min=0.0, max=1.0, max_open=True)
    assert frac("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\)"):
        frac("1")


def test_check_range_names_the_value() -> None:
    assert check_range(2, "--steps", min=1) == 2
    with pytest.raises(ValueError, match="--weight=nan is out of range"):
        check_range(float("nan"), "--weight", min=0)
    with pytest.raises(ValueError, match=r"expected a finite value in \(0, inf\)"):
        check_range(0.0, "pitch", min=0, min_open=True)


def test_parser_error_is_one_line_exit_2(capsys) -> None:
    p = OneLineParser(prog="prog")
    p.add_argument("--scale", type=number(float, min=0.0), required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--scale", "nan"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: argument --scale") and "finite" in err


class _Stop(RuntimeError):
    exit_code = 3


@pytest.mark.parametrize("err, code, text", [
    (ValueError("bad value\nsecond line"), 2, "prog: error: bad value second line"),
    (FileNotFoundError("x.ckpt: no such file"), 2, "prog: error: x.ckpt: no such file"),
    (FileExistsError("out.nii.gz: already exists"), 2, "prog: error: out.nii.gz: already exists"),
    (_Stop("non-finite loss"), 3, "prog: error: non-finite loss"),
    (KeyboardInterrupt(), 130, "prog: interrupted"),
    (ZeroDivisionError("division by zero"), 1, "prog: internal error: ZeroDivisionError: division by zero"),
])
def test_run_cli_maps_errors_to_codes_without_traceback(err, code, text, capsys) -> None:
    def fail():
        raise err

    assert run_cli("prog", fail) == code
    out = capsys.readouterr().err.strip()
    assert out.startswith(text) and "Traceback" not in out and out.count("\n") == 0
    assert exit_code_of(err) == code


def test_run_cli_returns_the_functions_code() -> None:
    assert run_cli("prog", lambda: None) == 0
    assert run_cli("prog", lambda: 4) == 4


def test_one_line_keeps_the_first_line_of_long_messages() -> None:
    assert one_line("a\nb") == "a b"
    assert one_line("first\n2\n3\n4\n5") == "first"


def test_interrupt_in_a_subprocess_exits_130_without_traceback() -> None:
    code = ("from dataset.cli import run_cli\nimport sys\n"
            "def f():\n    raise KeyboardInterrupt\nsys.exit(run_cli('prog', f))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8")
    assert r.returncode == 130 and "Traceback" not in r.stderr and "prog: interrupted" in r.stderr


# In a fresh process: how many bytes glibc holds in mmap'ed blocks while a 96 MB tensor is alive, after run_cli
# has started (which applies reuse_freed_memory), and whether freeing and re-allocating it reuses the address.
_MMAP_PROBE = """
import ctypes, json, sys
import torch
from dataset.cli import run_cli, reuse_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def work():
    before = libc.mallinfo2().hblkhd
    x = torch.ones(24 * 2**20)  # 96 MB, above glibc's largest mmap threshold (32 MB)
    mapped = libc.mallinfo2().hblkhd - before
    del x
    print(json.dumps({"applied": reuse_freed_memory(), "mapped_mb": mapped / 2**20}))

sys.exit(run_cli("probe", work))
"""


def _probe(env: dict) -> dict:
    import json
    import os
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc malloc only")
    r = subprocess.run([sys.executable, "-c", _MMAP_PROBE], capture_output=True, text=True, encoding="utf-8",
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cli_processes_reuse_freed_memory_instead_of_fresh_mmaps() -> None:
    """A CLI process serves large tensors from the heap (reused after free, no page-by-page zeroing by the
    kernel); XRAY2CT_MALLOC=system keeps glibc's default of one fresh mmap per large block."""
    tuned = _probe({"XRAY2CT_MALLOC": ""})
    assert tuned["applied"] is True and tuned["mapped_mb"] == 0
    default = _probe({"XRAY2CT_MALLOC": "system"})
    assert default["applied"] is False and default["mapped_mb"] >= 96
