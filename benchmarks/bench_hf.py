"""What a user of a Hugging Face MoE model sees: a whole decoder trained and decoded with its
experts on sparsemoe (``experts_implementation="sparsemoe"``) against transformers' own
``eager``, ``grouped_mm`` and ``batched_mm`` experts, in one process.

Run from the repository root:

    python benchmarks/bench_hf.py                 # both shapes, fp32 + bf16 (CPU)
    python benchmarks/bench_hf.py --quick         # tiny widths, seconds; a smoke test
    python benchmarks/bench_hf.py --device cuda   # on a GPU (bf16)

Each model is a MixtralForCausalLM (router softmax -> top-k, SwiGLU experts) with the
expert count, top-k and expert width of the named shape, its widths scaled to this machine.
A training step is forward + backward + AdamW step on a batch of ``--batch`` x ``--seq`` tokens;
decoding is ``generate()`` (greedy, KV cache) of ``--new-tokens`` tokens after a 16-token prompt.
The implementations share one model (switched with ``set_experts_implementation``) and are
timed in interleaved rounds. The experts' share of a step is its forward + backward time
minus that of the same step with the experts replaced by a stand-in that costs nothing (it
only scales the input by the routing weights, so the router still gets a gradient). Writes
<out>/hf_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_layer  # noqa: E402
import bench_report  # noqa: E402

from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.integrations.moe import ExpertsInterface  # noqa: E402

import sparsemoe.hf  # noqa: E402

# name: (experts, top-k, d_model, expert d_ff), widths scaled like the layer benchmark's.
SHAPES = {"olmoe-like": (64, 8, 512, 256), "mixtral-like": (8, 2, 512, 1792)}
QUICK_SHAPES = {"olmoe-like": (16, 4, 64, 32), "mixtral-like": (8, 2, 64, 224)}
IMPLEMENTATIONS = ("sparsemoe", "eager", "grouped_mm", "batched_mm")
NO_EXPERTS = "no_experts"
BATCHED_MM_LIMIT = 4 << 30  # batched_mm gathers one weight copy per pick


def no_experts(module, hidden_states, top_k_index, top_k_weights):
    return hidden_states * top_k_weights.sum(-1, keepdim=True).to(hidden_states.dtype)


def make_model(shape, layers: int, dtype, device) -> MixtralForCausalLM:
    E, k, d, f = shape
    config = MixtralConfig(vocab_size=2048, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=E,
                           num_experts_per_tok=k, max_position_embeddings=4096, eos_token_id=None,
                           bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def batched_mm_bytes(shape, tokens: int, dtype) -> int:
    E, k, d, f = shape
    return tokens * k * 3 * f * d * torch.finfo(dtype).bits // 8


def bench_shape(name, shape, dtype, args) -> list[dict]:
    model = make_model(shape, args.layers, dtype, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    ids = torch.randint(1, 2048, (args.batch, args.seq), device=args.device)
    prompt = torch.randint(1, 2048, (1, 16), device=args.device)
    tokens = args.batch * args.seq
    impls = [i for i in IMPLEMENTATIONS
             if i != "batched_mm" or batched_mm_bytes(shape, tokens, dtype) <= BATCHED_MM_LIMIT]

    def train(impl):
        """(forward + backward ms, whole step ms) of one training step."""
        model.set_experts_implementation(impl)
        opt.zero_grad(set_to_none=True)
        bench_layer.synchronize(args.device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        bench_layer.synchronize(args.device)
        t1 = time.perf_counter()
        opt.step()
        bench_layer.synchronize(args.device)
        return 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0)

    def decode(impl):
        def step():
            model.set_experts_implementation(impl)
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False)
        return step

    # Interleaved rounds, one untimed step of an implementation before its timed one (as in
    # bench_layer.round_robin_ms). The experts' share is taken from forward + backward only:
    # the optimizer's update of the expert weights costs every implementation the same, and the
    # stand-in, which gives them no gradient, would leave it out.
    model.train()
    timed = (*impls, NO_EXPERTS)
    for _ in range(args.warmup):
        for impl in timed:
            train(impl)
    runs = {impl: [] for impl in timed}
    for _ in range(args.runs):
        for impl in timed:
            train(impl)
            runs[impl].append(train(impl))
    fb_ms = {i: statistics.median(r[0] for r in runs[i]) for i in timed}
    train_ms = {i: statistics.median(r[1] for r in runs[i]) for i in timed}
    model.eval()
    decode_ms, _ = bench_layer.round_robin_ms({i: decode(i) for i in IMPLEMENTATIONS}, 1, args.decode_runs,
                                              args.device)
    rows = []
    for impl in IMPLEMENTATIONS:
        step = train_ms.get(impl)
        rows.append({"shape": name, "dtype": str(dtype).removeprefix("torch."), "impl": impl,
                     "train_ms": step, "experts_ms": None if step is None else fb_ms[impl] - fb_ms[NO_EXPERTS],
                     "decode_tok_s": args.new_tokens / (decode_ms[impl] / 1e3), "shape_dims": shape,
                     "skipped": None if step is not None else
                     f"needs {batched_mm_bytes(shape, tokens, dtype) / 2**30:.0f} GiB for its per-pick weights"})
    return rows


def write_markdown(path: Path, rows, args, elapsed_s: float) -> None:
    lines = ["# Hugging Face models on sparsemoe: training step and decoding", "",
             f"`python benchmarks/bench_hf.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             *bench_report.machine_info(args.device),
             f"- model: MixtralForCausalLM, {args.layers} decoder layers, vocab 2048, 8 heads; training batch "
             f"{args.batch} x {args.seq} tokens, AdamW; decoding 1 x 16-token prompt + {args.new_tokens} tokens",
             f"- {args.runs} interleaved rounds (training), {args.decode_runs} (decoding); medians; "
             f"run time {elapsed_s:.0f} s", "",
             "Experts ms = the forward + backward of the training step minus the same with a zero-cost stand-in for "
             "the experts (the optimizer's update of the expert weights, the same for every implementation, "
             "is in the step but not in the experts' share). "
             "Speedups are against the fastest of transformers' own implementations.", "",
             "| shape (E, k, d, f) | dtype | implementation | train step ms | experts ms | decode tok/s | "
             "step speedup | experts speedup | decode speedup |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (shape, dtype) in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["shape"], r["dtype"]) == (shape, dtype)]
        hf_rows = [r for r in group if r["impl"] != "sparsemoe" and r["train_ms"] is not None]
        best_step = min(r["train_ms"] for r in hf_rows)
        best_experts = min(r["experts_ms"] for r in hf_rows)
        best_decode = max(r["decode_tok_s"] for r in group if r["impl"] != "sparsemoe")
        for r in group:
            dims = ", ".join(map(str, r["shape_dims"]))
            if r["train_ms"] is None:
                train = f"skipped ({r['skipped']}) | | "
                speed = " | "
            else:
                train = f"{r['train_ms']:.1f} | {r['experts_ms']:.1f} | "
                experts = (f"{best_experts / r['experts_ms']:.2f}x" if r["experts_ms"] > 0 and best_experts > 0
                           else "n/a (below the timing noise)")
                speed = f"{best_step / r['train_ms']:.2f}x | {experts}"
            lines.append(f"| {shape} ({dims}) | {dtype} | {r['impl']} | {train}{r['decode_tok_s']:.1f} | {speed} | "
                         f"{r['decode_tok_s'] / best_decode:.2f}x |")
    lines += ["", "The one line a user changes: `AutoModelForCausalLM.from_pretrained(path, "
              "experts_implementation=\"sparsemoe\")` after `sparsemoe.hf.register()`.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dtypes", default=None, help="default: float32,bfloat16 on CPU, bfloat16 on CUDA")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--decode-runs", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.seq, args.new_tokens, args.runs, args.decode_runs = 16, 4, 2, 1
    dtypes = args.dtypes or ("bfloat16" if args.device == "cuda" else "float32,bfloat16")
    sparsemoe.hf.register()
    ExpertsInterface.register(NO_EXPERTS, no_experts)
    t0 = time.perf_counter()
    rows = []
    for name in args.shapes.split(","):
        for dtype in dtypes.split(","):
            rows += bench_shape(name, shapes[name], getattr(torch, dtype), args)
            print(*(f"{r['shape']} {r['dtype']} {r['impl']}: step {r['train_ms']} ms, experts {r['experts_ms']} ms, "
                    f"decode {r['decode_tok_s']:.1f} tok/s" for r in rows[-len(IMPLEMENTATIONS):]), sep="\n",
                  flush=True)
    out = Path(args.out) / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / f"hf_{args.device}.md", rows, args, time.perf_counter() - t0)
    print(f"wrote {out / f'hf_{args.device}.md'}")


if __name__ == "__main__":
    main()
