"""sparsemoe.hf: MoELayer against the Hugging Face transformers MoE blocks, exactly.

For each of the 8 families a tiny block with every weight random (DeepSeek's
e_score_correction_bias, GPT-OSS's biases and the Switch router bias included) is converted
and held to HF's eager path: float32 outputs to 1e-5 relative, bfloat16 outputs to twice the
error HF's own bfloat16 block makes against a float64 run of it, float32 gradients of the
input and of every weight, bitwise weight round trips, and the transformers 4.x layout.

Where HF deviates from a model's published definition the layer follows the published one;
the deviations found (none of them reachable by these float32 tests) are:
- Switch: HF casts the router probabilities to the input dtype *before* the argmax, so in
  bfloat16 near-ties pick the lower index; the published router (and sparsemoe, with
  router_dtype=float32) picks on the float32 probabilities. In float32 with jitter on, HF
  also multiplies the caller's tensor in place (``.to(float32)`` is a no-op there), so the
  experts see the jittered input; published Switch jitters the router input only.
- Mixtral: HF's optional router_jitter_noise scales the whole block input; published Mixtral
  has no jitter; sparsemoe maps it to router-input jitter (training only; off by default).
- DeepSeek-V3, transformers 4.x only: group masking fills excluded experts with 0.0 instead of
  -inf, so a negative score + e_score_correction_bias in an eligible group ranks below the
  excluded experts (5.x and the published model use -inf). The 4.x test keeps the bias
  positive so that the two agree.
- DeepSeek-V3 / Qwen / Llama 4 / GPT-OSS round routing weights to the activation dtype at
  different points in bfloat16 (published DeepSeek casts the weights to bf16, HF 5.x keeps
  float32); those differences stay inside the bfloat16 tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# transformers is a test dependency (the README's test command installs it): a missing or old
# one fails these tests rather than skipping them, so the equivalence claims are always checked.
try:
    import transformers
except ImportError as e:  # pragma: no cover
    raise ImportError("tests/test_hf_equivalence.py needs transformers 5.x: pip install transformers==5.23.0") from e
assert int(transformers.__version__.split(".")[0]) >= 5, \
    f"tests/test_hf_equivalence.py builds transformers 5.x blocks, found {transformers.__version__}"

from helpers import lowp_tolerance  # noqa: E402

from sparsemoe import MoELayer, reference  # noqa: E402
from sparsemoe.hf import (  # noqa: E402
    family_of, from_hf, from_hf_state_dict, layer_options, to_hf, to_hf_state_dict)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
            "llama4_text", "switch_transformers")
PER_EXPERT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
D = 16
SHAPE = (3, 8, D)  # batch >= 2: Switch's capacity is per sequence


# --- building tiny HF blocks --------------------------------------------------------------------


def make_config(family: str, **overrides):
    T = transformers
    base = {
        "mixtral": lambda: T.MixtralConfig(hidden_size=D, intermediate_size=12, num_local_experts=6,
                                           num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=12, num_experts=6,
                                              num_experts_per_tok=2, shared_expert_intermediate_size=20,
                                              norm_topk_prob=False),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=12, num_experts=6,
                                              num_experts_per_tok=2, norm_topk_prob=True),
        "olmoe": lambda: T.OlmoeConfig(hidden_size=D, intermediate_size=12, num_experts=6,
                                       num_experts_per_tok=2, norm_topk_prob=False),
        "deepseek_v3": lambda: T.DeepseekV3Config(hidden_size=D, moe_intermediate_size=12, n_routed_experts=8,
                                                  num_experts_per_tok=3, n_group=4, topk_group=2,
                                                  n_shared_experts=2, routed_scaling_factor=2.5,
                                                  norm_topk_prob=True),
        # A small limit and a non-default alpha: the clamps are active and the config is read.
        "gpt_oss": lambda: T.GptOssConfig(hidden_size=D, intermediate_size=12, num_local_experts=6,
                                          num_experts_per_tok=2, swiglu_limit=1.5, swiglu_alpha=1.3),
        "llama4_text": lambda: T.Llama4TextConfig(hidden_size=D, intermediate_size=12, num_local_experts=6,
                                                  num_experts_per_tok=2),
        # Capacity 3 of 8 tokens per sequence over 4 experts: some tokens are dropped.
        "switch_transformers": lambda: T.SwitchTransformersConfig(d_model=D, d_ff=12, num_experts=4,
                                                                  expert_capacity=3, router_bias=True),
    }[family]()
    for key, value in overrides.items():
        setattr(base, key, value)
    base._experts_implementation = "eager"
    return base


def block_class(family: str):
    module, name = {
        "mixtral": ("mixtral", "MixtralSparseMoeBlock"), "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
        "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock"), "olmoe": ("olmoe", "OlmoeSparseMoeBlock"),
        "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE"), "gpt_oss": ("gpt_oss", "GptOssMLP"),
        "llama4_text": ("llama4", "Llama4TextMoe"),
        "switch_transformers": ("switch_transformers", "SwitchTransformersSparseMLP"),
    }[family]
    mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[name])
    return getattr(mod, name)


def randomize(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and floating buffer random: routers with logits of order 1 (so routing
    weights are far from uniform), experts like nn.Linear, biases and selection bias nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in block.state_dict().items():
            if not t.is_floating_point():
                continue
            if "bias" in name and t.dim() <= 2:  # router / expert biases, e_score_correction_bias
                std = 0.1 if "e_score_correction" in name else 0.5
                t.copy_(torch.randn(t.shape, generator=g) * std)
                continue
            fan_in = t.shape[-1]
            if name.startswith(("experts.gate_up_proj", "experts.down_proj")) and \
                    family_of(block) in ("gpt_oss", "llama4_text"):
                fan_in = t.shape[1]  # stored transposed: [E, in, out]
            std = 2.0 / math.sqrt(fan_in) if name.split(".")[0] in ("gate", "router") else 1.0 / math.sqrt(fan_in)
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return block


def make_block(family: str, seed: int = 0, **overrides):
    config = make_config(family, **overrides)
    block = randomize(block_class(family)(config), seed).eval()
    return block, config


def hf_forward(block, x):
    out = block(x)
    if isinstance(out, tuple):  # GPT-OSS: (out, scores); Llama 4: (out [T, d], logits)
        out = out[0]
    return out.reshape(x.shape)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_input(dtype=torch.float32, seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- the layer as the README defines it, from sparsemoe.reference --------------------------------


def reference_layer(sd, config, x):
    """MoELayer's forward per its design, composed of sparsemoe.reference ops: matching HF with
    this tells a conversion bug from a layer bug."""
    t = x.reshape(-1, x.shape[-1])
    w, b = sd["router.weight"], sd.get("router.bias")
    rd = config.router_dtype or t.dtype
    logits = F.linear(t.to(rd), w.to(rd), None if b is None else b.to(rd))
    weights, ids = reference.route(logits, config.top_k, config.renormalize, config.scoring,
                                   sd.get("router.selection_bias"), config.num_groups, config.topk_groups,
                                   config.routed_scaling_factor)
    capacity = config.expert_capacity
    groups = x.reshape(-1, x.shape[-2], x.shape[-1]).shape[0] if config.capacity_scope == "sequence" else 1
    x_sorted, offsets, slot = reference.dispatch(t, ids, sd["gate_up_proj"].shape[0],
                                                 -1 if capacity is None else capacity, None, groups)
    if config.weights_on_input:
        x_sorted, weights = reference.scatter_rows(t, slot, weights, x_sorted.shape[0]), None
    y = reference.expert_ffn(x_sorted, offsets, sd["gate_up_proj"], sd["down_proj"], config.activation,
                             sd.get("gate_up_proj_bias"), sd.get("down_proj_bias"), config.swiglu_alpha,
                             config.swiglu_limit)
    out = reference.combine(y, slot, weights)
    if "shared_expert.up_proj.weight" in sd:
        s = F.linear(F.silu(F.linear(t, sd["shared_expert.gate_proj.weight"]))
                     * F.linear(t, sd["shared_expert.up_proj.weight"]), sd["shared_expert.down_proj.weight"])
        if "shared_expert_gate.weight" in sd:
            s = torch.sigmoid(F.linear(t, sd["shared_expert_gate.weight"])) * s
        out = out + s
    return out.reshape(x.shape)


# --- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_matches_hf_through_reference(family):
    """The converted weights and options, run through sparsemoe.reference, give HF's output."""
    block, config = make_block(family)
    x = make_input()
    with torch.no_grad():
        want = hf_forward(block, x)
        got = reference_layer(from_hf_state_dict(block.state_dict(), family),
                              layer_options(config, family, block), x)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_float32(family):
    block, config = make_block(family)
    layer = from_hf(block, config).eval()
    x = make_input()
    with torch.no_grad():
        want, got = hf_forward(block, x), layer(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert rel_err(got, want) <= 1e-5, f"{family}: relative error {rel_err(got, want):.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_bfloat16(family):
    block, config = make_block(family)
    block = block.to(torch.bfloat16)
    block64 = copy.deepcopy(block).to(torch.float64)
    layer = from_hf(block, config).eval()
    assert layer.down_proj.dtype == torch.bfloat16
    x = make_input(torch.bfloat16)
    with torch.no_grad():
        exact = hf_forward(block64, x.double())
        plain = hf_forward(block, x)
        got = layer(x)
    assert got.dtype == torch.bfloat16
    lowp_tolerance(got, plain, exact)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_float32(family):
    """d out / d x and d out / d every weight, HF's mapped through the same conversion."""
    block, config = make_block(family)
    layer = from_hf(block, config).eval()
    x = make_input()
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))

    xh = x.clone().requires_grad_(True)
    hf_forward(block, xh).backward(grad_out)
    xl = x.clone().requires_grad_(True)
    layer(xl).backward(grad_out)
    assert rel_err(xl.grad, xh.grad) <= 1e-5, f"x: {rel_err(xl.grad, xh.grad):.3g}"

    # Gradients are laid out like their weights, so the state-dict conversion maps them too.
    hf_grads = {n: torch.zeros_like(t) for n, t in block.state_dict().items()}
    hf_grads.update({n: p.grad for n, p in block.named_parameters() if p.grad is not None})
    want = from_hf_state_dict(hf_grads, family)
    params = dict(layer.named_parameters())
    assert set(params) == {k for k in want if k != "router.selection_bias"}, (set(params), set(want))
    for name, p in params.items():
        assert p.grad is not None, name
        assert rel_err(p.grad, want[name]) <= 1e-5, f"{name}: {rel_err(p.grad, want[name]):.3g}"


# --- weights ------------------------------------------------------------------------------------


def assert_bitwise_equal(a: dict, b: dict):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(-1).view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bitwise(family, dtype):
    block, config = make_block(family)
    block = block.to(dtype)
    other, _ = make_block(family, seed=5)
    other = other.to(dtype)
    to_hf(from_hf(block, config), other)
    assert_bitwise_equal(other.state_dict(), block.state_dict())


def test_round_trip_keeps_float32_switch_router():
    """A bf16 Switch block's router turns float32 on its first forward (HF casts the module);
    the layer keeps it float32, so converting back loses nothing."""
    block, config = make_block("switch_transformers")
    block = block.to(torch.bfloat16)
    block(make_input(torch.bfloat16))
    assert block.router.classifier.weight.dtype == torch.float32
    with torch.no_grad():
        block.router.classifier.weight.add_(1e-4)  # bits a bf16 copy would lose
    other, _ = make_block("switch_transformers", seed=5)
    other = other.to(torch.bfloat16)
    other.router.classifier.float()
    to_hf(from_hf(block, config), other)
    assert_bitwise_equal(other.state_dict(), block.state_dict())


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text"])
def test_gpt_oss_and_llama4_layouts_are_converted(family):
    """Spot-check the layout work against HF's own reading of its weights, not our inverse."""
    block, _ = make_block(family)
    sd = from_hf_state_dict(block.state_dict(), family)
    E, width, d = sd["gate_up_proj"].shape
    if family == "gpt_oss":
        gu = block.experts.gate_up_proj  # [E, d, 2f], gate = columns 0::2, up = 1::2
        assert torch.equal(sd["gate_up_proj"][:, : width // 2], gu[..., 0::2].transpose(1, 2))
        assert torch.equal(sd["gate_up_proj"][:, width // 2:], gu[..., 1::2].transpose(1, 2))
        assert torch.equal(sd["gate_up_proj_bias"][:, : width // 2], block.experts.gate_up_proj_bias[:, 0::2])
        assert torch.equal(sd["down_proj"], block.experts.down_proj.transpose(1, 2))
    elif family == "llama4_text":
        gate, up = block.experts.gate_up_proj.chunk(2, dim=-1)
        assert torch.equal(sd["gate_up_proj"], torch.cat([gate, up], -1).transpose(1, 2))
    for t in sd.values():
        assert t.is_contiguous()


# --- the transformers 4.x layout ----------------------------------------------------------------


@pytest.mark.parametrize("family", PER_EXPERT_FAMILIES + ("switch_transformers",))
def test_per_expert_layout_state_dict(family):
    """4.x checkpoints keep one Linear per expert (Mixtral w1/w3/w2 = gate/up/down): they
    convert to the same layer, give HF's output and convert back to the same bits."""
    block, config = make_block(family)
    fused = from_hf_state_dict(block.state_dict(), family)
    sd4 = to_hf_state_dict(fused, family, "per_expert")
    names = {"mixtral": ("experts.0.w1.weight", "experts.0.w3.weight", "experts.0.w2.weight"),
             "switch_transformers": ("experts.expert_0.wi.weight", "experts.expert_0.wo.weight")}.get(
        family, ("experts.0.gate_proj.weight", "experts.0.up_proj.weight", "experts.0.down_proj.weight"))
    assert set(names) <= set(sd4) and "experts.gate_up_proj" not in sd4
    if family == "mixtral":
        f = fused["down_proj"].shape[2]
        assert torch.equal(sd4["experts.2.w1.weight"], fused["gate_up_proj"][2, :f])
        assert torch.equal(sd4["experts.2.w3.weight"], fused["gate_up_proj"][2, f:])
    back = from_hf_state_dict(sd4, family)
    assert_bitwise_equal(back, fused)
    if family != "switch_transformers":
        assert_bitwise_equal(to_hf_state_dict(back, family, "fused"), block.state_dict())

    layer = MoELayer.from_config(layer_options(config, family, block))
    layer.load_state_dict(back)
    x = make_input()
    with torch.no_grad():
        assert rel_err(layer.eval()(x), hf_forward(block, x)) <= 1e-5


# --- Switch capacity ----------------------------------------------------------------------------


@pytest.mark.parametrize("router_bias", [False, True])
def test_switch_capacity_drops_per_sequence(router_bias):
    """Expert capacity counts per sequence, earlier tokens first; dropped tokens give exactly 0
    (the residual is added outside the sparse MLP) in HF and in the layer."""
    block, config = make_block("switch_transformers", expert_capacity=2, router_bias=router_bias)
    layer = from_hf(block, config).eval()
    x = make_input()
    with torch.no_grad():
        want, got = hf_forward(block, x), layer(x)
        logits = F.linear(x, block.router.classifier.weight, block.router.classifier.bias)
    # Independent expectation: top-1 expert, then position within the sequence.
    onehot = F.one_hot(logits.argmax(-1), 4)
    per_sequence = (onehot.cumsum(1) * onehot).sum(-1)  # [B, S]
    per_batch = (onehot.reshape(-1, 4).cumsum(0) * onehot.reshape(-1, 4)).sum(-1).reshape(SHAPE[:2])
    dropped = per_sequence > 2
    assert dropped.any() and (~dropped).any()
    assert ((per_batch > 2) & ~dropped).any(), "per-sequence capacity must keep a token a batch-wide one drops"
    assert torch.equal(want[dropped], torch.zeros_like(want[dropped]))
    assert torch.equal(got[dropped], torch.zeros_like(got[dropped]))
    assert (want[~dropped] != 0).any(-1).all() and (got[~dropped] != 0).any(-1).all()
    assert rel_err(got, want) <= 1e-5
    kept = (onehot * ~dropped.unsqueeze(-1)).reshape(-1, 4).sum(0)
    assert torch.equal(layer.tokens_per_expert.cpu(), kept)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"])
def test_aux_loss_is_hf_loss_over_k(family):
    """HF's load_balancing_loss_func (padding excluded through attention_mask) is k times ours:
    sparsemoe normalises to 1.0 at perfect balance, as Switch and Megatron do."""
    block, config = make_block(family)
    layer = from_hf(block, config)
    x = make_input()
    mask = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(3)) > 0.3
    hf_module = __import__(type(block).__module__, fromlist=["load_balancing_loss_func"])
    k = layer.top_k
    with torch.no_grad():
        layer(x)
        want = hf_module.load_balancing_loss_func((layer.router_logits,), layer.num_experts, k)
        torch.testing.assert_close(k * layer.aux_loss, want, rtol=1e-6, atol=1e-6)
        layer(x, padding_mask=mask)
        want = hf_module.load_balancing_loss_func((layer.router_logits,), layer.num_experts, k, mask.long())
        torch.testing.assert_close(k * layer.aux_loss, want, rtol=1e-6, atol=1e-6)


def test_z_loss_is_switch_router_z_loss():
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    block, config = make_block("switch_transformers")
    layer = from_hf(block, config)
    x = make_input()
    with torch.no_grad():
        layer(x)
    want = router_z_loss_func(layer.router_logits.view(*x.shape[:-1], -1))
    torch.testing.assert_close(layer.z_loss, want, rtol=1e-6, atol=1e-6)


def test_errors_name_the_argument():
    block, config = make_block("mixtral")
    with pytest.raises(TypeError, match=r"block: expected one of .*got torch\.nn\.modules\.linear\.Linear"):
        from_hf(torch.nn.Linear(2, 2), config)
    with pytest.raises(ValueError, match=r"family: expected one of"):
        from_hf_state_dict(block.state_dict(), "mixtral_v9")

    sd4 = to_hf_state_dict(from_hf_state_dict(block.state_dict(), "mixtral"), "mixtral", "per_expert")
    sd4["experts.3.w1.weight"] = sd4["experts.3.w1.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"experts\.\{i\}\.w1\.weight.*\(12, 16\), got \(12, 15\) for expert 3"):
        from_hf_state_dict(sd4, "mixtral")
    sd = dict(block.state_dict())
    del sd["experts.down_proj"]
    with pytest.raises(KeyError, match=r"missing 'experts\.down_proj'"):
        from_hf_state_dict(sd, "mixtral")
    with pytest.raises(ValueError, match=r"layout: expected one of \('fused',\) for gpt_oss, got 'per_expert'"):
        to_hf_state_dict({}, "gpt_oss", "per_expert")

    qwen2, _ = make_block("qwen2_moe")
    with pytest.raises(KeyError, match=r"missing 'shared_expert\.gate_proj\.weight'"):
        to_hf(from_hf(block, config), qwen2)  # a Mixtral layer has no shared expert to write
    wide, wide_config = make_block("mixtral", intermediate_size=10)
    with pytest.raises(ValueError, match=r"expected 'experts\.gate_up_proj' of shape \(6, 24, 16\), got \(6, 20, 16\)"):
        to_hf(from_hf(wide, wide_config), block)
    with pytest.raises(ValueError, match=r"the mixtral block has no place for \['shared_expert"):
        to_hf(from_hf(qwen2, make_config("qwen2_moe")), make_block("qwen3_moe")[0], family="mixtral")
    with pytest.raises(ValueError, match=r"config\.hidden_act: expected 'silu'"):
        layer_options(make_config("mixtral", hidden_act="gelu"), "mixtral")


# --- real transformers 4.x modules ----------------------------------------------------------------

# Setup, once (the README's test command runs it; the tests fail without it):
#   pip install --upgrade --target build/transformers4 --no-deps transformers==4.57.6 huggingface-hub==0.36.0 tokenizers==0.22.1
# SPARSEMOE_TRANSFORMERS4 overrides the folder.
TRANSFORMERS4 = Path(os.environ.get("SPARSEMOE_TRANSFORMERS4",
                                    Path(__file__).resolve().parents[1] / "build" / "transformers4"))


@pytest.fixture(scope="module")
def transformers4_results(tmp_path_factory):
    if not (TRANSFORMERS4 / "transformers" / "__init__.py").exists():
        pytest.fail(f"transformers 4.x is not installed in {TRANSFORMERS4}: run pip install --upgrade --target "
                    f"{TRANSFORMERS4} --no-deps transformers==4.57.6 huggingface-hub==0.36.0 tokenizers==0.22.1")
    out = tmp_path_factory.mktemp("hf4")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TRANSFORMERS4), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    worker = Path(__file__).with_name("transformers4_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["transformers"].startswith("4."), results["transformers"]
    return out, results


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_blocks(family, transformers4_results):
    """Real 4.x blocks: from_hf matches their forward and gradients, to_hf gives back their
    bits, and their state dict, converted to the 5.x layout, makes a 5.x block compute the same."""
    out_dir, results = transformers4_results
    r = results["families"][family]
    assert r["forward_rel_err"] <= 1e-5, r
    assert r["grad_rel_err"] <= 1e-5, r
    assert r["round_trip_bitwise"], r
    assert r["layout"] == ("fused" if family in ("gpt_oss", "llama4_text") else "per_expert"), r

    saved = torch.load(out_dir / f"{family}.pt")
    block5, _ = make_block(family, **saved["config"])
    sd5 = to_hf_state_dict(from_hf_state_dict(saved["state_dict"], family),
                           family, "per_expert" if family == "switch_transformers" else "fused")
    block5.load_state_dict(sd5)
    with torch.no_grad():
        assert rel_err(hf_forward(block5, saved["x"]), saved["out"]) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_blocks_patched(family, transformers4_results):
    """patch_moe_blocks on real 4.x blocks (per-expert experts, GPT-OSS's and Llama-4's fused ones, Switch):
    the same return signature and state-dict keys, outputs and every gradient as unpatched."""
    r = transformers4_results[1]["patched"][family]
    assert r["patched"] == [""], r
    assert r["same_signature"] and r["same_keys"], r
    assert r["forward_rel_err"] <= 1e-5 and r["grad_rel_err"] <= 1e-5, r


def test_transformers4_model_patched(transformers4_results):
    r = transformers4_results[1]["patched_model"]
    assert r["patched"] == ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"], r
    assert r["logits_rel_err"] <= 1e-5 and r["aux_loss_rel_err"] <= 1e-5 and r["same_tokens"], r


def test_transformers4_jitter_falls_back(transformers4_results):
    assert transformers4_results[1]["jitter_fallback"]["warned"]
