"""Command line of sparsemoe: ``python -m sparsemoe {demo,info}`` (or the ``sparsemoe`` script).

``demo`` trains a small MoE language model beside a dense one of the same active size (see
``sparsemoe.demo``); ``info`` prints the versions, the kernels this build has and the threads it
uses. Bad arguments give a one-line error and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .demo import DTYPES, CLIError, run_demo

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as a single line (no usage block)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------- corpus

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


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, default=1500, help="optimizer steps per model")
    p.add_argument("--experts", type=_positive_int, default=8, help="experts per MoE layer")
    p.add_argument("--top-k", type=_positive_int, default=2, help="experts picked per token")
    p.add_argument("--corpus", metavar="FILE", default=None,
                   help="text file to train on (default: Python's pydoc_data.topics)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="compute dtype (bfloat16 runs under autocast, weights stay float32)")
    p.add_argument("--out", default="sparsemoe-demo", help="folder for demo.png and summary.json")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=_positive_int, default=64, help="bytes per sequence")
    p.add_argument("--d-model", type=_positive_int, default=64, help="model width")
    p.add_argument("--layers", type=_positive_int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=_positive_int, default=4, help="attention heads (must divide --d-model)")
    p.add_argument("--expert-d-ff", type=_positive_int, default=64,
                   help="hidden width of each expert (the dense model gets top_k times this)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="held-out evaluation interval in steps (default: steps/20)")
    p.add_argument("--eval-batches", type=_positive_int, default=4, help="batches per evaluation")
    p.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
    bf16 = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none (emulated)")
    print(f"bfloat16 GEMM hardware: {bf16}")
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
    demo = sub.add_parser("demo", help="train a small MoE and a dense byte-level LM and compare them",
                          description=__doc__.split("\n\n")[1],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_demo_args(demo)
    demo.set_defaults(func=run_demo)
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
