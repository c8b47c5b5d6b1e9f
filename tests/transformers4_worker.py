"""Run by test_hf_equivalence.py in a subprocess with transformers 4.x first on PYTHONPATH
(one process cannot hold two transformers versions). Builds the 4.x MoE blocks, converts them
with sparsemoe.hf and writes what it measured to OUT/results.json, plus each block's state
dict, input and output to OUT/<family>.pt for the parent to replay on the 5.x blocks.

Usage: PYTHONPATH=<transformers 4.x dir> python tests/transformers4_worker.py OUT
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch
import transformers as T

from sparsemoe.hf import detect_layout, family_of, from_hf, from_hf_state_dict, patch_moe_blocks, to_hf

D = 16
SHAPE = (3, 8, D)

CONFIGS = {
    "mixtral": (lambda: T.MixtralConfig(hidden_size=D, intermediate_size=12, num_local_experts=6,
                                        num_experts_per_tok=2), "mixtral", "MixtralSparseMoeBlock"),
    "qwen2_moe": (lambda: T.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=12, num_experts=6,
                                           num_experts_per_tok=2, shared_expert_intermediate_size=20,
                                           norm_topk_prob=False), "qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": (lambda: T.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=12, num_experts=6,
                                           num_experts_per_tok=2, norm_topk_prob=True),
                  "qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "olmoe": (lambda: T.OlmoeConfig(hidden_size=D, intermediate_size=12, num_experts=6, num_experts_per_tok=2,
                                    norm_topk_prob=False), "olmoe", "OlmoeSparseMoeBlock"),
    "deepseek_v3": (lambda: T.DeepseekV3Config(hidden_size=D, moe_intermediate_size=12, n_routed_experts=8,
                                               num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                                               routed_scaling_factor=2.5, norm_topk_prob=True),
                    "deepseek_v3", "DeepseekV3MoE"),
    # 4.x hard-codes alpha=1.702 and limit=7.0 in the experts, whatever the config says.
    "gpt_oss": (lambda: T.GptOssConfig(hidden_size=D, intermediate_size=12, num_local_experts=6,
                                       num_experts_per_tok=2), "gpt_oss", "GptOssMLP"),
    "llama4_text": (lambda: T.Llama4TextConfig(hidden_size=D, intermediate_size=12, num_local_experts=6,
                                               num_experts_per_tok=2), "llama4", "Llama4TextMoe"),
    "switch_transformers": (lambda: T.SwitchTransformersConfig(d_model=D, d_ff=12, num_experts=4, expert_capacity=3,
                                                               router_bias=True),
                            "switch_transformers", "SwitchTransformersSparseMLP"),
}
# What the parent must set on its 5.x config for the same computation.
CONFIG_OVERRIDES = {"gpt_oss": {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}}


def make_block(family: str, seed: int):
    make_config, module, name = CONFIGS[family]
    config = make_config()
    mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[name])
    block = getattr(mod, name)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in block.state_dict().items():
            if not t.is_floating_point():
                continue
            if "e_score_correction" in key:
                # Positive: 4.x masks excluded groups with 0.0 instead of -inf, which only
                # matters when an eligible score + bias is negative (see the parent's docstring).
                t.copy_(torch.rand(t.shape, generator=g) * 0.2)
            elif "bias" in key and t.dim() <= 2:
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            else:
                fan_in = t.shape[1] if key.startswith("experts.") and t.dim() == 3 and \
                    family in ("gpt_oss", "llama4_text") else t.shape[-1]
                std = (2.0 if key.split(".")[0] in ("gate", "router") else 1.0) / math.sqrt(fan_in)
                t.copy_(torch.randn(t.shape, generator=g) * std)
    return block, config


def hf_forward(block, x):
    out = block(x)
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(x.shape)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(family: str, out_dir: Path) -> dict:
    block, config = make_block(family, 0)
    assert family_of(block) == family
    layout = detect_layout(block.state_dict(), family)
    layer = from_hf(block, config).eval()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))

    xh, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = hf_forward(block, xh)
    want.backward(grad_out)
    got = layer(xl)
    got.backward(grad_out)
    hf_grads = {n: torch.zeros_like(t) for n, t in block.state_dict().items()}
    hf_grads.update({n: p.grad for n, p in block.named_parameters() if p.grad is not None})
    mapped = from_hf_state_dict(hf_grads, family)
    grad_errs = {"x": rel_err(xl.grad, xh.grad)}
    grad_errs.update({n: rel_err(p.grad, mapped[n]) for n, p in layer.named_parameters()})

    other, _ = make_block(family, 5)
    to_hf(layer, other)
    a, b = other.state_dict(), block.state_dict()
    bitwise = set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    torch.save({"state_dict": block.state_dict(), "x": x, "out": want.detach(),
                "config": CONFIG_OVERRIDES.get(family, {})}, out_dir / f"{family}.pt")
    return {"layout": layout, "forward_rel_err": rel_err(got.detach(), want.detach()),
            "grad_rel_err": max(grad_errs.values()), "grad_rel_errs": grad_errs,
            "round_trip_bitwise": bitwise}


def _structure(out):
    """The return signature of a block: nested tuple types and tensor shapes."""
    if isinstance(out, tuple):
        return [_structure(o) for o in out]
    return list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__


def _flat(out):
    return [t for o in out for t in _flat(o)] if isinstance(out, tuple) else [out]


def check_patched(family: str) -> dict:
    """patch_moe_blocks on a 4.x block: what it returns, and the gradients of its input and of
    every parameter, against the same block unpatched."""
    block, config = make_block(family, 3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    runs = []
    for patch in (False, True):
        b = copy.deepcopy(block)
        names = patch_moe_blocks(b, config) if patch else []
        xi = x.clone().requires_grad_(True)
        out = b(xi)
        first = out[0] if isinstance(out, tuple) else out
        first.backward(torch.ones_like(first))
        runs.append((names, out, xi.grad, {n: p.grad for n, p in b.named_parameters()},
                     sorted(b.state_dict())))
    (_, want, gx_want, g_want, keys_want), (names, got, gx_got, g_got, keys_got) = runs
    errs = {"x": rel_err(gx_got, gx_want)}
    for n, g in g_want.items():
        other = g_got[n]
        if g is None:  # an expert no token reached: the stacked weights give it zeros
            errs[n] = 0.0 if other is None or not other.any() else 1.0
        else:
            errs[n] = rel_err(other, g)
    outs = [rel_err(a.detach(), b.detach()) for a, b in zip(_flat(got), _flat(want))
            if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return {"patched": names, "same_signature": _structure(got) == _structure(want),
            "same_keys": keys_got == keys_want, "forward_rel_err": max(outs), "grad_rel_err": max(errs.values())}


def check_patched_model() -> dict:
    """A whole 4.x Mixtral model: logits and greedy tokens with its blocks patched."""
    torch.manual_seed(0)
    config = T.MixtralConfig(vocab_size=64, hidden_size=D, intermediate_size=12, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=3)
    model = T.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, output_router_logits=True)
        tokens_want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        names = patch_moe_blocks(model)
        got = model(ids, output_router_logits=True)
        tokens_got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return {"patched": names, "logits_rel_err": rel_err(got.logits, want.logits),
            "aux_loss_rel_err": rel_err(got.aux_loss, want.aux_loss), "same_tokens": torch.equal(tokens_got, tokens_want)}


def check_jitter_falls_back() -> dict:
    """A 4.x Mixtral block training with router jitter (which scales its input in place) runs its
    own computation, with a warning."""
    import warnings
    block, config = make_block("mixtral", 3)
    block.jitter_noise = 0.1
    block.train()
    patch_moe_blocks(block, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block(torch.randn(SHAPE))
    return {"warned": any("router jitter" in str(w.message) for w in caught)}


def main() -> None:
    out_dir = Path(sys.argv[1])
    results = {"transformers": T.__version__, "families": {f: check(f, out_dir) for f in CONFIGS},
               "patched": {f: check_patched(f) for f in CONFIGS},
               "patched_model": check_patched_model(), "jitter_fallback": check_jitter_falls_back()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
