"""conv3d weight gradient on this CPU: oneDNN's own against the batch/channel-swapped forward convolution.

The choice :func:`ddpm.fast_conv.routes_to_swapped_weight_grad` makes per shape. Prints one JSON object: for each shape
(the demo networks' training convolutions by default), milliseconds of both ways (best of ``--repeats``, interleaved,
pad and layout copies included), their ratio, and whether the route takes the swap here. Without AVX-512 the swap
wins; to see that on an AVX-512 machine, cap both libraries' instruction set:
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python -m benchmarks.bench_conv_weight_grad``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from benchmarks.common import environment
from dataset.cli import OneLineParser, number, reuse_freed_memory, run_cli
from ddpm import fast_conv

# (batch, in channels, out channels, grid edge, channels-last): convolutions of the demo networks' sizes (autoencoder:
# 2 x 32^3 patches, NDHWC; BiFlowNet: 4 x 16^3 latents), in both layouts
SHAPES = [(2, 16, 16, 32, False), (2, 32, 16, 32, False), (2, 16, 16, 32, True), (4, 16, 16, 16, True),
          (4, 32, 16, 16, True), (4, 32, 16, 16, False), (4, 32, 32, 8, True)]


def time_both(batch: int, cin: int, cout: int, edge: int, channels_last: bool, repeats: int) -> dict:
    """Best-of-``repeats`` milliseconds of both weight gradients of a 3^3, padding-1 convolution of that shape (the
    route's own runs and timing: :func:`ddpm.fast_conv._weight_grad_runs`, :func:`ddpm.fast_conv._best_times`)."""
    x_shape, w_shape = (batch, cin, edge, edge, edge), (cout, cin, 3, 3, 3)
    runs = fast_conv._weight_grad_runs(x_shape, w_shape, (1, 1, 1), channels_last)
    out = {k: round(v * 1e3, 3) for k, v in zip(("onednn_ms", "swapped_ms"), fast_conv._best_times(runs, repeats))}
    x = torch.empty(x_shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.enable_grad():
        taken = fast_conv.routes_to_swapped_weight_grad(x, torch.empty(w_shape, requires_grad=True), (1, 1, 1),
                                                        (1, 1, 1), (1, 1, 1), 1)
    return {"shape": f"{batch}x{cin}->{cout}x{edge}^3" + (" channels-last" if channels_last else ""), **out,
            "ratio": round(out["swapped_ms"] / out["onednn_ms"], 3), "route_takes_swap": taken}


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.bench_conv_weight_grad", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=number(int, min=1), default=10)
    p.add_argument("--threads", type=number(int, min=1), default=None, help="torch threads (default: as is)")
    p.add_argument("--shapes", type=int, nargs=5, action="append", metavar=("B", "CIN", "COUT", "EDGE", "CL"),
                   help="a shape to time instead of the defaults (CL: 1 channels-last, 0 contiguous); repeatable")
    args = p.parse_args(argv)

    def work() -> int:
        reuse_freed_memory()
        if args.threads:
            torch.set_num_threads(args.threads)
        for s in args.shapes or []:
            if min(s[:4]) < 1 or s[4] not in (0, 1):
                raise ValueError(f"--shapes {' '.join(map(str, s))}: expected batch, channels and edge >= 1 and a "
                                 "layout of 0 (contiguous) or 1 (channels-last)")
        shapes = [tuple(s[:4]) + (bool(s[4]),) for s in args.shapes] if args.shapes else SHAPES
        result = {**environment(torch.device("cpu")), "cpu_capability": fast_conv.cpu_capability(),
                  "shapes": [time_both(*s, repeats=args.repeats) for s in shapes]}
        print(json.dumps(result))
        return 0

    return run_cli(p.prog, work)


if __name__ == "__main__":
    raise SystemExit(main())
