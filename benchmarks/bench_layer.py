"""The benchmark ladder of sparsemoe.MoELayer against the MoE implementations people run today.

Run from the repository root:

    python benchmarks/bench_layer.py                  # the full ladder (CPU, fp32 + bf16)
    python benchmarks/bench_layer.py --quick          # tiny shapes, seconds; a smoke test
    python benchmarks/bench_layer.py --shapes qwen3-like --tokens 512,2048 --dtypes float32
    python benchmarks/bench_layer.py --device cuda    # the GPU ladder (bf16, larger T)

Every (shape, T, dtype, pass) runs sparsemoe, the HF eager loop, the sort + torch._grouped_mm
path and the dense GEMMs of the same FLOPs (benchmarks/moe_peers.py) in one process. Writes
<out>/layer_<device>.md (the table, the machine, the protocol and a per-stage split of the
sparsemoe layer) and <out>/layer_<device>.png (eta and speedups against T).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report  # noqa: E402
import moe_peers  # noqa: E402
import sparsemoe  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    full_d: int
    full_f: int
    d: int
    f: int
    E: int
    k: int

    def label(self) -> str:
        return f"{self.name} d={self.d} f={self.f} E={self.E} k={self.k}"


# On CPU, d and f are scaled down (f/d kept, E and k kept) so the whole ladder fits in about half
# an hour on 2 cores; the GPU ladder runs the real widths.
CPU_SHAPES = [
    Shape("mixtral-like", 4096, 14336, 512, 1792, 8, 2),
    Shape("olmoe-like", 2048, 1024, 512, 256, 64, 8),
    Shape("qwen3-like", 2048, 768, 512, 192, 128, 8),
    Shape("deepseek-like", 7168, 2048, 512, 144, 32, 8),
]
GPU_SHAPES = [Shape(s.name, s.full_d, s.full_f, s.full_d, s.full_f, s.E, s.k) for s in CPU_SHAPES]
# Widths stay multiples of 8, which torch._grouped_mm needs (16-byte strides).
QUICK_SHAPES = [Shape(s.name, s.full_d, s.full_f, 64, max(16, s.f // 64 * 8), s.E, s.k) for s in CPU_SHAPES]
IMPLS = ("sparsemoe", "hf_loop", "grouped_mm", "dense")

# A config whose single run takes longer than this gets SLOW_RUNS timed runs instead of --runs:
# the median of a few multi-second runs is already stable, and it keeps the ladder bounded.
SLOW_RUN_S = 1.0
SLOW_RUNS = 3
# Peak memory is measured on forward+backward rows with at least this many tokens.
MEMORY_MIN_T = 512
# Decode rows: T up to this are also compared with the time to read the hit experts' weights.
DECODE_MAX_T = 32


# --- setup -----------------------------------------------------------------------------------


def make_layer(shape: Shape, dtype: torch.dtype, device: str) -> sparsemoe.MoELayer:
    layer = sparsemoe.MoELayer(shape.d, shape.f, shape.E, shape.k, activation="swiglu", dtype=dtype,
                               device=device)
    # std 1/sqrt(d) gives O(1) logits with no preferred expert, so routing is roughly balanced.
    torch.nn.init.normal_(layer.router.weight, std=shape.d ** -0.5)
    return layer


def params_of(layer):
    return layer.router.weight, layer.gate_up_proj, layer.down_proj


def moe_fn(impl: str, layer):
    if impl == "sparsemoe":
        return layer
    peer = moe_peers.PEERS[impl]
    return lambda x: peer(x, *params_of(layer), layer.top_k)


def forward_step(fn, x):
    def step():
        with torch.no_grad():
            fn(x)
    return step


def train_step(fn, x, leaves, g):
    """One forward+backward of (fn(x) * g).sum() into x and every leaf. sparsemoe's packed weights
    are dropped first, as an optimizer step would make them stale, so packing counts in the step."""
    def step():
        if isinstance(fn, sparsemoe.MoELayer):
            fn.clear_packed_weights()
        for t in leaves:
            t.grad = None
        (fn(x) * g).sum().backward()
    return step


# --- measurement -----------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(step, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    return 1e3 * (time.perf_counter() - t0)


def median_ms(step, warmup: int, runs: int, device: str) -> float:
    """Median wall time of `step` in ms over `runs` runs after `warmup` runs."""
    for _ in range(warmup):
        step()
    return statistics.median(timed_ms(step, device) for _ in range(runs))


def round_robin_ms(steps: dict, warmup: int, runs: int, device: str) -> tuple[dict, dict]:
    """Median ms of each step, timed in interleaved rounds (one timed run of each step per round)
    so that a slow spell of a shared machine lands on every implementation alike, not on one.
    A step whose first run exceeds SLOW_RUN_S drops out after SLOW_RUNS timed runs.
    Returns the medians and the number of timed runs of each."""
    first = {name: timed_ms(step, device) for name, step in steps.items()}
    slow = {name for name in steps if first[name] > 1e3 * SLOW_RUN_S}
    want = {name: min(runs, SLOW_RUNS) if name in slow else runs for name in steps}
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for round_ in range(runs):
        for name, step in steps.items():
            if round_ < want[name]:
                # One untimed run first: the previous implementation left the allocator and the
                # caches in its own state, and a layer in a training loop runs in its own.
                if name not in slow:
                    step()
                times[name].append(timed_ms(step, device))
    return {name: statistics.median(t) for name, t in times.items()}, want


def peak_mb(step, device: str) -> float:
    """Peak of the memory `step` allocates on top of what already exists, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # The CPU allocator reports every allocation and free to the profiler: replay them in order.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    # The step first frees the previous step's gradients (allocated before profiling), so the
    # peak is the largest rise of live memory above its lowest point before it.
    live = low = rise = 0
    for _, nbytes in events:
        live += nbytes
        low = min(low, live)
        rise = max(rise, live - low)
    return rise / 2 ** 20


def copy_bandwidth(device: str) -> float:
    """Bytes per second moved (read + written) by a large in-process copy_."""
    n = 64 * 2 ** 20  # 256 MiB of float32, far beyond any cache
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 2, 10, device)
    return 2 * src.nbytes / (ms / 1e3)


def hit_weight_bytes(layer, x) -> int:
    """Bytes of the router and of the experts the tokens of x are routed to."""
    with torch.no_grad():
        _, ids = moe_peers.hf_route(x, layer.router.weight, layer.top_k)
    hit = torch.unique(ids).numel()
    w = layer.gate_up_proj
    per_expert = (layer.gate_up_proj[0].numel() + layer.down_proj[0].numel()) * w.element_size()
    return hit * per_expert + layer.router.weight.numel() * w.element_size()


def bench_config(shape: Shape, T: int, dtype: torch.dtype, grouped_ok: dict, args, bandwidth: float) -> list[dict]:
    torch.manual_seed(0)
    device = args.device
    layer = make_layer(shape, dtype, device)
    x = torch.randn(T, shape.d, dtype=dtype, device=device)
    g = torch.randn_like(x)
    # The dense peer gets T*k distinct rows, as many as the experts see in total.
    rows = torch.randn(T * shape.k, shape.d, dtype=dtype, device=device)
    g_rows = torch.randn_like(rows)
    expert0 = [layer.gate_up_proj.detach()[0].clone(), layer.down_proj.detach()[0].clone()]
    read_ms = 1e3 * hit_weight_bytes(layer, x) / bandwidth

    results = []
    for pass_ in ("fwd", "fwd+bwd"):
        row = {"shape": shape, "T": T, "dtype": dtype, "pass": pass_, "few_runs": False, "peak": {},
               "peak_gflops": bench_report.peak_for(args.peaks, dtype),
               "read_ms": read_ms if T <= DECODE_MAX_T and pass_ == "fwd" else None}
        steps = {}
        for impl in IMPLS:
            row[impl] = None
            if impl == "grouped_mm" and not grouped_ok[pass_]:
                continue
            if pass_ == "fwd":
                step = (forward_step(lambda r: moe_peers.dense_ffn(r, *expert0), rows) if impl == "dense"
                        else forward_step(moe_fn(impl, layer), x))
            elif impl == "dense":
                leaves = [w.requires_grad_() for w in expert0] + [rows.requires_grad_()]
                step = train_step(lambda r: moe_peers.dense_ffn(r, *expert0), rows, leaves, g_rows)
            else:
                xg = x.clone().requires_grad_()
                step = train_step(moe_fn(impl, layer), xg, [xg, *layer.parameters()], g)
            try:
                step()
            except RuntimeError as err:  # a peer the installed torch cannot run at this shape
                print(f"  {impl}: {str(err).splitlines()[0]}", flush=True)
                continue
            steps[impl] = step
        medians, counts = round_robin_ms(steps, args.warmup, args.runs, device)
        row.update(medians)
        row["few_runs"] = any(n < args.runs for n in counts.values())
        if pass_ == "fwd+bwd" and T >= MEMORY_MIN_T:
            row["peak"] = {impl: peak_mb(step, device) for impl, step in steps.items() if impl != "dense"}
        results.append(row)
        print(bench_report.format_row(row), flush=True)
    return results


# Profiler labels of the layer's stages: its ops, and the expert FFN's passes inside them.
FORWARD_STAGES = [
    ("router linear", ("aten::linear",)),
    ("route", ("sparsemoe::route",)),
    ("dispatch", ("sparsemoe::dispatch",)),
    ("GEMM1 + activation", ("sparsemoe::expert_ffn gemm1+act",)),
    ("GEMM2", ("sparsemoe::expert_ffn gemm2",)),
    ("combine", ("sparsemoe::combine",)),
]
BACKWARD_STAGES = [
    ("expert blocks: grad_a GEMM, activation backward, weight-gradient and grad_x GEMMs",
     ("sparsemoe::expert_ffn_backward blocks",)),
    ("rest of the expert backward (buffers, empty experts, summing grad_x shares)",
     ("sparsemoe::expert_ffn_backward",)),
    # dispatch's backward is a combine; the forward's own combine is subtracted below.
    ("route, dispatch and combine backward", ("sparsemoe::route_backward", "sparsemoe::scatter_rows",
                                              "sparsemoe::slot_dot", "sparsemoe::combine")),
]


def profiled_ms(step, runs: int) -> dict[str, float]:
    """Milliseconds per step spent under each profiler label (inclusive), over `runs` steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            step()
    return {e.key: e.cpu_time_total / 1e3 / runs for e in prof.key_averages()}


def stage_breakdown(shape: Shape, T: int, dtype: torch.dtype, args) -> list[tuple[str, float]]:
    """Per-stage milliseconds of the sparsemoe layer (forward, then the backward's extra), from
    torch.profiler, with the unprofiled wall times of the whole forward and forward+backward."""
    torch.manual_seed(0)
    layer = make_layer(shape, dtype, "cpu")
    x = torch.randn(T, shape.d, dtype=dtype).requires_grad_()
    g = torch.randn_like(x)
    fwd, train = forward_step(layer, x), train_step(layer, x, [x, *layer.parameters()], g)
    fwd_ms, train_ms = profiled_ms(fwd, args.runs), profiled_ms(train, args.runs)
    out = [(name, sum(fwd_ms.get(k, 0.0) for k in keys)) for name, keys in FORWARD_STAGES]
    out.append(("whole forward (unprofiled wall time)", median_ms(fwd, args.warmup, args.runs, "cpu")))
    for name, keys in BACKWARD_STAGES:
        ms = sum(train_ms.get(k, 0.0) for k in keys)
        if "sparsemoe::combine" in keys:
            ms -= fwd_ms.get("sparsemoe::combine", 0.0)
        if keys == ("sparsemoe::expert_ffn_backward",):  # the op, less its blocks listed above
            ms -= train_ms.get("sparsemoe::expert_ffn_backward blocks", 0.0)
        out.append((name, ms))
    out.append(("whole forward+backward (unprofiled wall time)", median_ms(train, args.warmup, args.runs, "cpu")))
    return out


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few runs (smoke test)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=None,
                        help="directory for the report (default benchmarks/results; benchmarks/results/quick "
                             "with --quick, so a smoke test keeps the real table)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default all)")
    parser.add_argument("--dtypes", default=None, help="default float32,bfloat16 on CPU, bfloat16 on GPU")
    parser.add_argument("--tokens", default=None,
                        help="comma-separated T (default 1,8,32,128,512,2048 on CPU, up to 16384 on GPU)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per config (default 10; 3 with --quick)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = set(wanted) - {s.name for s in shapes}
        if unknown:
            parser.error(f"--shapes: unknown {sorted(unknown)}, expected names from {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in wanted]
    default_tokens = ("64" if args.quick else "1,8,32,128,512,2048" if args.device == "cpu"
                      else "1,32,512,4096,16384")
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    dtypes = [getattr(torch, n) for n in (args.dtypes or ("float32,bfloat16" if args.device == "cpu"
                                                          else "bfloat16")).split(",")]
    args.warmup = 1 if args.quick else 2
    args.runs = args.runs or (3 if args.quick else 10)

    start = time.perf_counter()
    args.peaks = None
    if args.device == "cpu":
        import peak_probe
        args.peaks = peak_probe.peaks()
        print(f"peaks: {bench_report.peaks_line(args.peaks)}", flush=True)
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)", flush=True)
    print(bench_report.table_header(), flush=True)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            grouped_ok = moe_peers.grouped_mm_works(shape.E, shape.k, dtype, args.device)
            for T in tokens:
                rows += bench_config(shape, T, dtype, grouped_ok, args, bandwidth)
    stages = None
    if args.device == "cpu":
        stage_T = 64 if args.quick else 512
        stages = (shapes[0], stage_T, dtypes[0], stage_breakdown(shapes[0], stage_T, dtypes[0], args))
    elapsed = time.perf_counter() - start

    out_dir = Path(args.out or ("benchmarks/results/quick" if args.quick else "benchmarks/results"))
    cli = sys.argv[1:] if argv is None else argv
    text = bench_report.write_markdown(out_dir / f"layer_{args.device}.md", rows, stages, shapes, cli, args,
                                       bandwidth, elapsed, SLOW_RUN_S, SLOW_RUNS)
    if not args.no_plot:
        bench_report.write_plot(out_dir / f"layer_{args.device}.png", rows, shapes)
    print("\n" + text)


if __name__ == "__main__":
    main()
