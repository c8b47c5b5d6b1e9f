"""Whole Hugging Face models on sparsemoe kernels, against transformers' own eager experts.

Every family of the README's model table is built offline from a tiny config (more experts
and another top-k than the block tests use), saved with ``save_pretrained`` and loaded twice:
with ``experts_implementation="eager"`` and with ``"sparsemoe"`` (the families the experts
interface reaches), or loaded and then ``patch_moe_blocks``-ed (Llama-4 text, Switch).
Both copies hold the same weights; float32 logits, the LM loss's gradient of every parameter,
router logits and aux loss, a gradient-checkpointed training step, greedy generation and the
saved checkpoint must agree; bfloat16 logits are held to twice the error of HF's own bfloat16
run against a float64 one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from helpers import lowp_tolerance, needs_microkernel  # noqa: E402
from sparsemoe import hf, hf_experts  # noqa: E402
from sparsemoe.hf_experts import ExpertsPlan  # noqa: E402

T = transformers
V, D, LAYERS, HEADS = 64, 32, 2, 4
ATTN = dict(vocab_size=V, eos_token_id=None, bos_token_id=None, hidden_size=D, num_attention_heads=HEADS,
            num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "mixtral": lambda n: T.MixtralConfig(**ATTN, num_hidden_layers=n, intermediate_size=24, num_local_experts=8, num_experts_per_tok=3),
    "qwen2_moe": lambda n: T.Qwen2MoeConfig(**ATTN, num_hidden_layers=n, moe_intermediate_size=24, num_experts=10, num_experts_per_tok=4,
                                          shared_expert_intermediate_size=20, norm_topk_prob=False,
                                          intermediate_size=40),
    "qwen3_moe": lambda n: T.Qwen3MoeConfig(**ATTN, num_hidden_layers=n, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                                          norm_topk_prob=True, head_dim=8, intermediate_size=40),
    "olmoe": lambda n: T.OlmoeConfig(**ATTN, num_hidden_layers=n, intermediate_size=24, num_experts=12, num_experts_per_tok=4,
                                   norm_topk_prob=False),
    "deepseek_v3": lambda n: T.DeepseekV3Config(**{**ATTN, "num_key_value_heads": HEADS}, num_hidden_layers=n, moe_intermediate_size=24, intermediate_size=40,
                                              n_routed_experts=12, num_experts_per_tok=4, n_group=4, topk_group=2,
                                              n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                              first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": lambda n: T.GptOssConfig(**ATTN, num_hidden_layers=n, intermediate_size=24, num_local_experts=8,
                                       num_experts_per_tok=3, head_dim=8, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention"][-n:]),
    "llama4_text": lambda n: T.Llama4TextConfig(**ATTN, num_hidden_layers=n, intermediate_size=24, intermediate_size_mlp=40,
                                              num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                              interleave_moe_layer_step=1),
    "switch_transformers": lambda n: T.SwitchTransformersConfig(
        vocab_size=V, d_model=D, d_ff=24, d_kv=8, num_heads=HEADS, num_layers=n, num_decoder_layers=n,
        num_experts=8, expert_capacity=5, router_bias=True, dropout_rate=0.0, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, decoder_start_token_id=0),
}
INTERFACE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
PATCHED = ("llama4_text", "switch_transformers")
FAMILIES = INTERFACE + PATCHED


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register()


def _model_class(family):
    return SwitchTransformersForConditionalGeneration if family == "switch_transformers" else AutoModelForCausalLM


def _save_models(tmp_path_factory, layers: int) -> dict:
    """family -> the directory of a saved tiny model with every weight random."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        cls, config = _model_class(family), CONFIGS[family](layers)
        model = cls(config) if family == "switch_transformers" else cls.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        path = tmp_path_factory.mktemp(f"{family}-{layers}")
        model.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _save_models(tmp_path_factory, LAYERS)


@pytest.fixture(scope="module")
def one_layer_checkpoints(tmp_path_factory):
    return _save_models(tmp_path_factory, 1)


def load(path, family, implementation, dtype=torch.float32, **kwargs):
    """The model at `path` with its experts on `implementation` ("eager" or "sparsemoe")."""
    if family in PATCHED:
        model = _model_class(family).from_pretrained(path, dtype=dtype, **kwargs)
        if implementation == "sparsemoe":
            assert hf.patch_moe_blocks(model), "no block was patched"
    else:
        model = _model_class(family).from_pretrained(path, dtype=dtype, experts_implementation=implementation,
                                                     **kwargs)
    return model.eval()


def batch(family, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, 9), generator=g)
    kwargs = {"input_ids": ids, "labels": ids}
    if family == "switch_transformers":
        kwargs["decoder_input_ids"] = torch.randint(1, V, (2, 6), generator=g)
        kwargs["labels"] = kwargs["decoder_input_ids"]
    return kwargs


def ran_sparsemoe(model, family) -> bool:
    """Whether a forward of `model` runs sparsemoe's expert kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        model(**{k: v for k, v in batch(family).items() if k != "labels"})
    return any("sparsemoe::expert_ffn" in e.name for e in prof.events())


def assert_fp32_close(got, want, what):
    scale = max(want.abs().max().item(), 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_every_gradient_match_eager(family, checkpoints):
    eager, ours = (load(checkpoints[family], family, impl) for impl in ("eager", "sparsemoe"))
    assert ran_sparsemoe(ours, family) and not ran_sparsemoe(eager, family)
    results = []
    for model in (eager, ours):
        out = model(**batch(family))
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits_e, grads_e), (logits_o, grads_o) = results
    assert_fp32_close(logits_o, logits_e, "logits")
    assert grads_o.keys() == grads_e.keys()
    reached = 0
    for name, g in grads_e.items():
        if g is None:
            # A per-expert module no token reached: HF leaves its gradient None, the stacked
            # weights of a patched block give it zeros.
            assert grads_o[name] is None or (family in PATCHED and not grads_o[name].any()), name
            continue
        assert_fp32_close(grads_o[name], g, f"grad of {name}")
        reached += ("experts" in name or "router" in name or "gate" in name) and g.abs().max() > 0
    assert reached >= 4, "the loss reached too few expert and router parameters to be a test"


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_within_twice_hf_error(family, one_layer_checkpoints):
    """One decoder layer: a later layer's router would see inputs that differ by bf16 rounding
    between the two runs, and one flipped near-tie pick there outweighs every rounding error.
    With one layer both bf16 runs route the same tokens to the same experts."""
    path = one_layer_checkpoints[family]
    exact = load(path, family, "eager", dtype=torch.float64)
    plain = load(path, family, "eager", dtype=torch.bfloat16)
    ours = load(path, family, "sparsemoe", dtype=torch.bfloat16)
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    with torch.no_grad():
        want, base, got = (m(**inputs).logits for m in (exact, plain, ours))
    assert got.dtype == torch.bfloat16
    lowp_tolerance(got, base, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_logits_and_aux_loss_are_recorded(family, checkpoints):
    outs = []
    for impl in ("eager", "sparsemoe"):
        model = load(checkpoints[family], family, impl)
        with torch.no_grad():
            outs.append(model(**batch(family), output_router_logits=True))
    eager, ours = outs
    names = ["router_logits", "encoder_router_logits", "decoder_router_logits"]
    found = [n for n in names if getattr(eager, n, None) is not None]
    assert found, "the model recorded no router logits"
    for n in found:
        a, b = getattr(eager, n), getattr(ours, n)
        assert len(a) == len(b) and len(a) > 0
        for x, y in zip(a, b):
            x, y = (t[0] if isinstance(t, tuple) else t for t in (x, y))
            assert_fp32_close(y, x, n)
    aux = [n for n in ("aux_loss", "encoder_aux_loss", "decoder_aux_loss") if getattr(eager, n, None) is not None]
    for n in aux:
        torch.testing.assert_close(getattr(ours, n), getattr(eager, n), rtol=1e-6, atol=1e-7)
    assert_fp32_close(ours.loss, eager.loss, "loss with the aux loss")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointed_training_step(family, checkpoints):
    after = []
    for impl in ("eager", "sparsemoe"):
        model = load(checkpoints[family], family, impl)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch.manual_seed(5)  # the same router jitter (Switch) in both runs
        for step in range(2):
            opt.zero_grad()
            model(**batch(family, seed=step)).loss.backward()
            opt.step()
        after.append(dict(model.named_parameters()))
    eager, ours = after
    for name, p in eager.items():
        assert_fp32_close(ours[name].detach(), p.detach(), f"{name} after two steps")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_gives_the_same_tokens(family, checkpoints):
    prompt = batch(family)["input_ids"][:, :5]
    tokens = []
    for impl in ("eager", "sparsemoe"):
        model = load(checkpoints[family], family, impl)
        tokens.append(model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                     pad_token_id=0))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_is_the_stock_one(family, checkpoints, tmp_path):
    model = load(checkpoints[family], family, "sparsemoe")
    model(**batch(family))  # a forward first: nothing it leaves behind may reach the checkpoint
    model.save_pretrained(tmp_path)
    stock = load_file(checkpoints[family] / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == stock.keys()
    for key, value in stock.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize("family", INTERFACE)
def test_switching_implementations_both_ways_on_a_live_model(family, checkpoints):
    model = load(checkpoints[family], family, "eager")
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    with torch.no_grad():
        want = model(**inputs).logits
        for impl in ("sparsemoe", "eager", "sparsemoe", "grouped_mm", "eager"):
            model.set_experts_implementation(impl)
            assert model.config._experts_implementation == impl
            assert ran_sparsemoe(model, family) == (impl == "sparsemoe")
            assert_fp32_close(model(**inputs).logits, want, f"logits after switching to {impl}")


@pytest.mark.parametrize("family", PATCHED)
def test_patching_undoes_and_repatches(family, checkpoints):
    model = load(checkpoints[family], family, "eager")
    assert not ran_sparsemoe(model, family)
    first = hf.patch_moe_blocks(model)
    assert first and hf.patch_moe_blocks(model) == []  # already patched blocks are kept
    assert ran_sparsemoe(model, family)
    assert hf.unpatch_moe_blocks(model) == first
    assert not ran_sparsemoe(model, family)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_expert_weights_are_read_in_place(family, checkpoints):
    """The standard layout (OLMoE) and the transposed, interleaved one (GPT-OSS) are read in
    place: no copy of an expert weight, in either orientation, in forward or backward."""
    model = load(checkpoints[family], family, "sparsemoe")
    shapes = {s for n, p in model.named_parameters() if "experts" in n and p.dim() == 3
              for s in (tuple(p.shape), tuple(p.transpose(1, 2).shape))}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        model(**batch(family)).loss.backward()
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::stack")
              and any(tuple(s) in shapes for s in e.input_shapes if s)]
    assert not copies, copies


def test_plans_name_every_layout(checkpoints):
    plans = {}
    for family in INTERFACE:
        model = load(checkpoints[family], family, "sparsemoe")
        found = hf.experts_plan(model)
        assert len(found) == LAYERS and all(isinstance(p, ExpertsPlan) for p in found.values()), found
        plans[family] = next(iter(found.values()))
    assert plans["mixtral"] == ExpertsPlan("swiglu", transposed=False, interleaved=False, has_bias=False, gated=True)
    gpt = plans["gpt_oss"]
    assert (gpt.activation, gpt.transposed, gpt.interleaved, gpt.has_bias) == ("clamped_swiglu", True, True, True)
    assert (gpt.swiglu_alpha, gpt.swiglu_limit) == (1.702, 7.0)


# --- fallbacks ----------------------------------------------------------------------------------


class _Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def _unsupported_model(checkpoints):
    """A Mixtral whose first layer's experts use an activation sparsemoe lacks."""
    model = load(checkpoints["mixtral"], "mixtral", "sparsemoe")
    model.model.layers[0].mlp.experts.act_fn = _Tanh()
    return model


def test_unsupported_experts_fall_back_with_one_warning(checkpoints):
    model = _unsupported_model(checkpoints)
    reference = load(checkpoints["mixtral"], "mixtral", "eager")
    reference.model.layers[0].mlp.experts.act_fn = _Tanh()
    inputs = {k: v for k, v in batch("mixtral").items() if k != "labels"}
    plan = hf.experts_plan(model)
    assert isinstance(plan["model.layers.0.mlp.experts"], str) and "_Tanh" in plan["model.layers.0.mlp.experts"]
    assert isinstance(plan["model.layers.1.mlp.experts"], ExpertsPlan)
    hf_experts._warned.clear()  # an earlier test may have seen this class and reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(**inputs).logits
            model(**inputs)
    ours = [w for w in caught if "sparsemoe cannot run the experts" in str(w.message)]
    assert len(ours) == 1 and "_Tanh" in str(ours[0].message)
    assert ran_sparsemoe(model, "mixtral")  # the supported layer still runs on the kernels
    with torch.no_grad():
        assert_fp32_close(got, reference(**inputs).logits, "logits with one layer on the fallback")


def test_unsupported_experts_can_be_an_error(checkpoints):
    model = _unsupported_model(checkpoints)
    try:
        hf.register(on_unsupported="error")
        with pytest.raises(hf.UnsupportedExperts, match="_Tanh"), torch.no_grad():
            model(**{k: v for k, v in batch("mixtral").items() if k != "labels"})
    finally:
        hf.register()


def test_register_rejects_unknown_policy():
    with pytest.raises(ValueError, match="on_unsupported"):
        hf.register(on_unsupported="ignore")


def test_other_fallback_reasons(checkpoints):
    model = load(checkpoints["gpt_oss"], "gpt_oss", "sparsemoe")
    experts = model.model.layers[0].mlp.experts
    experts._is_expert_parallel = True
    assert "expert parallelism" in hf.experts_plan(model)["model.layers.0.mlp.experts"]
    experts._is_expert_parallel = False
    experts.has_post_expert_norm = True
    assert "post" in hf.experts_plan(model)["model.layers.0.mlp.experts"]


def test_custom_gate_and_quantized_weights_fall_back(checkpoints):
    model = load(checkpoints["mixtral"], "mixtral", "sparsemoe")
    experts = model.model.layers[0].mlp.experts
    name = "model.layers.0.mlp.experts"

    class OwnGate(type(experts)):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.tanh(gate) * up

    experts.__class__ = OwnGate
    assert "_apply_gate" in hf.experts_plan(model)[name]
    experts.__class__ = OwnGate.__mro__[1]
    assert isinstance(hf.experts_plan(model)[name], ExpertsPlan)
    with torch.no_grad():
        experts.down_proj = nn.Parameter(experts.down_proj.to(torch.int8), requires_grad=False)
    assert "quantized" in hf.experts_plan(model)[name]


def test_switch_dropout_in_training_falls_back(checkpoints):
    model = load(checkpoints["switch_transformers"], "switch_transformers", "sparsemoe")
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1
    with pytest.warns(UserWarning, match="dropout"):
        model(**batch("switch_transformers"))


def test_compiled_model_matches_eager(checkpoints):
    model = load(checkpoints["mixtral"], "mixtral", "sparsemoe")
    inputs = {k: v for k, v in batch("mixtral").items() if k != "labels"}
    with torch.no_grad():
        want = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(**inputs).logits
    assert_fp32_close(got, want, "compiled logits")


@needs_microkernel  # only there is the cache used
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_inference_packs_the_experts_once_and_repacks_after_a_change(family, checkpoints):
    from sparsemoe.hf_experts import PACKED_ATTR
    eager, ours = (load(checkpoints[family], family, impl) for impl in ("eager", "sparsemoe"))
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    experts = [m for m in ours.modules() if PACKED_ATTR in m.__dict__ or hasattr(m, "has_gate")]
    with torch.no_grad():
        assert_fp32_close(ours(**inputs).logits, eager(**inputs).logits, "first forward")
        first = [m.__dict__[PACKED_ATTR].tensor for m in experts]
        assert all(t is not None for t in first)
        ours(**inputs)
        assert all(m.__dict__[PACKED_ATTR].tensor is t for m, t in zip(experts, first))  # reused
        for model in (eager, ours):
            for name, p in model.named_parameters():
                if "experts" in name and p.dim() == 3:
                    p.mul_(-1.5)
        assert_fp32_close(ours(**inputs).logits, eager(**inputs).logits, "after an in-place change")


@needs_microkernel  # only there is the cache used
def test_packed_weights_can_be_reported_freed_and_turned_off(checkpoints):
    eager, ours = (load(checkpoints["olmoe"], "olmoe", impl) for impl in ("eager", "sparsemoe"))
    inputs = {k: v for k, v in batch("olmoe").items() if k != "labels"}
    expert_bytes = sum(p.nbytes for name, p in ours.named_parameters() if "experts" in name and p.dim() == 3)
    try:
        with torch.no_grad():
            want = eager(**inputs).logits
            ours(**inputs)
            assert hf.packed_weights_bytes(ours) == expert_bytes  # one copy of the (float32) experts
            hf.clear_packed_weights(ours)
            assert hf.packed_weights_bytes(ours) == 0
            ours(**inputs)
            assert hf.packed_weights_bytes(ours) == expert_bytes
            hf.register(packed_weights=False)
            assert_fp32_close(ours(**inputs).logits, want, "logits with packing off")
            assert hf.packed_weights_bytes(ours) == 0  # the copies made before are freed
            ours(**inputs)
            assert hf.packed_weights_bytes(ours) == 0  # and none is made again
    finally:
        hf.register()
    with torch.no_grad():
        ours(**inputs)
    assert hf.packed_weights_bytes(ours) == expert_bytes


def test_register_rejects_a_non_bool_packed_weights():
    with pytest.raises(ValueError, match="packed_weights: expected True or False, got 'no'"):
        hf.register(packed_weights="no")
