"""The MoE implementations sparsemoe is measured against, all run on the layer's own parameters.

  * HF loop     - the Hugging Face Mixtral eager loop (torch.where per expert, index_add_).
  * grouped_mm  - torchtitan style: argsort by expert, gather, torch._grouped_mm.
  * dense       - the same three GEMMs as plain torch.matmul on T*k contiguous rows with one
                  expert's weights: the time the expert FLOPs take with no routing at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hf_route(x, router_w, k):
    """Mixtral routing: softmax in float32, top-k, renormalise, cast back to the hidden dtype."""
    probs = torch.softmax(F.linear(x, router_w), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids


def hf_loop_moe(x, router_w, gate_up, down, k):
    weights, ids = hf_route(x, router_w, k)
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        idx, pick = torch.where(ids == e)
        gate, up = F.linear(x[idx], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[idx, pick, None]
        out.index_add_(0, idx, y.to(out.dtype))
    return out


def grouped_mm_moe(x, router_w, gate_up, down, k):
    weights, ids = hf_route(x, router_w, k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    gate, up = torch._grouped_mm(x[token], gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)


def dense_ffn(rows, gate_up_e, down_e):
    gate, up = torch.matmul(rows, gate_up_e.T).chunk(2, dim=-1)
    return torch.matmul(F.silu(gate) * up, down_e.T)


PEERS = {"hf_loop": hf_loop_moe, "grouped_mm": grouped_mm_moe}


def grouped_mm_works(E: int, k: int, dtype: torch.dtype, device: str) -> dict[str, bool]:
    """Which passes of the grouped_mm peer run and match the HF loop on a small case; the
    installed torch may lack _grouped_mm for a dtype or device."""
    torch.manual_seed(1)
    d, f, T = 64, 32, 64
    router = torch.randn(E, d, device=device, dtype=dtype) * d ** -0.5
    gate_up = torch.randn(E, 2 * f, d, device=device, dtype=dtype) * d ** -0.5
    down = torch.randn(E, d, f, device=device, dtype=dtype) * f ** -0.5
    params = [router, gate_up, down]
    x = torch.randn(T, d, device=device, dtype=dtype)
    g = torch.randn_like(x)
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def run(peer):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        xi = x.clone().requires_grad_()
        out = peer(xi, *leaves, k)
        (out * g).sum().backward()
        return [out.detach(), xi.grad] + [p.grad for p in leaves]

    def close(a, b):
        return (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.float().abs().max().item())

    ok = {"fwd": False, "fwd+bwd": False}
    expected = run(hf_loop_moe)
    try:
        with torch.no_grad():
            ok["fwd"] = close(grouped_mm_moe(x, *params, k), expected[0])
        ok["fwd+bwd"] = ok["fwd"] and all(close(a, b) for a, b in zip(run(grouped_mm_moe), expected))
    except RuntimeError as err:
        print(f"  grouped_mm {dtype}: {str(err).splitlines()[0]}")
    return ok
