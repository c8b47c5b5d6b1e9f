"""The cache of large CPU buffers (ops.buffer_cache_*): the kernels' outputs and intermediates
that come from reused blocks never carry a stale value, no result shares a block with a later
call's buffers, the profiler sees the cached allocations, and the cache keeps to its limit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsemoe import _C, ops
from helpers import CASES, STATS, build, run_layer

# Wide enough that the dispatched rows, hidden activations, expert outputs and weight gradients
# of a (4, 300) batch exceed _C.buffer_cache_min_bytes.
WIDE = dict(d=256, f=384)
SHAPE = (4, 300)
CACHE_CASES = ["preset_mixtral", "preset_gpt_oss", "preset_deepseek_v3", "capacity_factor", "expert_bias",
               "weights_on_input", "expert_choice_half"]


@contextlib.contextmanager
def cache_limit(nbytes: int):
    before = ops.buffer_cache_limit()
    ops.set_buffer_cache_limit(nbytes)
    try:
        yield
    finally:
        ops.set_buffer_cache_limit(before)


def wide_inputs(dtype, seed):
    torch.manual_seed(seed)
    return torch.randn(*SHAPE, WIDE["d"]).to(dtype), torch.randn(*SHAPE, WIDE["d"]).to(dtype)


def poison(*results):
    """NaN into every floating tensor of the results, before they are freed into the cache."""
    for r in results:
        tensors = r.values() if isinstance(r, dict) else r if isinstance(r, (tuple, list)) else [r]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CACHE_CASES)
def test_training_step_on_reused_blocks_is_bitwise_a_fresh_one(case, dtype):
    cfg, _ = CASES[case]
    layer = build(cfg, dtype, **WIDE)
    assert layer.gate_up_proj.numel() * layer.gate_up_proj.element_size() >= _C.buffer_cache_min_bytes
    x, g = wide_inputs(dtype, seed=2)
    with cache_limit(0):
        want_out, want_grads, want_stats = run_layer(layer, x, g)
    with cache_limit(1 << 30):
        ops.release_buffer_cache()
        # A step on other inputs fills the cache with its blocks, then NaN where its results were.
        other = run_layer(layer, *wide_inputs(dtype, seed=3))
        poison(*other)
        del other
        assert ops.buffer_cache_bytes() > 0
        got_out, got_grads, got_stats = run_layer(layer, x, g)
    assert torch.equal(got_out, want_out)
    for name, want in want_grads.items():
        assert (want is None) == (got_grads[name] is None), name
        assert want is None or torch.equal(got_grads[name], want), name
    for name in STATS:
        assert torch.equal(got_stats[name], want_stats[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_on_reused_blocks_is_bitwise_a_fresh_one(dtype):
    layer = build(CASES["preset_mixtral"][0], dtype, **WIDE).eval()
    x, _ = wide_inputs(dtype, seed=2)
    with torch.no_grad():
        with cache_limit(0):
            want = layer(x)
        with cache_limit(1 << 30):
            ops.release_buffer_cache()
            poison(layer(wide_inputs(dtype, seed=3)[0]))
            got = layer(x)
    assert torch.equal(got, want)


def op_args(T, dtype=torch.float32, seed=0, d=256, f=192, E=6, k=2):
    torch.manual_seed(seed)
    return dict(x=torch.randn(T, d, dtype=dtype), router_weight=torch.randn(E, d, dtype=dtype),
                router_bias=torch.randn(E, dtype=dtype), w1=torch.randn(E, 2 * f, d, dtype=dtype) / 16,
                w2=torch.randn(E, d, f, dtype=dtype) / 14, k=k)


def separate_ops(a):
    logits = F.linear(a["x"], a["router_weight"], a["router_bias"])
    weights, ids = ops.route(logits, a["k"])
    rows, offsets, slot = ops.dispatch(a["x"], ids, a["w1"].shape[0])
    return ops.combine(ops.expert_ffn(rows, offsets, a["w1"], a["w2"]), slot, weights), logits, ids, offsets, slot


def test_no_result_shares_a_block_with_a_later_call():
    # Growing, shrinking and repeated sizes and two dtypes: each result must stay what it was
    # while later calls reuse the cache's blocks, and equal the ops' results without the cache.
    calls = [op_args(T, dtype, seed) for seed, (T, dtype) in enumerate(
        ((2000, torch.float32), (300, torch.float32), (2000, torch.float32), (3000, torch.bfloat16),
         (2000, torch.float32)))]
    with cache_limit(0):
        want = [separate_ops(a) for a in calls]
    with cache_limit(1 << 30):
        ops.release_buffer_cache()
        got = [ops.moe_inference(**a) for a in calls]
        got_ops = [separate_ops(a) for a in calls]
    for g, g_ops, w in zip(got, got_ops, want):
        for a, b, c in zip(g, g_ops, w):
            assert torch.equal(a, c) and torch.equal(b, c)


def test_the_cache_reuses_blocks_and_keeps_to_its_limit():
    a = op_args(2000)
    with cache_limit(1 << 30):
        ops.release_buffer_cache()
        assert ops.buffer_cache_bytes() == 0
        ops.moe_inference(**a)
        held = ops.buffer_cache_bytes()
        # The dispatched rows alone: 4000 x 256 float32.
        assert held >= 4000 * 256 * 4
        for _ in range(3):
            ops.moe_inference(**a)
            assert ops.buffer_cache_bytes() == held  # the same blocks again, none added
        ops.set_buffer_cache_limit(2 << 20)
        assert ops.buffer_cache_bytes() <= 2 << 20
        ops.moe_inference(**a)
        assert ops.buffer_cache_bytes() <= 2 << 20
        ops.set_buffer_cache_limit(0)
        assert ops.buffer_cache_bytes() == 0
        ops.set_buffer_cache_limit(1 << 30)
        ops.moe_inference(**a)
        assert ops.buffer_cache_bytes() > 0
        ops.release_buffer_cache()
        assert ops.buffer_cache_bytes() == 0
        assert ops.buffer_cache_limit() == 1 << 30  # releasing keeps the limit
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="nbytes: expected an int >= 0"):
            ops.set_buffer_cache_limit(bad)


def test_the_profiler_sees_cached_allocations_and_frees():
    from torch.profiler import ProfilerActivity, profile
    a = op_args(2000)
    rows_bytes = 4000 * 256 * 4
    with cache_limit(1 << 30):
        ops.moe_inference(**a)  # the blocks are cached from here on
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ops.moe_inference(**a)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    # Blocks below 4 MiB are rounded up to 64 KiB; the events give the block's size.
    block = -(-rows_bytes // (64 << 10)) * (64 << 10)
    assert block in sizes and -block in sizes


def run_python(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_the_limit_comes_from_the_environment():
    code = "import sparsemoe; print(sparsemoe.ops.buffer_cache_limit())"
    default = run_python(code, SPARSEMOE_BUFFER_CACHE_MB="")
    assert default.returncode == 0, default.stderr
    assert int(default.stdout) == (0 if _C.sanitized else 1 << 30)
    seven = run_python(code, SPARSEMOE_BUFFER_CACHE_MB="7")
    assert int(seven.stdout) == 7 << 20
    bad = run_python(code, SPARSEMOE_BUFFER_CACHE_MB="lots")
    assert bad.returncode != 0
    assert "SPARSEMOE_BUFFER_CACHE_MB: expected a whole number of MiB >= 0, got 'lots'" in bad.stderr
