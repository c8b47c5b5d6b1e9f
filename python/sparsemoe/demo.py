"""Train a tiny Mixture-of-Experts network on CPU: ``python -m sparsemoe.demo``.

The model is a small residual MLP whose feed-forward blocks are ``sparsemoe.MoELayer``::

    x -> Linear -> [x + MoE(LayerNorm(x))] x 2 -> LayerNorm -> Linear -> y

It learns to imitate a fixed, randomly initialised teacher network (a dense tanh MLP) from
fresh random inputs at every step. The training loss is the regression error plus a small
multiple of each layer's load-balancing loss (``layer.aux_loss``), which keeps the router
from sending every token to the same few experts. Every few steps the demo prints the loss,
the aux loss and how the routed tokens are spread over the experts (``tokens_per_expert``
as fractions, summed over both MoE layers; 1/E each is a perfect balance).

Try ``--aux-coef 0`` to watch the balance get worse, or ``--experts 16 --top-k 1``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from .layer import MoELayer


class TinyMoENet(nn.Module):
    """Input projection, ``depth`` pre-norm residual MoE blocks, output projection."""

    def __init__(self, d_in: int, d_model: int, d_ff: int, d_out: int, num_experts: int,
                 top_k: int, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(d_in, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(depth))
        self.moes = nn.ModuleList(MoELayer(d_model, d_ff, num_experts, top_k) for _ in range(depth))
        self.out_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.out(self.out_norm(h))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the load-balancing losses of the last forward."""
        return sum(moe.aux_loss for moe in self.moes)

    def expert_load(self) -> torch.Tensor:
        """Share of the routed tokens each expert got in the last forward (summed over layers)."""
        counts = sum(moe.tokens_per_expert for moe in self.moes)
        return counts.double() / counts.sum()


def make_teacher(d_in: int, d_out: int, width: int = 64) -> nn.Module:
    """A fixed random dense network: the function the student has to learn."""
    teacher = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                            nn.Linear(width, d_out))
    return teacher.requires_grad_(False)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=2, help="experts picked per token")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--batch", type=int, default=256, help="tokens per step")
    parser.add_argument("--d-model", type=int, default=32, help="model width")
    parser.add_argument("--d-ff", type=int, default=64, help="hidden width of each expert")
    parser.add_argument("--aux-coef", type=float, default=0.01, help="weight of the aux loss")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--log-every", type=int, default=20, help="print every N steps")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    d_in, d_out = 16, 4
    teacher = make_teacher(d_in, d_out)
    with torch.no_grad():  # scale the target to unit variance so the loss starts near 1
        target_std = teacher(torch.randn(4096, d_in)).std()
    model = TinyMoENet(d_in, args.d_model, args.d_ff, d_out, args.experts, args.top_k)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"TinyMoENet: 2 MoE layers, {args.experts} experts, top-{args.top_k}, "
          f"{sum(p.numel() for p in model.parameters())} parameters; batch {args.batch}")

    def eval_loss() -> float:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(args.seed + 1)  # a fixed held-out batch
            x = torch.randn(2048, d_in, generator=gen)
            return F.mse_loss(model(x), teacher(x) / target_std).item()

    initial = eval_loss()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, d_in)
        y = teacher(x) / target_std
        mse = F.mse_loss(model(x), y)
        aux = model.aux_loss()
        loss = mse + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            load = " ".join(f"{v:.2f}" for v in model.expert_load().tolist())
            print(f"step {step:4d}  loss {mse.item():.4f}  aux {aux.item() / len(model.moes):.3f}  "
                  f"load: {load}")
    elapsed = time.perf_counter() - start

    final = eval_loss()
    model(torch.randn(2048, d_in))  # expert load on a large fresh batch
    load = model.expert_load()
    print(f"held-out loss {initial:.4f} -> {final:.4f} ({initial / final:.1f}x lower) in "
          f"{args.steps} steps, {elapsed:.1f}s; expert load max {load.max():.3f} / "
          f"min {load.min():.3f} (uniform {1 / args.experts:.3f})")
    return {"initial_loss": initial, "final_loss": final,
            "max_load": load.max().item(), "min_load": load.min().item()}


if __name__ == "__main__":
    main()
