"""Command line of sparsemoe: ``python -m sparsemoe {demo,info}`` (or the ``sparsemoe`` script).

``demo`` trains a small MoE language model beside a dense one of the same active size (see
``sparsemoe.demo``); ``info`` prints the versions, the kernels this build has and the threads it
uses. Bad arguments give a one-line error and a non-zero exit, never a traceback: they are all
checked here, before the demo job starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch

from . import demo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """A bad argument or input: reported as one line on stderr, exit code 2."""

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as a single line (no usage block)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------- arguments

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


_DEFAULTS = demo.DemoSettings()


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, default=_DEFAULTS.steps, help="optimizer steps per model")
    p.add_argument("--experts", type=_positive_int, default=_DEFAULTS.experts, help="experts per MoE layer")
    p.add_argument("--top-k", type=_positive_int, default=_DEFAULTS.top_k, help="experts picked per token")
    p.add_argument("--corpus", metavar="FILE", default=None,
                   help="text file to train on (default: Python's pydoc_data.topics)")
    p.add_argument("--device", default=_DEFAULTS.device, help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=_DEFAULTS.dtype, choices=sorted(DTYPES),
                   help="compute dtype (bfloat16 runs under autocast, weights stay float32)")
    p.add_argument("--out", default=_DEFAULTS.out, help="folder for demo.png and summary.json")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed")
    p.add_argument("--batch-size", type=_positive_int, default=_DEFAULTS.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=_positive_int, default=_DEFAULTS.seq_len, help="bytes per sequence")
    p.add_argument("--d-model", type=_positive_int, default=_DEFAULTS.d_model, help="model width")
    p.add_argument("--layers", type=_positive_int, default=_DEFAULTS.layers, help="transformer blocks")
    p.add_argument("--heads", type=_positive_int, default=_DEFAULTS.heads, help="attention heads (must divide --d-model)")
    p.add_argument("--expert-d-ff", type=_positive_int, default=_DEFAULTS.expert_d_ff,
                   help="hidden width of each expert (the dense model gets top_k times this)")
    p.add_argument("--lr", type=_positive_float, default=_DEFAULTS.lr, help="AdamW peak learning rate")
    p.add_argument("--aux-coef", type=float, default=_DEFAULTS.aux_coef, help="weight of the load-balancing loss")
    p.add_argument("--eval-every", type=_positive_int, default=_DEFAULTS.eval_every,
                   help="held-out evaluation interval in steps (default: steps/20)")
    p.add_argument("--eval-batches", type=_positive_int, default=_DEFAULTS.eval_batches, help="batches per evaluation")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    p.add_argument("--expert-parallel", type=_positive_int, default=None, metavar="N",
                   help="shard the experts over N processes that this command starts (gloo on the CPU, NCCL on "
                        "GPUs); under torchrun the processes are torchrun's")


def load_corpus(path: str | None, seq_len: int) -> tuple[bytes, str]:
    """The training text as bytes and a description of where it came from."""
    if path is None:
        data, source = demo.default_corpus()
    else:
        if not os.path.isfile(path):
            raise CLIError(f"--corpus: no such file: {path}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CLIError(f"--corpus: cannot read {path}: {e.strerror or e}") from None
        source = path
    if len(data) < demo.min_corpus_bytes(seq_len):
        raise CLIError(f"corpus {source}: {len(data)} bytes is too short for --seq-len {seq_len} "
                       f"(need at least {demo.min_corpus_bytes(seq_len)} bytes)")
    return data, source


def check_device(name: str) -> torch.device:
    """Parse --device and make sure tensors and the sparsemoe ops work there."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {name!r} (try cpu or cuda)") from None
    if device.type == "cuda":
        import sparsemoe
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available in this torch build or on this machine")
        if not sparsemoe._C.with_cuda:
            raise CLIError(f"--device {name}: this sparsemoe build has no CUDA kernels (rebuild it against a CUDA torch)")
    try:
        from .layer import MoELayer
        layer = MoELayer(8, 8, 2, 1, device=device)
        layer(torch.randn(4, 8, device=device)).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means the device is unusable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--device {name}: cannot run sparsemoe there: {msg}") from None
    return device


def run_demo(args) -> int:
    """Check the demo's arguments, then run the job."""
    if args.top_k > args.experts:
        raise CLIError(f"--top-k {args.top_k} is larger than --experts {args.experts}")
    if args.d_model % args.heads:
        raise CLIError(f"--heads {args.heads} does not divide --d-model {args.d_model}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out: {args.out} exists and is not a folder")
    torchrun = int(os.environ.get("WORLD_SIZE", "1"))
    if args.expert_parallel and torchrun > 1:
        raise CLIError("--expert-parallel: under torchrun the processes are torchrun's (--nproc-per-node)")
    world = args.expert_parallel or torchrun
    if args.experts % world:
        raise CLIError(f"--experts {args.experts} is not divisible by the {world} expert-parallel processes")
    if args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} is not divisible by the {world} expert-parallel processes "
                       f"(each takes an equal part of every batch)")
    device = check_device(args.device)
    if device.type == "cuda" and world > max(1, torch.cuda.device_count()):
        raise CLIError(f"--expert-parallel {world}: one GPU per process, and this machine has "
                       f"{torch.cuda.device_count()}")
    data, source = load_corpus(args.corpus, args.seq_len)
    settings = demo.DemoSettings(
        steps=args.steps, experts=args.experts, top_k=args.top_k, batch_size=args.batch_size, seq_len=args.seq_len,
        d_model=args.d_model, layers=args.layers, heads=args.heads, expert_d_ff=args.expert_d_ff, lr=args.lr,
        aux_coef=args.aux_coef, eval_every=args.eval_every, eval_batches=args.eval_batches, seed=args.seed,
        device=str(device), dtype=args.dtype, out=args.out, progress=not args.no_progress, expert_parallel=world)
    if torchrun > 1:
        return _run_rank(int(os.environ["RANK"]), world, "env://", settings, data, source)
    if world == 1:
        return demo.run(settings, data, source)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # The processes meet through a file: nothing listens on a network port.
        mp.spawn(_run_rank, args=(world, f"file://{tmp}/store", settings, data, source), nprocs=world)
    return 0


def _run_rank(rank: int, world: int, init_method: str, settings, data: bytes, source: str) -> int:
    """One process of an expert-parallel demo."""
    import datetime

    import torch.distributed as dist

    if init_method.startswith("file://"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the processes talk over loopback only
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        settings = dataclasses.replace(settings, device=f"cuda:{torch.cuda.current_device()}")
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        return demo.run(settings, data, source)
    finally:
        dist.destroy_process_group()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_packing_policy() -> str:
    from sparsemoe import packing

    pack_from = packing._training_pack_min_rows(torch.bfloat16)
    training = (f"training steps pack from {pack_from:g} rows per expert on average" if pack_from != float("inf")
                else "training steps never pack (oneDNN's AMX GEMMs beat packing every step)")
    if packing._on_amx(torch.bfloat16):
        return (training + f"; forwards run unpacked from {packing.AMX_UNPACKED_MIN_ROWS} rows per expert on "
                "average, where oneDNN's AMX GEMMs beat the panels")
    return training


def run_info(args) -> int:
    import sparsemoe

    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()

    def yn(flag):
        return "yes" if flag in flags else ("no" if flags else "unknown (no /proc/cpuinfo)")

    print(f"sparsemoe {sparsemoe.__version__} ({os.path.dirname(sparsemoe.__file__)})")
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    print(f"CPU kernels: built (C++/OpenMP; expert GEMMs through ATen/MKL/oneDNN); ATen CPU capability {capability}")
    print(f"CPU flags: avx512f {yn('avx512f')}, avx512_bf16 {yn('avx512_bf16')}, amx_bf16 {yn('amx_bf16')}")
    ops = sparsemoe.ops
    bf16 = ops.bf16_gemm_hardware()
    print(f"bfloat16 GEMM hardware: {'none (emulated)' if bf16 == 'none' else bf16}")
    if ops.panels_in_pairs(torch.bfloat16):
        bf16_packed = ("on panels in VNNI pairs through oneDNN's native bf16 micro-kernel, and its backward on "
                       f"that kernel for experts with fewer than {sparsemoe._C.pairs_backward_max_rows} rows and "
                       f"at most {sparsemoe._C.pairs_backward_max_weight_bytes >> 10} KiB of weights")
    elif ops.packed_kernels_available(torch.bfloat16):
        bf16_packed = "widened onto it (no native bf16 GEMM here)"
    else:
        bf16_packed = "on ATen's native bf16 GEMMs"
    packed = ("oneDNN micro-kernel (cpublas::brgemm, float32 arithmetic) on panels; bfloat16 " + bf16_packed
              if ops.packed_kernels_available()
              else "off: this torch or CPU has no oneDNN micro-kernel, the unpacked ATen path runs")
    print(f"CPU packed expert weights: {packed}")
    if ops.packed_kernels_available():
        streamed = [name for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
                    if ops.panels_stream(dt)]
        print(f"CPU few-row panel products (up to {sparsemoe._C.stream_max_rows} rows per expert, decoding): "
              + (f"streaming AVX-512 kernel for {' and '.join(streamed)}, the micro-kernel otherwise" if streamed
                 else "the micro-kernel (no AVX-512 streaming kernel on this CPU)"))
    lo, hi = sparsemoe._C.native_forward_min_rows, sparsemoe._C.native_forward_max_rows
    print("CPU unpacked bfloat16 forward: " + (
        f"experts with {lo} to {hi} rows on the weights in place through oneDNN's native bf16 micro-kernel "
        "(no packing), ATen's GEMMs otherwise"
        if ops.native_forward_runs(torch.bfloat16) else "ATen's GEMMs (no native bf16 micro-kernel in use)"))
    if ops.packed_kernels_available(torch.bfloat16):
        print("CPU bfloat16 packing: " + bf16_packing_policy())
    limit = ops.buffer_cache_limit()
    print("CPU buffer cache: " + (f"keeps up to {limit / 2 ** 20:g} MiB of freed buffers of at least "
                                  f"{sparsemoe._C.buffer_cache_min_bytes // 2 ** 20} MiB for reuse, holding "
                                  f"{ops.buffer_cache_bytes() / 2 ** 20:g} MiB (SPARSEMOE_BUFFER_CACHE_MB)"
                                  if limit > 0 else "off (SPARSEMOE_BUFFER_CACHE_MB=0)"))
    cuda = bool(sparsemoe._C.with_cuda)
    cuda_line = f"CUDA kernels: {'built' if cuda else 'not built'}"
    if torch.cuda.is_available():
        cuda_line += f"; torch CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s): " + ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        cuda_line += f"; torch CUDA {'not available' if torch.version.cuda else 'not in this torch build'}"
    print(cuda_line)
    print(f"threads: torch.get_num_threads() = {torch.get_num_threads()}, "
          f"interop = {torch.get_num_interop_threads()}, os.cpu_count() = {os.cpu_count()}")
    print("sparsemoe._C.parallel_info():")
    for line in sparsemoe._C.parallel_info().strip().splitlines():
        print(f"  {line.rstrip().expandtabs(2)}")
    return 0


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsemoe", description="sparsemoe command line: a training demo and build info.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,info}")
    sub.required = True
    demo_parser = sub.add_parser("demo", help="train a small MoE and a dense byte-level LM and compare them",
                          description=__doc__.split("\n\n")[1],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_demo_args(demo_parser)
    demo_parser.set_defaults(func=run_demo)
    info = sub.add_parser("info", help="versions, built kernels, CPU features and threads")
    info.set_defaults(func=run_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"sparsemoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsemoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        sys.stderr.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - one line, never a traceback (SPARSEMOE_DEBUG=1 shows it)
        if os.environ.get("SPARSEMOE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"sparsemoe {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
