"""What the unpacked bf16 forward on the weights in place (ops.native_forward_runs) buys.

Run from the repository root:

    python benchmarks/bench_native.py            # writes benchmarks/results/native_cpu.md
    python benchmarks/bench_native.py --quick    # tiny shapes, a smoke test (results/quick)

The bfloat16 MoELayer of the ladder's shapes (benchmarks/bench_layer.py), timed in interleaved
rounds in one process (bench_layer.round_robin_ms), three ways:
- native: this build's default. A training step packs the expert weights only above
  _C.native_forward_max_rows rows per expert on average (never on AMX CPUs, packing.py);
  below, its forward blocks of
  _C.native_forward_min_rows.._C.native_forward_max_rows rows run on the weights in place.
- packs from 16 rows: ops.set_native_forward(False) and packing._amx_rule off, the layer as
  before the in-place blocks: a training step packs from packing.PACK_MIN_ROWS rows per expert
  on average, and runs on ATen's GEMMs below.
- ATen GEMMs: ops.set_native_forward(False) and packed_weights=False.
Passes: a training step (forward + backward of (out * g).sum() into the input and every parameter,
the packed weights dropped first as an optimizer step would make them stale, so packing counts),
and the forward alone under no_grad without packed weights (the kernels alone: an inference that
turns the cache off for memory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_layer  # noqa: E402
import bench_report  # noqa: E402
import sparsemoe  # noqa: E402
from sparsemoe import ops, packing  # noqa: E402

SHAPES = [s for s in bench_layer.CPU_SHAPES if s.name in ("mixtral-like", "olmoe-like", "qwen3-like")]
QUICK_SHAPES = [s for s in bench_layer.QUICK_SHAPES if s.name in ("olmoe-like", "qwen3-like")]


def with_native(enabled: bool, step):
    """`step` with the in-place blocks on (this build's default) or off; off also packs as a CPU
    without AMX does (packing._amx_rule), so that "packs from 16 rows" packs on AMX CPUs too."""
    def run():
        ops.set_native_forward(enabled)
        packing._amx_rule = enabled
        step()
    return run


def native_rows(shapes, tokens, warmup: int, runs: int) -> list[str]:
    rows = ["| shape | T | rows per expert | pass | native ms | packs from 16 rows ms | ATen GEMMs ms | "
            "packs from 16 rows / native | ATen / native |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    dtype = torch.bfloat16
    try:
        for shape in shapes:
            torch.manual_seed(0)
            layer = bench_layer.make_layer(shape, dtype, "cpu")
            unpacked = sparsemoe.MoELayer(shape.d, shape.f, shape.E, shape.k, dtype=dtype, packed_weights=False)
            unpacked.load_state_dict(layer.state_dict())
            for T in tokens:
                x = torch.randn(T, shape.d, dtype=dtype, requires_grad=True)
                g = torch.randn(T, shape.d, dtype=dtype)
                train = {m: bench_layer.train_step(m, x, [x, *m.parameters()], g) for m in (layer, unpacked)}
                passes = {
                    "fwd+bwd": {"native": with_native(True, train[layer]),
                                "packs": with_native(False, train[layer]),
                                "aten": with_native(False, train[unpacked])},
                    "fwd (no_grad, unpacked)": {"native": with_native(True, bench_layer.forward_step(unpacked, x)),
                                                "aten": with_native(False, bench_layer.forward_step(unpacked, x))},
                }
                for name, steps in passes.items():
                    ms, _ = bench_layer.round_robin_ms(steps, warmup, runs, "cpu")
                    packs = ms.get("packs")
                    cell = f"{packs:.2f}" if packs is not None else ""
                    ratio = f"{packs / ms['native']:.2f}" if packs is not None else ""
                    rows.append(f"| {shape.name} | {T} | {T * shape.k / shape.E:.0f} | {name} | {ms['native']:.2f} | "
                                f"{cell} | {ms['aten']:.2f} | {ratio} | {ms['aten'] / ms['native']:.2f} |")
                    print(rows[-1], flush=True)
    finally:
        ops.set_native_forward(True)
        packing._amx_rule = True
    return rows


def main(argv: list[str] | None = None) -> None:
    args, out = bench_report.quick_cli(__doc__, argv)
    if not ops.native_forward_runs(torch.bfloat16):
        sys.exit("bench_native: the bf16 forward does not run on the weights in place here (python -m sparsemoe info)")
    shapes, warmup, runs = (QUICK_SHAPES, 1, 3) if args.quick else (SHAPES, 2, 11)
    tokens = (16, 64) if args.quick else (128, 512, 2048)
    t0 = time.perf_counter()
    rows = native_rows(shapes, tokens, warmup, runs)
    lines = ["# sparsemoe on CPU: the bfloat16 forward on the weights in place", "",
             *bench_report.machine_info("cpu"),
             f"- command: `python benchmarks/bench_native.py{' --quick' if args.quick else ''}`",
             f"- protocol: median of {runs} interleaved rounds after {warmup} warm-up ones (bench_layer.round_robin_ms), "
             "each timed run after an untimed one of the same implementation; fwd+bwd drops the packed weights "
             "first, as an optimizer step would make them stale, so packing counts in its time",
             f"- native blocks take experts with {sparsemoe._C.native_forward_min_rows} to "
             f"{sparsemoe._C.native_forward_max_rows} rows; rows per expert is T * k / E, the average",
             f"- total time: {time.perf_counter() - t0:.0f} s", "",
             *rows, ""]
    path = out / "native_cpu.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
