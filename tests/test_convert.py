"""sparsemoe.convert: moeify (sparse upcycling of dense FFNs), the MoE losses, checkpoints.

Every architecture is a real Hugging Face model built offline from a tiny config (random
weights): converted with init="upcycle" it must compute what the dense model computed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import transformers  # noqa: E402  (a test dependency: the README's test command installs it)

from sparsemoe import MoELayer  # noqa: E402
from sparsemoe import collect_moe_losses, load_moe, moe_aux_loss, save_moe  # noqa: E402
from sparsemoe.convert import MoEBertOutput, MoEFFN, Passthrough, moeify  # noqa: E402

V, D, F, L = 64, 16, 32, 4  # vocab, hidden, intermediate, layers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: threads only add synchronisation (and spin under a loaded machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama_like(cls_name, config_name, **extra):
    kw = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
    cfg = getattr(transformers, config_name)(**{**kw, **extra})
    return getattr(transformers, cls_name)(cfg)


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        model = _llama_like("LlamaForCausalLM", "LlamaConfig")
    elif arch == "llama_bias":
        model = _llama_like("LlamaForCausalLM", "LlamaConfig", mlp_bias=True)
    elif arch == "mistral":
        model = _llama_like("MistralForCausalLM", "MistralConfig")
    elif arch == "qwen2":
        model = _llama_like("Qwen2ForCausalLM", "Qwen2Config")
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_inner=F, n_layer=L, n_head=2, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                      num_attention_heads=2, max_position_embeddings=64)
        model = transformers.BertModel(cfg)
    elif arch.startswith("seq_"):
        act = {"seq_relu": nn.ReLU(), "seq_gelu": nn.GELU(), "seq_silu": nn.SiLU(),
               "seq_gelu_tanh": nn.GELU(approximate="tanh")}[arch]
        model = nn.Sequential(nn.Linear(8, D), nn.Sequential(nn.Linear(D, F), act, nn.Linear(F, D)),
                              nn.LayerNorm(D), nn.Sequential(nn.Linear(D, F), copy.deepcopy(act), nn.Linear(F, D)))
    else:
        raise AssertionError(arch)
    # HF initialises some weights to constants (biases 0, LayerNorm 1): make every weight random
    # so that a wrong mapping (a missing bias, a transposed Conv1D) cannot hide behind a zero.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(arch: str, batch=2, seq=8):
    g = torch.Generator().manual_seed(1)
    if arch.startswith("seq_"):
        return {"input": torch.randn(batch, seq, 8, generator=g)}
    return {"input_ids": torch.randint(0, V, (batch, seq), generator=g)}


def run(model, arch, x):
    if arch.startswith("seq_"):
        return model(x["input"])
    out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


HF_ARCHS = ("llama", "llama_bias", "mistral", "qwen2", "gpt2", "bert")
SEQ_ARCHS = ("seq_relu", "seq_gelu", "seq_silu", "seq_gelu_tanh")
EXPECTED = {"llama": ("gated_mlp", "swiglu", False), "llama_bias": ("gated_mlp", "swiglu", True),
            "mistral": ("gated_mlp", "swiglu", False), "qwen2": ("gated_mlp", "swiglu", False),
            "gpt2": ("gpt2_mlp", "gelu_tanh", True), "bert": ("bert", "gelu", True),
            "seq_relu": ("sequential", "relu", True), "seq_gelu": ("sequential", "gelu", True),
            "seq_silu": ("sequential", "silu", True), "seq_gelu_tanh": ("sequential", "gelu_tanh", True)}


@pytest.mark.parametrize("arch,top_k", [(a, k) for a in HF_ARCHS for k in (1, 2, 3)] +
                         [(a, k) for a in SEQ_ARCHS for k in (1, 3)])
def test_upcycle_is_exact(arch, top_k):
    model = make(arch)
    x = inputs(arch)
    with torch.no_grad():
        dense = run(model, arch, x)
    summary = moeify(model, num_experts=4, top_k=top_k)
    kind, act, bias = EXPECTED[arch]
    n_blocks = 2 if arch.startswith("seq_") else L
    assert len(summary) == n_blocks and all(r.kind == kind and r.activation == act for r in summary)
    assert all(r.d_model == D and r.d_ff == F for r in summary)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == n_blocks
    assert all((m.gate_up_proj_bias is not None) == bias and m.activation == act for m in layers)
    assert all(r.params_after > r.params_before for r in summary)
    assert "params before" in str(summary) and summary[0].name in str(summary)
    with torch.no_grad():
        moe = run(model, arch, x)
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)
    assert all(m.tokens_per_expert.sum().item() == 16 * top_k for m in layers)


def test_replacement_modules():
    model = make("bert")
    moeify(model, 4, 2)
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, Passthrough) and isinstance(layer.output, MoEBertOutput)
    gpt2 = make("gpt2")
    moeify(gpt2, 4, 2)
    assert isinstance(gpt2.transformer.h[0].mlp, MoEFFN)
    assert gpt2.transformer.h[0].mlp.dropout.p == gpt2.config.resid_pdrop
    llama = make("llama")
    moeify(llama, 4, 2)
    assert isinstance(llama.model.layers[0].mlp, MoELayer)


def test_expert_noise_and_fresh_differ_and_seed_repeats():
    x = inputs("llama")
    base = make("llama")
    with torch.no_grad():
        dense = run(base, "llama", x)
    outs = []
    for _ in range(2):
        model = make("llama")
        moeify(model, 4, 2, expert_noise=0.05, seed=3)
        with torch.no_grad():
            outs.append(run(model, "llama", x))
        w = model.model.layers[0].mlp.gate_up_proj
        assert not torch.equal(w[0], w[1])
    assert torch.equal(outs[0], outs[1])  # the seed makes the noise repeatable
    diff = (outs[0] - dense).abs().max().item()
    assert 1e-5 < diff < 0.5 * dense.abs().max().item()
    fresh = make("llama")
    moeify(fresh, 4, 2, init="fresh", seed=0)
    assert fresh.model.layers[0].mlp.router.weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(run(fresh, "llama", x), dense, atol=1e-3)


def test_target_and_layers_selection():
    model = make("llama")
    x = inputs("llama")
    with torch.no_grad():
        dense = run(model, "llama", x)
    summary = moeify(model, 4, 2, layers=lambda i: i % 2 == 0)
    assert [r.name for r in summary] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    kinds = [type(model.model.layers[i].mlp).__name__ for i in range(L)]
    assert kinds == ["MoELayer", "LlamaMLP", "MoELayer", "LlamaMLP"]
    with torch.no_grad():
        torch.testing.assert_close(run(model, "llama", x), dense, rtol=1e-5, atol=1e-5)

    for layers in (slice(None, None, 2), {0, 2}, [0, -2], range(0, 4, 2)):
        m = make("llama")
        assert [r.name for r in moeify(m, 4, 2, layers=layers)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    m = make("bert")
    assert [r.name for r in moeify(m, 4, 2, target=r"layer\.(1|3)$")] == ["encoder.layer.1", "encoder.layer.3"]
    m = make("gpt2")
    names = [r.name for r in moeify(m, 4, 2, target=lambda name, mod: name.endswith(".3.mlp"))]
    assert names == ["transformer.h.3.mlp"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        moeify(make("llama"), 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        moeify(make("llama"), 4, 0)
    with pytest.raises(ValueError, match="num_experts"):
        moeify(make("llama"), 0, 1)
    with pytest.raises(ValueError, match="init"):
        moeify(make("llama"), 4, 2, init="random")
    with pytest.raises(ValueError, match="expert_noise"):
        moeify(make("llama"), 4, 2, expert_noise=-1.0)
    with pytest.raises(ValueError, match="router_noise"):
        moeify(make("llama"), 4, 2, init="fresh", router_noise=0.1)
    with pytest.raises(ValueError, match="target"):
        moeify(make("llama"), 4, 2, target="no_such_module")
    with pytest.raises(ValueError, match="layers"):
        moeify(make("llama"), 4, 2, layers=lambda i: False)
    with pytest.raises(ValueError, match="layers"):
        moeify(make("llama"), 4, 2, layers=[7])
    with pytest.raises(ValueError, match="model"):
        moeify(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 4, 2)
    with pytest.raises(ValueError, match="activation"):
        moeify(make("llama"), 4, 2, activation="relu")
    # an activation MoELayer cannot express is refused, and nothing is converted
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)),
                          nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="activation.*Tanh"):
        moeify(model, 4, 2)
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    llama = _llama_like("LlamaForCausalLM", "LlamaConfig", hidden_act="gelu")
    with pytest.raises(ValueError, match="activation"):
        moeify(llama, 4, 2)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2,
                                                                activation_function="quick_gelu"))
    with pytest.raises(ValueError, match="activation.*QuickGELU"):
        moeify(gpt2, 4, 2)


def _lm_step_losses(model, steps=20, aux_coef=1e-2, lr=3e-3):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 16))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        total = loss + moe_aux_loss(model, aux_coef=aux_coef, z_coef=1e-3)
        opt.zero_grad()
        total.backward()
        opt.step()
    return losses


def test_converted_model_trains_and_router_leaves_zero():
    model = make("llama")
    moeify(model, 4, 2, router_noise=0.0)
    routers = [m.router.weight for m in model.modules() if isinstance(m, MoELayer)]
    assert all(torch.count_nonzero(w) == 0 for w in routers)
    losses = _lm_step_losses(model)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.count_nonzero(w) > 0 for w in routers)
    # the aux loss moves the router: experts 2 and 3 (never picked at the symmetric start) get
    # tokens in at least one layer ...
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert any((m.tokens_per_expert[2:] > 0).any() for m in layers)
    # ... but (documented caveat) exact copies with tied router rows stay clones in pairs
    assert all(torch.equal(m.gate_up_proj[0], m.gate_up_proj[1]) for m in layers)
    assert all(torch.equal(m.router.weight[0], m.router.weight[1]) for m in layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "seq_relu"])
def test_router_noise_keeps_equivalence(arch):
    model = make(arch)
    x = inputs(arch)
    with torch.no_grad():
        dense = run(model, arch, x)
    moeify(model, 8, 2, router_noise=0.5, seed=0)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert all(m.router.weight.abs().min() > 0 for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(run(model, arch, x), dense, rtol=1e-5, atol=1e-5)
    assert any((m.tokens_per_expert > 0).sum() > 2 for m in layers)  # tokens spread over experts


def test_router_noise_breaks_symmetry_in_training():
    model = make("llama")
    moeify(model, 4, 2, router_noise=0.1, seed=0)
    losses = _lm_step_losses(model)
    assert losses[-1] < 0.8 * losses[0], losses
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for m in layers:
        w = m.gate_up_proj
        assert all(not torch.equal(w[i], w[j]) for i in range(4) for j in range(i))


def test_router_gradient_sources():
    """Documented behaviour: with exact copies the task loss gives the zero router no gradient,
    the aux loss (or expert noise) does."""
    ids = torch.randint(0, V, (2, 8))
    model = make("llama")
    moeify(model, 4, 2, router_noise=0.0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [m.router.weight.grad for m in model.modules() if isinstance(m, MoELayer)]
    assert max(g.abs().max().item() for g in grads) < 1e-6
    model.zero_grad()
    model(input_ids=ids, labels=ids)
    moe_aux_loss(model, aux_coef=1.0, z_coef=0.0).backward()
    assert all(m.router.weight.grad.abs().max() > 0 for m in model.modules() if isinstance(m, MoELayer))
    noisy = make("llama")
    moeify(noisy, 4, 2, expert_noise=0.05, router_noise=0.0, seed=0)
    noisy.train()
    noisy(input_ids=ids, labels=ids).loss.backward()
    assert all(m.router.weight.grad.abs().max() > 0 for m in noisy.modules() if isinstance(m, MoELayer))


def test_collect_moe_losses():
    model = make("gpt2")
    moeify(model, 4, 2, layers={1, 3}, router_noise=0.0)
    with pytest.raises(RuntimeError, match="forward"):
        collect_moe_losses(model)
    model(**inputs("gpt2"))
    aux, z = collect_moe_losses(model)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 2
    torch.testing.assert_close(aux, sum(m.aux_loss for m in layers))
    torch.testing.assert_close(z, sum(m.z_loss for m in layers))
    torch.testing.assert_close(aux, torch.tensor(2.0))  # the symmetric start: k experts take it all, 1 each
    torch.testing.assert_close(moe_aux_loss(model, aux_coef=0.5, z_coef=2.0), 0.5 * aux + 2.0 * z)
    with pytest.raises(ValueError, match="model"):
        collect_moe_losses(make("llama"))


def test_no_grad_and_bf16_autocast():
    model = make("qwen2")
    x = inputs("qwen2")
    with torch.no_grad():
        dense = run(model, "qwen2", x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense_bf16 = run(model, "qwen2", x).float()
    moeify(model, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(run(model, "qwen2", x), dense, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            moe_bf16 = run(model, "qwen2", x).float()
    # bf16: the MoE model is as close to fp32 as the dense model in bf16 is (2x + a floor)
    dense_err = (dense_bf16 - dense).abs().max().item()
    assert (moe_bf16 - dense).abs().max().item() <= 2 * dense_err + 1e-2
    # a training step under autocast works
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**x, labels=x["input_ids"]).loss + moe_aux_loss(model)
    loss.backward()
    assert all(m.gate_up_proj.grad is not None for m in model.modules() if isinstance(m, MoELayer))


def test_bf16_model_upcycles_exactly():
    model = make("llama").to(torch.bfloat16)
    x = inputs("llama")
    with torch.no_grad():
        dense = run(model, "llama", x)
    moeify(model, 4, 2)
    assert all(m.gate_up_proj.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, MoELayer))
    with torch.no_grad():
        moe = run(model, "llama", x)
    torch.testing.assert_close(moe.float(), dense.float(), rtol=2e-2, atol=2e-2)


def test_torch_compile():
    model = make("seq_gelu")
    x = inputs("seq_gelu")["input"]
    with torch.no_grad():
        dense = model(x)
    moeify(model, 4, 2)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), dense, rtol=1e-5, atol=1e-5)
    model.train()
    out = compiled(x)
    loss = out.pow(2).mean() + moe_aux_loss(model)
    loss.backward()
    assert all(m.router.weight.grad is not None for m in model.modules() if isinstance(m, MoELayer))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_save_load_round_trip(arch, tmp_path):
    x = inputs(arch)
    model = make(arch)
    moeify(model, 4, 2, expert_noise=0.05, seed=0)
    _lm_step_losses(model, steps=2) if arch != "bert" else None  # leave the symmetric start
    model.eval()
    with torch.no_grad():
        want = run(model, arch, x)

    save_moe(model, tmp_path / "m.safetensors")
    other = make(arch)
    moeify(other, 4, 2, init="fresh", seed=1)
    other.eval()
    load_moe(other, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(run(other, arch, x), want)
    if arch == "gpt2":  # tied embeddings stay tied
        assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()

    torch.save(model.state_dict(), tmp_path / "m.pt")
    third = make(arch)
    moeify(third, 4, 2, init="fresh", seed=2)
    third.eval()
    third.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(run(third, arch, x), want)


def test_load_mismatch_errors(tmp_path):
    model = make("llama")
    moeify(model, 4, 2)
    path = tmp_path / "m.safetensors"
    save_moe(model, path)

    def check(other, pattern):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=pattern):
            load_moe(other, path)
        after = other.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded

    more = make("llama")
    moeify(more, 8, 2)
    check(more, r"model\.layers\.0\.mlp\.gate_up_proj'.*expected shape \(8, 64, 16\).*got shape \(4, 64, 16\)")
    wider = _llama_like("LlamaForCausalLM", "LlamaConfig", intermediate_size=2 * F)
    moeify(wider, 4, 2)
    check(wider, r"gate_up_proj'.*expected shape \(4, 128, 16\).*got shape \(4, 64, 16\)")
    half = make("llama")
    moeify(half, 4, 2)
    half.to(torch.bfloat16)
    check(half, r"expected shape .* dtype torch.bfloat16, got shape .* dtype torch.float32")
    k3 = make("llama")
    moeify(k3, 4, 3)
    check(k3, r"model\.layers\.0\.mlp.* top_k: expected 3 \(model\), got 2")
    partial = make("llama")
    moeify(partial, 4, 2, layers={0})
    check(partial, r"missing|unexpected")
    # plain load_state_dict refuses a differently shaped checkpoint too
    with pytest.raises(RuntimeError, match="router.weight"):
        more.load_state_dict(model.state_dict())
