"""Soak (opt-in: python -m pytest -m slow tests/test_soak.py): a small moeified Llama-style model
trains for 2,000 steps with capacity, jitter, a shared expert, the aux and z losses, gradient
clipping and a selection-bias update, checkpointing on the way. Resident memory must stay flat
after warm-up (no leak in the kernels, the autograd graphs the statistics hold, or the caches) and
every loss must stay finite. It prints the numbers it measured."""

from __future__ import annotations

import math
import os

import pytest
import torch
import transformers  # a test dependency: the README's test command installs it

import sparsemoe

STEPS, WARMUP = 2000, 200
MAX_GROWTH_MIB = 16  # after warm-up; a leak of one [T, d] buffer per step would be ~100 MiB


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_training_soak_memory_flat_and_losses_finite(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    sparsemoe.moeify(model, num_experts=8, top_k=2, expert_noise=0.05, seed=0, capacity_factor=1.25,
                     router_jitter=0.01, selection_bias=True, scoring="sigmoid", shared_expert_d_ff=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    layers = [m for _, m in sparsemoe.moe_layers(model)]
    gen = torch.Generator().manual_seed(1)
    rss, losses = {}, []
    for step in range(1, STEPS + 1):
        # Counting sequences from random starts: learnable (the next token is the last one + 1).
        ids = (torch.randint(0, 128, (4, 1), generator=gen) + torch.arange(32)) % 128
        loss = model(input_ids=ids, labels=ids).loss + sparsemoe.moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for layer in layers:
            layer.update_selection_bias(1e-3)
        losses.append(loss.item())
        if step % 500 == 0:
            sparsemoe.save_moe(model, tmp_path / "soak.safetensors")
            sparsemoe.load_moe(model, tmp_path / "soak.safetensors")
        if step in (WARMUP, STEPS // 2, STEPS):
            rss[step] = rss_mib()
    growth = rss[STEPS] - rss[WARMUP]
    print(f"\nsoak: {STEPS} steps, RSS {rss[WARMUP]:.1f} MiB at step {WARMUP}, {rss[STEPS // 2]:.1f} at "
          f"{STEPS // 2}, {rss[STEPS]:.1f} at {STEPS} (growth {growth:+.1f} MiB); loss {losses[0]:.3f} -> "
          f"{sum(losses[-100:]) / 100:.3f} (mean of the last 100), threads {torch.get_num_threads()}, pid {os.getpid()}")
    assert all(math.isfinite(v) for v in losses)
    assert growth < MAX_GROWTH_MIB, rss
    assert sum(losses[-100:]) / 100 < 0.5 * losses[0]  # it learned the sequences
