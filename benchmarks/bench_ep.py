"""Expert parallelism on this machine: one process holding every expert (W = 1) against two
processes holding half each (W = 2), one thread per process, at the same global batch.

Run from the repository root:

    python benchmarks/bench_ep.py              # olmoe-like and mixtral-like, fwd and fwd+bwd
    python benchmarks/bench_ep.py --quick      # tiny shapes, a smoke test

For each shape and pass it reports the step time (the slowest rank's, medians over interleaved
rounds of W = 1 and W = 2 runs), its split into the count exchange with the host sync, the row
all-to-alls, the experts and the rest (a profiled run), and the bytes each rank sends to other
ranks per step against the formula T_rank * k * d * (W - 1) / W elements per row all-to-all (two
in a forward, four in a training step) under uniform routing. Writes benchmarks/results/ep_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsemoe

# Scaled as the layer ladder scales them (d = 512, f/d, E and k kept).
SHAPES = {"olmoe-like": (512, 256, 64, 8), "mixtral-like": (512, 1792, 8, 2)}
QUICK = {"olmoe-like": (64, 32, 64, 8), "mixtral-like": (64, 224, 8, 2)}
# The parts of a step and the profiler events they add up (record_function ranges of
# sparsemoe.distributed, and the expert ops themselves, forward and backward).
LABELS = {"count": ("sparsemoe::ep count exchange",), "rows": ("sparsemoe::ep row all-to-all",),
          "experts": ("sparsemoe::expert_ffn", "sparsemoe::expert_ffn_backward")}


def step_fn(layer, x, g, backward: bool):
    def step():
        layer.zero_grad(set_to_none=True)
        if backward:
            (layer(x) * g).sum().backward()
        else:
            with torch.no_grad():
                layer(x)
    return step


def remote_bytes(layer, rank: int, world: int) -> int:
    """Bytes of one row all-to-all that leave this rank (its rows for other ranks' experts)."""
    _, _, offsets, _, _ = layer._routing
    counts = offsets.diff().view(world, -1).sum(1)
    return int(counts.sum() - counts[rank]) * layer.config.d_model * layer.gate_up_proj.element_size()


def measure(rank: int, world: int, cases: list, runs: int, dtype: torch.dtype) -> list[dict]:
    out = []
    for name, (d, f, E, k), T_global, backward in cases:
        torch.manual_seed(0)
        group = dist.group.WORLD if world > 1 else None
        layer = sparsemoe.MoELayer(d, f, E, k, dtype=dtype, expert_parallel_group=group)
        T = T_global // world
        gen = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(T, d, generator=gen).to(dtype).requires_grad_(backward)
        g = torch.randn(T, d, generator=gen).to(dtype)
        step = step_fn(layer, x, g, backward)
        barrier = dist.barrier if world > 1 else (lambda: None)
        for _ in range(2):
            step()
        times = []
        for _ in range(runs):
            barrier()
            t0 = time.perf_counter()
            step()
            barrier()  # the step ends when the slowest rank is done
            times.append(time.perf_counter() - t0)
        split = {}
        if world > 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(3):
                    barrier()
                    step()
                    barrier()
                profiled = (time.perf_counter() - t0) / 3 * 1e3
            avg = {e.key: e.cpu_time_total / 3 / 1e3 for e in prof.key_averages()}
            # The profiler slows the step down: each part keeps its share of the profiled step.
            scale = 1e3 * statistics.median(times) / profiled
            split = {part: scale * sum(avg.get(label, 0.0) for label in labels) for part, labels in LABELS.items()}
            with torch.no_grad():
                layer(x.detach())
            sent = remote_bytes(layer, rank, world) * (4 if backward else 2)
            formula = T * k * d * (world - 1) / world * layer.gate_up_proj.element_size() * (4 if backward else 2)
        else:
            sent = formula = 0
        out.append(dict(shape=name, T=T_global, passes="fwd+bwd" if backward else "fwd",
                        ms=1e3 * statistics.median(times), split_ms=split, sent=sent, formula=formula))
    return out


def _rank(rank, world, store, cases, runs, dtype, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
    try:
        rows = measure(rank, world, cases, runs, dtype)
        results.put((rank, rows))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(world: int, cases, runs: int, dtype) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, f"{tmp}/store", cases, runs, dtype, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = dict(results.get(timeout=3600) for _ in range(world))
        for p in procs:
            p.join()
    return got[0]  # rank 0: the step time already includes the slowest rank (barriers)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None, help="global tokens per step (default 2048; 256 quick)")
    parser.add_argument("--runs", type=int, default=None, help="timed steps per run (default 10; 3 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of W=1 and W=2 (default 3)")
    parser.add_argument("--out", default="benchmarks/results/ep_cpu.md")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    T = args.tokens or (256 if args.quick else 2048)
    runs, rounds = args.runs or (3 if args.quick else 10), args.rounds or (1 if args.quick else 3)
    cases = [(name, dims, T, backward) for name, dims in shapes.items() for backward in (False, True)]
    by_world = {1: [], 2: []}
    for r in range(rounds):
        for world in (1, 2):
            by_world[world].append(run(world, cases, runs, torch.float32))
            print(f"round {r + 1}/{rounds}: W={world} done", file=sys.stderr)

    lines = ["# Expert parallelism on the CPU: W = 1 against W = 2 processes", "",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
             f"{torch.__version__}, sparsemoe {sparsemoe.__version__}; gloo over loopback; one thread per process",
             f"- float32, {T} tokens per step in all (each of the W ranks routes {T} / W of them), medians of "
             f"{runs} timed steps per run over {rounds} interleaved rounds of W = 1 and W = 2 runs",
             "- step time: the slowest rank's (a barrier before and after each step); split at W = 2 from a "
             "profiled run (each part keeps its share of the profiled step): count exchange (with the one "
             "host sync), row all-to-alls (forward and backward), expert_ffn (forward and backward), the rest "
             "(routing, dispatch, the regroup, combine, autograd, waiting for the other rank)",
             "- sent: bytes each rank sends to the other rank per step, measured from the routing, against the "
             "formula T/W * k * d * (W-1)/W * 4 bytes per row all-to-all (2 per forward, 4 per training step)", "",
             "| shape (d, f, E, k) | pass | W=1 ms | W=2 ms | speedup | count+sync | row a2a | experts | rest | "
             "sent MiB (formula) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (name, dims, _, backward) in enumerate(cases):
        one = statistics.median(rows[i]["ms"] for rows in by_world[1])
        two_rows = [rows[i] for rows in by_world[2]]
        two = statistics.median(r["ms"] for r in two_rows)
        split = {k: statistics.median(r["split_ms"][k] for r in two_rows) for k in LABELS}
        rest = max(0.0, two - sum(split.values()))
        sent, formula = two_rows[0]["sent"], two_rows[0]["formula"]
        lines.append(f"| {name} {dims} | {'fwd+bwd' if backward else 'fwd'} | {one:.1f} | {two:.1f} | "
                     f"{one / two:.2f}x | {split['count']:.1f} | {split['rows']:.1f} | {split['experts']:.1f} | "
                     f"{rest:.1f} | {sent / 2**20:.2f} ({formula / 2**20:.2f}) |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
