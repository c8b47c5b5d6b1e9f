"""The ``sparsemoe demo`` job: two small byte-level decoder-only transformer language models
trained on the same text, one whose feed-forward blocks are ``sparsemoe.MoELayer`` (8 experts,
top-2 by default) and one with a dense SwiGLU FFN of the same *active* size (dense d_ff =
top_k * expert d_ff, so each token goes through the same number of FFN weights in both). It
prints their train and held-out losses, their training speed and the MoE model's expert load
per layer, and writes a plot and a JSON summary.

The default corpus is the text of Python's own documentation topics (``pydoc_data.topics``,
about 0.5 MB of English that every CPython installation carries). ``sparsemoe.cli`` parses and
checks the command line and calls :func:`run` with a :class:`DemoSettings`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .layer import MoELayer, moe_layers
from .stats import routing_summary

# Used when pydoc_data is missing (some distributions split it off): a short text, so the demo
# still runs; --corpus FILE gives it something better to read.
_FALLBACK_TEXT = """\
A mixture of experts replaces the feed-forward block of a transformer with many smaller
feed-forward networks, the experts, and a router that sends each token to a few of them. The
model holds many more parameters than a dense model of the same cost, because every token only
goes through the experts it was sent to. The router is a linear layer that scores every expert
for every token; the top scoring experts process the token and their outputs are added up,
weighted by the router's probabilities. Left alone, a router tends to send most tokens to the
same few experts, which then learn faster and attract even more tokens: a small load-balancing
loss that rewards an even spread keeps all experts in use. Some models cap how many tokens an
expert may take in a batch and drop the rest, others route every token to its experts however
uneven the load. Language models read text as a sequence of tokens and learn to predict the
next one; this demo reads raw bytes, so the vocabulary is the 256 possible byte values and no
tokenizer is needed. A byte-level model has to learn spelling before it can learn words, and
words before it can learn grammar, so its loss falls in stages: first the frequent letters and
the space, then common words, then the structure of sentences.
"""


@dataclass(frozen=True)
class DemoSettings:
    """What one demo run trains and where it writes (the command line's flags, checked)."""
    steps: int = 1500
    experts: int = 8
    top_k: int = 2
    batch_size: int = 32
    seq_len: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    expert_d_ff: int = 64
    lr: float = 3e-3
    aux_coef: float = 0.01
    eval_every: int | None = None
    eval_batches: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"          # "bfloat16" runs under autocast, weights stay float32
    out: str = "sparsemoe-demo"
    progress: bool = True
    expert_parallel: int = 1        # processes the experts are sharded over (each takes batch / n)


def default_corpus() -> tuple[bytes, str]:
    """Python's documentation topics as bytes, and where they came from."""
    try:
        from pydoc_data import topics
        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        return text.encode("utf-8"), "pydoc_data.topics (Python documentation)"
    except Exception:  # pragma: no cover - depends on the Python distribution
        return _FALLBACK_TEXT.encode("utf-8"), "built-in fallback text (pydoc_data not available)"


def min_corpus_bytes(seq_len: int) -> int:
    """The shortest corpus whose 90/10 train/held-out split holds a sequence on either side."""
    return math.ceil((seq_len + 2) / 0.1)


# ----------------------------------------------------------------------------- models

class DenseSwiGLU(nn.Module):
    """The dense counterpart of one MoE layer: a single SwiGLU FFN."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.ffn(self.norm2(x))


class ByteLM(nn.Module):
    """Decoder-only transformer over bytes (vocabulary 256), learned positions, tied embeddings."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, seq_len: int, make_ffn):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, make_ffn()) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output: keep the first logits small

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T

    def moe_layers(self) -> list[MoELayer]:
        return [m for _, m in moe_layers(self)]


def count_params(model: ByteLM) -> tuple[int, int]:
    """(total, active per token): for MoE layers only top_k of the experts count as active.
    Expert-parallel layers hold a share of their experts: the others count too."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for moe in model.moe_layers():
        expert = moe.gate_up_proj[0].numel() + moe.down_proj[0].numel()
        total += (moe.num_experts - moe.gate_up_proj.shape[0]) * expert
        active += (moe.num_experts - moe.gate_up_proj.shape[0]) * expert - (moe.num_experts - moe.top_k) * expert
    return total, active


# ----------------------------------------------------------------------------- ranks


class Ranks:
    """This process's share of an expert-parallel run (one rank of the default process group),
    or the whole run in one process. Each rank trains on its slice of every global batch."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = dist.group.WORLD if self.world > 1 else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: float) -> float:
        """The mean over the ranks of a per-rank value (a loss over equal batches)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.item() / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            self.dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [t]
        every = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(every, t.contiguous())
        return every


# ----------------------------------------------------------------------------- training

def _batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple:
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    window = torch.arange(seq_len + 1)
    chunk = data[starts[:, None] + window]
    return chunk[:, :-1], chunk[:, 1:]


def train_one(kind: str, model: ByteLM, args, train_data, eval_sets, device, dtype, ranks: Ranks) -> dict:
    """Train ``model``; return its curves, final losses and speed (and routing for MoE). With
    several ranks the MoE layers' experts are sharded over them and every rank trains on its
    slice of each batch; the losses are those of the whole batch."""
    from . import distributed as ep

    model.to(device)
    if ranks.world > 1 and model.moe_layers():
        ep.shard_experts_(model, ranks.group)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    moes = model.moe_layers()
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    eval_every = args.eval_every or max(1, args.steps // 20)

    def evaluate(batches) -> float:
        model.eval()
        with torch.no_grad(), torch.autocast(**autocast):
            losses = [F.cross_entropy(model(ranks.part(x).to(device)).float().flatten(0, 1),
                                      ranks.part(y).to(device).flatten()).item() for x, y in batches]
        model.train()
        return ranks.mean(sum(losses) / len(losses))

    train_curve, eval_curve, load_history = [], [], []
    eval_curve.append((0, evaluate(eval_sets["held_out"])))
    progress = tqdm(total=args.steps, desc=f"{kind:>5}", unit="step", disable=not args.progress or not ranks.main,
                    file=sys.stderr, dynamic_ncols=True)
    train_time = 0.0
    for step in range(1, args.steps + 1):
        x, y = (ranks.part(t).to(device, non_blocking=True) for t in _batch(train_data, args.batch_size,
                                                                            args.seq_len, gen))
        t0 = time.perf_counter()
        with torch.autocast(**autocast):
            logits = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if moes and ranks.world > 1:
            # The aux loss of the whole batch, so that every rank optimises the single-process loss.
            loss = ce + ep.moe_aux_loss(model, aux_coef=args.aux_coef, z_coef=0.0)
        else:
            loss = ce + args.aux_coef * sum(m.aux_loss for m in moes) if moes else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ranks.world > 1:
            ep.sync_gradients_(model, group=ranks.group)
        opt.step()
        sched.step()
        ce_value = ranks.mean(ce.item())  # syncs, so the step time below is real on an accelerator too
        train_time += time.perf_counter() - t0
        if not math.isfinite(ce_value):
            progress.close()
            raise FloatingPointError(f"{kind} model: the training loss became {ce_value} at step {step} "
                                     f"(try a lower learning rate)")
        train_curve.append(ce_value)
        if moes:
            counts = ranks.sum(moes[0].tokens_per_expert.detach()).double().cpu()
            load_history.append((counts / counts.sum().clamp_min(1)).tolist())
        if step % eval_every == 0 or step == args.steps:
            eval_curve.append((step, evaluate(eval_sets["held_out"])))
        progress.update(1)
        progress.set_postfix(loss=f"{ce_value:.3f}", refresh=False)
    progress.close()

    result = {
        "parameters": count_params(model)[0],
        "active_parameters": count_params(model)[1],
        "train_loss": evaluate(eval_sets["train"]),
        "held_out_loss": eval_curve[-1][1],
        "initial_held_out_loss": eval_curve[0][1],
        "tokens_per_s": args.steps * args.batch_size * args.seq_len / max(train_time, 1e-9),
        "train_seconds": train_time,
        "train_curve": train_curve,
        "eval_curve": [{"step": s, "loss": v} for s, v in eval_curve],
    }
    if moes:
        # The final expert load, measured on one forward over all held-out batches.
        model.eval()
        with torch.no_grad(), torch.autocast(**autocast):
            model(ranks.part(torch.cat([x for x, _ in eval_sets["held_out"]])).to(device))
        model.train()
        if ranks.world == 1:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                summary = routing_summary(model)
            result["routing"] = [
                {"layer": s.name, "load": s.load, "router_entropy": s.router_entropy,
                 "max_entropy": math.log(len(s.load)), "aux_loss": s.aux_loss, "z_loss": s.z_loss,
                 "dropped_fraction": s.dropped_fraction, "tokens_per_expert": m.tokens_per_expert.tolist()}
                for s, m in zip(summary, moes)]
            result["routing_warnings"] = [str(w.message) for w in caught]
        else:
            result["routing"], result["routing_warnings"] = [], []
            for name, m in zip((n for n, _ in moe_layers(model)), moes):
                stats = ep.global_statistics(m)
                counts = stats["tokens_per_expert"].double()
                per_rank = [t.tolist() for t in ranks.gather(m.tokens_per_expert)]
                result["routing"].append({
                    "layer": name, "load": (counts / counts.sum().clamp_min(1)).tolist(),
                    "router_entropy": stats["router_entropy"].item(), "max_entropy": math.log(len(counts)),
                    "aux_loss": stats["aux_loss"].item(), "z_loss": stats["z_loss"].item(),
                    "dropped_fraction": stats["dropped_fraction"].item(),
                    "tokens_per_expert": stats["tokens_per_expert"].tolist(), "tokens_per_expert_by_rank": per_rank})
        result["load_history_layer"] = result["routing"][0]["layer"] if result["routing"] else None
        result["load_history"] = load_history
    return result


def write_plot(path: str, results: dict, args) -> str | None:
    """Loss curves of both models and the expert-load heat map of the first MoE layer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"

    moe, dense = results["moe"], results["dense"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.2]})
    window = max(1, len(moe["train_curve"]) // 30)

    def smooth(values):
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc += v
            if i >= window:
                acc -= values[i - window]
            out.append(acc / min(i + 1, window))
        return out

    for name, r, color in (("MoE", moe, "tab:blue"), ("dense", dense, "tab:orange")):
        steps = range(1, len(r["train_curve"]) + 1)
        ax1.plot(steps, smooth(r["train_curve"]), color=color, alpha=0.6, lw=1, label=f"{name} train")
        ax1.plot([e["step"] for e in r["eval_curve"]], [e["loss"] for e in r["eval_curve"]], "o-", color=color,
                 ms=3, lw=1.8, label=f"{name} held-out")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats / byte)")
    ax1.set_title(f"byte-level LM: MoE {args.experts}x top-{args.top_k} vs dense of equal active size")
    ax1.grid(alpha=0.3)
    ax1.legend()

    history = [list(row) for row in zip(*moe["load_history"])]  # [E][steps]
    n_experts, n_steps = len(history), len(history[0])
    im = ax2.imshow(history, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                    extent=(0.5, n_steps + 0.5, -0.5, n_experts - 0.5))
    ax2.set_xlabel("step")
    ax2.set_ylabel("expert")
    ax2.set_yticks(range(n_experts))
    ax2.set_title(f"expert load of MoE layer '{moe['load_history_layer']}' (uniform = {1 / args.experts:.3f})")
    fig.colorbar(im, ax=ax2, label="share of routed picks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args: DemoSettings, data: bytes, source: str) -> int:
    """Train both models on ``data`` (at least ``min_corpus_bytes(args.seq_len)`` bytes, from
    ``source``), print the comparison and write the plot and the summary into ``args.out``."""
    from . import __version__

    ranks = Ranks()
    if ranks.world != args.expert_parallel:
        raise ValueError(f"expert_parallel: expected the {args.expert_parallel} processes of the settings, "
                         f"the process group has {ranks.world}")
    # Only the first rank speaks and writes; every rank trains.
    say = print if ranks.main else (lambda *a, **k: None)
    if len(data) < min_corpus_bytes(args.seq_len):
        raise ValueError(f"corpus {source}: {len(data)} bytes is too short for seq_len {args.seq_len} "
                         f"(need at least {min_corpus_bytes(args.seq_len)} bytes)")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    split = int(len(data) * 0.9)
    train_bytes, held_bytes = data[:split], data[split:]
    train_data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    held_data = torch.frombuffer(bytearray(held_bytes), dtype=torch.uint8).long()
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    eval_sets = {name: [_batch(d, args.batch_size, args.seq_len, eval_gen) for _ in range(args.eval_batches)]
                 for name, d in (("train", train_data), ("held_out", held_data))}

    say(f"sparsemoe {__version__} demo: byte-level LM, {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads, context {args.seq_len}, batch {args.batch_size}, {args.steps} steps, "
          f"{device} {args.dtype}")
    say(f"corpus: {source}, {len(data):,} bytes ({len(train_bytes):,} train / {len(held_bytes):,} held out)")

    results = {}
    dense_d_ff = args.top_k * args.expert_d_ff
    builders = {
        "moe": lambda: MoELayer(args.d_model, args.expert_d_ff, args.experts, args.top_k, activation="swiglu"),
        "dense": lambda: DenseSwiGLU(args.d_model, dense_d_ff),
    }
    for kind in ("moe", "dense"):
        torch.manual_seed(args.seed)
        model = ByteLM(args.d_model, args.layers, args.heads, args.seq_len, builders[kind])
        results[kind] = train_one(kind, model, args, train_data, eval_sets, device, dtype, ranks)

    moe, dense = results["moe"], results["dense"]
    say()
    say(f"{'model':<34} {'params':>9} {'active':>9} {'train loss':>10} {'held-out':>9} {'tokens/s':>9}")
    for label, r in ((f"MoE ({args.experts} experts, top-{args.top_k}, d_ff {args.expert_d_ff})", moe),
                     (f"dense (d_ff {dense_d_ff})", dense)):
        say(f"{label:<34} {r['parameters']:>9,} {r['active_parameters']:>9,} {r['train_loss']:>10.4f} "
              f"{r['held_out_loss']:>9.4f} {r['tokens_per_s']:>9,.0f}")
    say(f"(losses in nats per byte; a uniform guess is ln 256 = {math.log(256):.3f}; held-out started at "
          f"{moe['initial_held_out_loss']:.3f} / {dense['initial_held_out_loss']:.3f})")
    say("MoE expert load on the held-out batches (share of routed picks per expert; "
          f"uniform = {1 / args.experts:.3f}):")
    for r in moe["routing"]:
        load = " ".join(f"{v:.3f}" for v in r["load"])
        say(f"  {r['layer']:<14} {load}   entropy {r['router_entropy']:.2f}/{r['max_entropy']:.2f} nats, "
              f"aux {r['aux_loss']:.3f}")
    for w in moe["routing_warnings"]:
        say(f"  warning: {w}")
    if ranks.world > 1:
        say(f"experts sharded over {ranks.world} processes ({args.experts // ranks.world} per rank); picks each "
            f"rank's tokens sent to each expert on the held-out batches:")
        for r in moe["routing"]:
            for rank, counts in enumerate(r["tokens_per_expert_by_rank"]):
                say(f"  {r['layer']:<14} rank {rank}: {' '.join(f'{c:>5}' for c in counts)}")
    if not ranks.main:
        return 0

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "demo.png")
    note = write_plot(png, results, args)
    summary = {
        "sparsemoe_version": __version__, "torch_version": torch.__version__,
        "config": {k: v for k, v in dataclasses.asdict(args).items() if k != "progress"}
        | {"dense_d_ff": dense_d_ff, "device": str(device), "corpus_source": source, "corpus_bytes": len(data)},
        "moe": moe, "dense": dense, "plot": None if note else png,
    }
    js = os.path.join(args.out, "summary.json")
    with open(js, "w") as f:
        json.dump(summary, f, indent=1)
    if note:
        say(note)
    else:
        say(f"plot: {png}")
    say(f"summary: {js}")
    return 0
