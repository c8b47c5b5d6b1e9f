"""Markdown table and plot of the benchmark ladder (benchmarks/bench_layer.py)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

import sparsemoe

def quick_cli(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """--quick and --out of a results-writing benchmark: its arguments and the folder it writes to
    (benchmarks/results, or results/quick for --quick), created."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few runs (smoke test)")
    parser.add_argument("--out", default=None, help="directory for the report (default benchmarks/results)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    return args, out


COLUMNS = ["shape", "T", "dtype", "pass", "sparsemoe ms", "HF-loop ms", "grouped_mm ms", "dense ms", "eta",
           "x HF loop", "x grouped_mm", "GFLOP/s", "% of peak", "peak MiB: sparsemoe / HF / grouped_mm", "t / t_read"]


def table_header() -> str:
    return ("| " + " | ".join(COLUMNS) + " |\n|"
            + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS))) + "|")


def forward_flops(r: dict) -> float:
    s = r["shape"]
    return 6 * r["T"] * s.k * s.d * s.f + 2 * r["T"] * s.d * s.E


def format_row(r: dict) -> str:
    ms = lambda v: "n/a" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"
    ratio = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}"
    flops = forward_flops(r) * (1 if r["pass"] == "fwd" else 3)
    peak = r["peak"]
    peak_cell = " / ".join(f"{peak[i]:.0f}" if i in peak else "n/a" for i in ("sparsemoe", "hf_loop", "grouped_mm")) \
        if peak else ""
    cells = [r["shape"].label(), r["T"], str(r["dtype"]).removeprefix("torch."),
             r["pass"] + (" †" if r["few_runs"] else ""),
             ms(r["sparsemoe"]), ms(r["hf_loop"]), ms(r["grouped_mm"]), ms(r["dense"]),
             ratio(r["dense"], r["sparsemoe"]), ratio(r["hf_loop"], r["sparsemoe"]),
             ratio(r["grouped_mm"], r["sparsemoe"]), f"{flops / r['sparsemoe'] / 1e6:.1f}",
             f"{100 * flops / r['sparsemoe'] / 1e6 / r['peak_gflops']:.0f}" if r.get("peak_gflops") else "n/a",
             peak_cell,
             ratio(r["sparsemoe"], r["read_ms"]) if r["read_ms"] else ""]
    return "| " + " | ".join(map(str, cells)) + " |"


def machine_info(device: str) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                      if line.startswith("flags")), []))
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512f", "avx512_bf16", "amx_bf16"))
    lines = [f"- CPU: {model} ({os.cpu_count()} logical cores); ISA: {isa}"]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    lines += [f"- torch {torch.__version__}, sparsemoe {sparsemoe.__version__}, threads {torch.get_num_threads()}",
              # Other processes on these few cores inflate timings; the load shows whether they ran.
              "- load average (1/5/15 min) at the end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()),
              f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    return lines


def peak_for(peaks: dict | None, dtype: torch.dtype) -> float | None:
    """The all-threads peak a row of `dtype` is measured against: bfloat16 against the AMX tile
    peak where the CPU has AMX, else the vdpbf16ps peak where it has AVX512-BF16, else (its GEMMs
    then run as float32 FMAs) the float32 FMA peak."""
    if not peaks:
        return None
    if dtype != torch.bfloat16:
        return peaks["fp32_all"]
    return peaks.get("amx_all") or peaks.get("bf16_all") or peaks["fp32_all"]


def peaks_line(peaks: dict | None) -> str:
    if not peaks:
        return "not measured"
    gf = lambda v, what: f"none (no {what})" if v is None else f"{v:.0f} GFLOP/s"
    line = (f"float32 FMA {gf(peaks['fp32_1'], 'FMA')} on one thread, {gf(peaks['fp32_all'], 'FMA')} on all; "
            f"bfloat16 vdpbf16ps {gf(peaks['bf16_1'], 'vdpbf16ps')} on one thread, "
            f"{gf(peaks['bf16_all'], 'vdpbf16ps')} on all")
    if peaks.get("amx_all"):
        line += (f"; bfloat16 AMX tdpbf16ps {gf(peaks['amx_1'], 'AMX')} on one thread, "
                 f"{gf(peaks['amx_all'], 'AMX')} on all (bfloat16 rows are measured against the AMX peak)")
    elif not peaks["bf16_all"]:
        line += " (bfloat16 rows are measured against the float32 peak)"
    return line


def bf16_packing_line() -> str:
    from sparsemoe import cli, ops

    if not ops.packed_kernels_available(torch.bfloat16):
        return "never packs (no bf16 panels on this CPU)"
    return cli.bf16_packing_policy()


def write_markdown(path: Path, rows, stages, shapes, cli, args, bandwidth: float, elapsed_s: float,
                   slow_run_s: float, slow_runs: int) -> str:
    lines = [f"# sparsemoe MoE layer, {args.device.upper()}", ""] + machine_info(args.device) + [
        f"- command: `{' '.join(['python benchmarks/bench_layer.py', *cli])}`",
        f"- protocol: {args.warmup} warm-up runs, median of {args.runs} timed runs (time.perf_counter"
        + (", synchronised" if args.device == "cuda" else "") + "), the four implementations timed in "
        "interleaved rounds so that a slow spell of the shared machine hits them alike, each timed run "
        "after an untimed one of the same implementation (except the slow ones); in rows marked †, "
        f"implementations whose single run exceeded {slow_run_s:.0f} s got {slow_runs} timed runs. fwd runs "
        "under torch.no_grad; fwd+bwd is (out * g).sum().backward() into the input and all parameters.",
        "- shapes: " + "; ".join(f"{s.name} (full d={s.full_d} f={s.full_f}) -> d={s.d} f={s.f}" for s in shapes)
        + ". E and k are the real models'.",
        "- FLOPs: fwd = 6*T*k*d*f + 2*T*d*E, fwd+bwd = 3x fwd. eta = dense ms / sparsemoe ms, where dense = "
        "the same GEMMs as torch.matmul on T*k rows with one expert's weights. x peer = peer ms / sparsemoe ms. "
        "sparsemoe ms includes the layer's aux loss and statistics.",
        "- peak MiB: the most memory one forward+backward step allocates on top of the inputs and parameters "
        "(CPU: the allocator's events in torch.profiler; GPU: max_memory_allocated), for T >= 512.",
        "- % of peak: sparsemoe's GFLOP/s over the machine's own peak on all threads, measured in this run by "
        f"benchmarks/peak_probe.py: {peaks_line(args.peaks)}.",
        "- packed weights: forward rows reuse the layer's packed copy of the expert weights (inference); every "
        "fwd+bwd step of sparsemoe drops it first, as an optimizer step would, so a step that packs pays for "
        "packing in its time and its peak memory (float32 training runs unpacked; bfloat16 here: "
        f"{bf16_packing_line()}).",
        f"- t / t_read (forward, T <= 32): sparsemoe's time over the time to read the router and the hit experts' "
        f"weights once at the bandwidth of a 256 MiB in-process copy_ ({bandwidth / 1e9:.1f} GB/s, read + write "
        "bytes).",
        f"- total benchmark time: {elapsed_s:.0f} s",
        "",
        table_header(),
        *map(format_row, rows),
    ]
    if stages:
        shape, T, dtype, parts = stages
        lines += ["", f"## sparsemoe by stage: {shape.label()}, T={T}, {str(dtype).removeprefix('torch.')}", "",
                  "torch.profiler totals per step (inclusive); the backward rows are what the backward adds.", "",
                  "| stage | ms |", "|---|---:|"]
        lines += [f"| {name} | {ms:.2f} |" for name, ms in parts]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_plot(path: Path, rows, shapes) -> None:
    """eta (top) and speedups over the peers (bottom) against T, one column per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7), squeeze=False, sharex=True)
    series = sorted({(str(r["dtype"]).removeprefix("torch."), r["pass"]) for r in rows})
    for col, shape in enumerate(shapes):
        top, bottom = axes[0][col], axes[1][col]
        for dtype, pass_ in series:
            sel = [r for r in rows if r["shape"] == shape and r["pass"] == pass_
                   and str(r["dtype"]).removeprefix("torch.") == dtype]
            if not sel:
                continue
            T = [r["T"] for r in sel]
            label = f"{dtype} {pass_}"
            top.plot(T, [r["dense"] / r["sparsemoe"] for r in sel], marker="o", label=label)
            bottom.plot(T, [r["hf_loop"] / r["sparsemoe"] for r in sel], marker="o", label=f"vs HF, {label}")
            gmm = [(t, r["grouped_mm"] / r["sparsemoe"]) for t, r in zip(T, sel) if r["grouped_mm"]]
            if gmm:
                bottom.plot(*zip(*gmm), marker="x", linestyle="--", label=f"vs grouped_mm, {label}")
        top.set_title(shape.label(), fontsize=9)
        top.axhline(1.0, color="grey", linewidth=0.8)
        bottom.axhline(1.0, color="grey", linewidth=0.8)
        top.set_ylabel("eta = dense / sparsemoe")
        bottom.set_ylabel("speedup (peer ms / sparsemoe ms)")
        bottom.set_yscale("log")
        bottom.set_xlabel("tokens T")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
