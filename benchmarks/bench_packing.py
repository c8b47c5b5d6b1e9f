"""What the CPU packed-weight path costs: packing the expert weights, and the batch-invariant layer.

Run from the repository root:

    python benchmarks/bench_packing.py            # writes benchmarks/results/packing_cpu.md
    python benchmarks/bench_packing.py --quick    # tiny shapes, a smoke test (results/quick)

- Packing: ops.pack_expert_weights into a fresh buffer and into the buffer of an earlier pack
  (what the layer's cache does after an optimizer step), against a copy_ of the same bytes.
- batch_invariant: MoELayer(batch_invariant=True) against the same layer without it, forward
  (no_grad) and forward+backward, timed in interleaved rounds in one process.
- On CPUs with AMX, the rule that bf16 training steps never pack and forwards from
  packing.AMX_UNPACKED_MIN_ROWS rows per expert run unpacked, against packing as on the other
  CPUs (packing._amx_rule off: training steps from 65 rows per expert, forwards always on the
  panels), in interleaved rounds on the ladder's bf16 layers.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_layer  # noqa: E402
import bench_report  # noqa: E402
import sparsemoe  # noqa: E402
from sparsemoe import ops, packing  # noqa: E402

# (name, d, f, E, k): the ladder's CPU shapes (benchmarks/bench_layer.py).
SHAPES = [("mixtral-like", 512, 1792, 8, 2), ("olmoe-like", 512, 256, 64, 8), ("qwen3-like", 512, 192, 128, 8)]
QUICK_SHAPES = [(name, 64, max(16, f // 8), E, k) for name, _, f, E, k in SHAPES]


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def packing_rows(shapes, runs: int) -> list[str]:
    rows = ["| shape | dtype | packed MiB | pack ms (fresh) | pack ms (into an earlier buffer) | copy_ ms |",
            "|---|---|---:|---:|---:|---:|"]
    for name, d, f, E, _ in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            w1, w2 = (torch.randn(E, 2 * f, d) * 0.05).to(dtype), (torch.randn(E, d, f) * 0.05).to(dtype)
            out = ops.pack_expert_weights(w1, w2)
            src, dst = torch.empty_like(out), torch.empty_like(out)
            fresh = median_ms(lambda: ops.pack_expert_weights(w1, w2), runs)
            into = median_ms(lambda: ops.pack_expert_weights(w1, w2, out=out), runs)
            copy = median_ms(lambda: dst.copy_(src), runs)
            rows.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {out.nbytes / 2**20:.0f} | {fresh:.1f} | "
                        f"{into:.1f} | {copy:.1f} |")
    return rows


def invariance_rows(shapes, tokens, rounds: int) -> list[str]:
    rows = ["| shape | T | pass | plain ms | batch_invariant ms | ratio |", "|---|---:|---|---:|---:|---:|"]
    for name, d, f, E, k in shapes:
        torch.manual_seed(0)
        plain = sparsemoe.MoELayer(d, f, E, k)
        torch.nn.init.normal_(plain.router.weight, std=d ** -0.5)
        invariant = sparsemoe.MoELayer(d, f, E, k, batch_invariant=True)
        invariant.load_state_dict(plain.state_dict())
        for T in tokens:
            x = torch.randn(T, d)
            for pass_ in ("fwd", "fwd+bwd"):
                def step(layer):
                    if pass_ == "fwd":
                        with torch.no_grad():
                            layer(x)
                    else:
                        # An optimizer step would make the panels stale: drop them, so packing counts.
                        layer.clear_packed_weights()
                        for p in layer.parameters():
                            p.grad = None
                        layer(x).sum().backward()
                times = {id(layer): [] for layer in (plain, invariant)}
                for layer in (plain, invariant):
                    step(layer)
                for _ in range(rounds):
                    for layer in (plain, invariant):
                        step(layer)  # untimed: the other layer left the caches in its own state
                        t0 = time.perf_counter()
                        step(layer)
                        times[id(layer)].append(time.perf_counter() - t0)
                a, b = (1e3 * statistics.median(times[id(m)]) for m in (plain, invariant))
                rows.append(f"| {name} | {T} | {pass_} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    return rows


# (shape, pass, T) for the AMX rule: rows per expert from 128 to 1024, on both sides of its limits.
AMX_CASES = [("mixtral-like", "fwd+bwd", 512), ("mixtral-like", "fwd+bwd", 2048), ("olmoe-like", "fwd+bwd", 1024),
             ("olmoe-like", "fwd+bwd", 2048), ("qwen3-like", "fwd+bwd", 2048), ("qwen3-like", "fwd", 4096),
             ("mixtral-like", "fwd", 1024), ("mixtral-like", "fwd", 2048), ("mixtral-like", "fwd", 4096),
             ("olmoe-like", "fwd", 8192)]


def amx_rule_rows(shapes, warmup: int, runs: int) -> list[str]:
    rows = ["| shape | T | rows per expert | pass | packs as elsewhere ms | AMX rule ms | ratio |",
            "|---|---:|---:|---|---:|---:|---:|"]

    def with_rule(on: bool, step):
        def run():
            packing._amx_rule = on
            step()
        return run

    try:
        for name, pass_, T in AMX_CASES:
            shape = next(s for s in shapes if s.name == name)
            torch.manual_seed(0)
            layer = bench_layer.make_layer(shape, torch.bfloat16, "cpu")
            x = torch.randn(T, shape.d, dtype=torch.bfloat16, requires_grad=pass_ != "fwd")
            if pass_ == "fwd":
                step = bench_layer.forward_step(layer, x)  # the panels stay cached between runs
            else:
                g = torch.randn(T, shape.d, dtype=torch.bfloat16)
                step = bench_layer.train_step(layer, x, [x, *layer.parameters()], g)
            ms, _ = bench_layer.round_robin_ms({"off": with_rule(False, step), "on": with_rule(True, step)},
                                               warmup, runs, "cpu")
            rows.append(f"| {name} | {T} | {T * shape.k // shape.E} | {pass_} | {ms['off']:.2f} | {ms['on']:.2f} | "
                        f"{ms['off'] / ms['on']:.2f} |")
            print(rows[-1], flush=True)
    finally:
        packing._amx_rule = True
    return rows


def main(argv: list[str] | None = None) -> None:
    args, out = bench_report.quick_cli(__doc__, argv)
    if not ops.packed_kernels_available():
        sys.exit("bench_packing: oneDNN's micro-kernel is not available here (python -m sparsemoe info)")
    shapes, runs, rounds = (QUICK_SHAPES, 3, 3) if args.quick else (SHAPES, 9, 11)
    tokens = (1, 32) if args.quick else (1, 32, 512)
    t0 = time.perf_counter()
    packed, invariance = packing_rows(shapes, runs), invariance_rows(shapes, tokens, rounds)
    amx = []
    if ops.panels_in_pairs(torch.bfloat16) and ops.bf16_gemm_hardware() == "AMX":
        layer_shapes = bench_layer.QUICK_SHAPES if args.quick else bench_layer.CPU_SHAPES
        amx = ["## bf16 on AMX: the unpacked rule against packing as elsewhere", "",
               *amx_rule_rows(layer_shapes, 1 if args.quick else 3, 3 if args.quick else 12), ""]
    lines = ["# sparsemoe on CPU: packing the expert weights, and the batch-invariant layer", "",
             *bench_report.machine_info("cpu"),
             f"- command: `python benchmarks/bench_packing.py{' --quick' if args.quick else ''}`",
             f"- protocol: packing and copy_: median of {runs} runs after one; batch_invariant: median of {rounds} "
             "interleaved rounds, each timed run after an untimed one of the same layer; fwd+bwd drops the packed "
             "weights first (as an optimizer step would make them stale), so packing counts in its time",
             f"- total time: {time.perf_counter() - t0:.0f} s", "",
             "## Packing (ops.pack_expert_weights), 2 threads", "", *packed, "",
             "## MoELayer(batch_invariant=True) against the plain layer, float32", "", *invariance, "", *amx]
    path = out / "packing_cpu.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
