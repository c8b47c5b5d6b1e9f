"""Expert parallelism over torch.distributed, on gloo with W in {1, 2, 4} processes (one thread
each, loopback only), every collective and every test under a timeout so that a bug shows as a
failure, never a hang.

Each rank builds the same seeded full layer and global batch, runs the single-process layer on
the whole batch itself, and checks its own slice of the expert-parallel run against it: outputs,
input gradients, expert-shard gradients, and replicated gradients summed over the ranks.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import math
import os
import queue
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsemoe
from sparsemoe import MoEConfig, MoELayer
from sparsemoe import distributed as ep
from helpers import lowp_tolerance, needs_cuda

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
D, FF = 8, 6


# --- running a case on W ranks -------------------------------------------------------------------


def _entry(rank, world, store, case, args, results, backend):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        value = globals()[case](rank, world, *args)
        # As bytes: a tensor put on the queue as itself travels as a shared-memory handle, which
        # dies with this process if the parent has not opened it yet.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, case: str, *args, timeout: float = 150.0, backend: str = "gloo") -> list:
    """Runs the module function `case(rank, world, *args)` on `world` processes; returns the
    ranks' results, or fails with every failing rank's traceback (or on the timeout)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(r, world, os.path.join(tmp, "store"), case, args, results, backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        got: dict[int, tuple] = {}
        try:
            deadline = timeout
            while len(got) < world:
                try:
                    rank, status, value = results.get(timeout=deadline)
                except queue.Empty:
                    raise AssertionError(f"{case} on {world} ranks: no result after {timeout:.0f} s (ranks "
                                         f"{sorted(set(range(world)) - set(got))} hang)") from None
                got[rank] = (status, value)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(got.items()) if s != "ok"]
    assert not errors, f"{case} on {world} ranks failed:\n" + "\n".join(errors)
    return [torch.load(io.BytesIO(got[r][1]), weights_only=True) for r in range(world)]


# --- building the same layer on every rank ---------------------------------------------------------


def full_layer(config: MoEConfig, dtype, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 2.0 / math.sqrt(config.d_model))
        if layer.router.bias is not None:
            layer.router.bias.normal_(0.0, 0.5)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0.0, 0.1)
    return layer.to(dtype)


def sharded_copy(full: MoELayer, group=None, **changes) -> MoELayer:
    """The expert-parallel layer holding this rank's slice of `full`'s experts."""
    config = dataclasses.replace(full.config, expert_parallel_group=group or dist.group.WORLD, **changes)
    layer = MoELayer.from_config(config, dtype=full.gate_up_proj.dtype)
    layer.load_state_dict(ep.local_state_dict(layer, full.state_dict()))
    return layer


def global_batch(world, T, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * T, d, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(world * T, d, generator=g, dtype=torch.float64).to(dtype)
    return x, grad


def forward_backward(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    (out.double() * g.double()).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def close(got, want, dtype, what, plain=None, exact=None):
    if dtype == torch.bfloat16:
        lowp_tolerance(got, plain, exact)
        return
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def check_against_single_process(rank, world, config: MoEConfig, dtype, T: int | list[int], seed=0):
    """This rank's slice of an expert-parallel forward + backward against the single-process
    layer on the concatenated batch. T: tokens per rank (a list: each rank its own count)."""
    counts = T if isinstance(T, list) else [T] * world
    full = full_layer(config, dtype, seed)
    mine = sharded_copy(full)
    x, g = global_batch(1, sum(counts), config.d_model, dtype, seed + 1)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    ref_out, ref_dx, ref_grads = forward_backward(full, x, g)
    out, dx, grads = forward_backward(mine, x[lo:hi], g[lo:hi])
    exact = None
    if dtype == torch.bfloat16:  # the 2x rule: plain PyTorch's error in bf16 against float64
        exact_layer = full.double()
        exact = forward_backward(exact_layer, x.double(), g.double())
    for name, a, b, i in (("out", out, ref_out[lo:hi], 0), ("grad x", dx, ref_dx[lo:hi], 1)):
        close(a, b, dtype, name, plain=b, exact=None if exact is None else exact[i][lo:hi])
    shard = mine._ep
    for name, grad in grads.items():
        ref = ref_grads[name]
        if name in ep._EXPERT_PARAMS and shard is not None:
            ref = shard.local_slice(ref)
            ex = None if exact is None else shard.local_slice(exact[2][name])
        else:
            grad = grad.clone()
            dist.all_reduce(grad)  # each rank's tokens contribute to the replicated gradients
            ex = None if exact is None else exact[2][name]
        close(grad, ref, dtype, f"grad {name}", plain=ref, exact=ex)
    return mine.tokens_per_expert.tolist()


# --- the cases (run on every rank) ---------------------------------------------------------------

BASE = dict(d_model=D, d_ff=FF, num_experts=4, top_k=2)
OPTION_SETS = [
    dict(),
    dict(scoring="sigmoid", renormalize=False),
    dict(scoring="softmax_topk", router_bias=True),
    dict(activation="gelu", expert_bias=True),
    dict(activation="clamped_swiglu", swiglu_limit=0.8, expert_bias=True),
    dict(activation="relu", top_k=1),
    dict(weights_on_input=True, scoring="sigmoid", renormalize=False, top_k=1),
    dict(shared_expert_d_ff=5, shared_expert_gate=True),
    dict(num_experts=8, num_groups=4, topk_groups=2, top_k=3, scoring="sigmoid", selection_bias=True),
    dict(num_experts=8, top_k=8, routed_scaling_factor=2.5),  # k = E
]


def case_equivalence(rank, world, dtypes):
    for options in OPTION_SETS:
        for dtype in dtypes:
            check_against_single_process(rank, world, MoEConfig(**{**BASE, **options}), dtype, 6)


@pytest.mark.parametrize("world", [2, 4])
def test_equivalence_with_the_single_process_layer(world):
    run_ranks(world, "case_equivalence", (torch.float64, torch.float32) if world == 2 else (torch.float64,))


def test_equivalence_in_bfloat16():
    run_ranks(2, "case_equivalence", (torch.bfloat16,))


def case_uneven_and_empty(rank, world):
    config = MoEConfig(**BASE, router_bias=True)
    counts = {2: [[5, 9], [0, 7], [3, 0]], 4: [[0, 3, 7, 1], [2, 0, 0, 5]]}[world]
    for T in counts:
        for dtype in (torch.float64, torch.float32):
            check_against_single_process(rank, world, config, dtype, T)


def case_all_tokens_on_one_rank(rank, world):
    # A router bias makes every token pick experts 0 and 1, which rank 0 holds: the other ranks
    # receive no row, and their experts' gradients are exactly zero.
    config = MoEConfig(**{**BASE, "num_experts": 2 * world}, router_bias=True)  # two experts per rank
    full = full_layer(config, torch.float64)
    with torch.no_grad():
        full.router.weight.mul_(0.01)
        full.router.bias.copy_(torch.tensor([9.0, 8.0] + [-9.0] * (2 * world - 2)))
    mine = sharded_copy(full)
    x, g = global_batch(world, 5, D, torch.float64)
    out, dx, grads = forward_backward(mine, x[rank * 5:(rank + 1) * 5], g[rank * 5:(rank + 1) * 5])
    ref_out, _, ref_grads = forward_backward(full, x, g)
    close(out, ref_out[rank * 5:(rank + 1) * 5], torch.float64, "out")
    assert mine.tokens_per_expert.tolist() == [5, 5] + [0] * (2 * world - 2)
    for name in ("gate_up_proj", "down_proj"):
        if rank == 0:
            close(grads[name], ref_grads[name][:2], torch.float64, name)
        else:
            assert torch.count_nonzero(grads[name]) == 0, name


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_zero_and_empty_splits(world):
    run_ranks(world, "case_uneven_and_empty")
    run_ranks(world, "case_all_tokens_on_one_rank")


def case_capacity(rank, world):
    # Capacity per source rank: the single-process layer with capacity_scope="sequence" on the
    # batch viewed [W, T, d] (each rank's tokens are one sequence) computes the same.
    T = 6
    for options in (dict(expert_capacity=2), dict(capacity_factor=0.75, drop_policy="probability"),
                    dict(expert_capacity=0), dict(expert_capacity=2, weights_on_input=True, top_k=1)):
        config = MoEConfig(**{**BASE, **options})
        full = full_layer(dataclasses.replace(config, capacity_scope="sequence"), torch.float64)
        for pad in (False, True):
            mine = sharded_copy(full, capacity_scope="batch", pad_to_capacity=pad)
            x, g = global_batch(world, T, D, torch.float64)
            out, dx, grads = forward_backward(mine, x[rank * T:(rank + 1) * T], g[rank * T:(rank + 1) * T])
            ref_out, ref_dx, ref_grads = forward_backward(full, x.view(world, T, D), g.view(world, T, D))
            close(out, ref_out[rank], torch.float64, f"out {options} pad={pad}")
            close(dx, ref_dx[rank], torch.float64, f"grad x {options} pad={pad}")
            for name in ("gate_up_proj", "down_proj"):
                close(grads[name], mine._ep.local_slice(ref_grads[name]), torch.float64, f"{name} pad={pad}")
            assert mine.dropped_fraction.item() >= 0.0


def test_capacity_per_source_rank_and_pad_to_capacity():
    run_ranks(2, "case_capacity")


def case_rejected(rank, world):
    with pytest.raises(ValueError, match=r"^expert_parallel_group: num_experts=6 is not divisible by the group's 4 "
                                         r"ranks"):
        MoELayer(D, FF, 6, 2, expert_parallel_group=dist.group.WORLD)
    with pytest.raises(ValueError, match=r"^routing: expert_choice needs the whole batch"):
        MoELayer(D, FF, 4, 2, routing="expert_choice", expert_parallel_group=dist.group.WORLD)
    # Ranks that built different layers: a clear error on every rank, not garbage or a hang.
    with pytest.raises(ValueError, match=r"^expert_parallel_group: the ranks built different MoE layers: d_model is "
                                         r"8 on rank 0, 10 on rank 1, 8 on rank 2, 10 on rank 3"):
        MoELayer(D + 2 * (rank % 2), FF, 4, 2, expert_parallel_group=dist.group.WORLD)
    with pytest.raises(ValueError, match=r"num_experts is 4 on rank 0, 8 on rank 1"):
        MoELayer(D, FF, 4 * (1 + rank % 2), 2, expert_parallel_group=dist.group.WORLD)
    return "ok"


def test_bad_groups_are_rejected_on_every_rank():
    assert run_ranks(4, "case_rejected") == ["ok"] * 4


def case_repeatable(rank, world):
    config = MoEConfig(**BASE, shared_expert_d_ff=4, expert_bias=True)
    full = full_layer(config, torch.float32)
    x, g = global_batch(world, 7, D, torch.float32)
    if world == 1:
        # A group of one rank is the single-process path, bitwise.
        mine = sharded_copy(full)
        assert mine._ep is None
        for a, b in zip(forward_backward(mine, x, g)[:2], forward_backward(full, x, g)[:2]):
            assert torch.equal(a, b)
        return
    mine = sharded_copy(full)
    first = forward_backward(mine, x[rank * 7:(rank + 1) * 7], g[rank * 7:(rank + 1) * 7])
    again = forward_backward(mine, x[rank * 7:(rank + 1) * 7], g[rank * 7:(rank + 1) * 7])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert all(torch.equal(first[2][n], again[2][n]) for n in first[2])


@pytest.mark.parametrize("world", [1, 2])
def test_bitwise_repeatable(world):
    run_ranks(world, "case_repeatable")


def model_of(config: MoEConfig, dtype=torch.float64, seed=0) -> nn.Module:
    """A replicated linear, the MoE layer, a replicated head: both kinds of parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(config.d_model, config.d_model), MoELayer.from_config(config),
                          nn.Linear(config.d_model, 3))
    return model.to(dtype)


def case_checkpoint_save(rank, world, path):
    config = MoEConfig(**{**BASE, "num_experts": 8}, expert_bias=True, selection_bias=True, shared_expert_d_ff=4)
    full = model_of(config)
    mine = model_of(dataclasses.replace(config, expert_parallel_group=dist.group.WORLD))
    mine.load_state_dict(ep.local_state_dict(mine, full.state_dict()))
    sparsemoe.save_moe(mine, path)
    x, _ = global_batch(1, 9, D, torch.float64)
    with torch.no_grad():
        return full(x), full.state_dict()


def case_checkpoint_load(rank, world, path, want, want_state):
    config = MoEConfig(**{**BASE, "num_experts": 8}, expert_bias=True, selection_bias=True, shared_expert_d_ff=4,
                       expert_parallel_group=dist.group.WORLD)
    model = model_of(config, seed=5)  # other weights: the checkpoint must replace them all
    sparsemoe.load_moe(model, path)
    # The very weights that were saved at world size 2, gathered back from this world's shards.
    state = ep.full_state_dict(model)
    assert set(state) == set(want_state) and all(torch.equal(state[k], want_state[k]) for k in state)
    x, _ = global_batch(1, 9, D, torch.float64)
    with torch.no_grad():
        out = model(x)  # every rank runs the whole batch here
    if world == 1:
        assert torch.equal(out, want)
    else:  # an expert's GEMM now holds every rank's copy of the batch: rounding, not more
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # A per-rank shard file (model.state_dict() of a rank) is refused, naming the difference.
    from safetensors.torch import save_file
    if world > 1:
        shard_path = f"{path}.rank{rank}"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, shard_path)
        with pytest.raises(ValueError, match=r"tensor '1\.gate_up_proj': expected shape \(8, 12, 8\) dtype "
                                             r"torch\.float64 \(a checkpoint holds every expert; this rank shards"):
            sparsemoe.load_moe(model, shard_path)
    return "ok"


def test_checkpoints_move_between_world_sizes(tmp_path):
    path = str(tmp_path / "ep.safetensors")
    want, want_state = run_ranks(2, "case_checkpoint_save", path)[0]
    for world in (1, 4):
        assert run_ranks(world, "case_checkpoint_load", path, want, want_state) == ["ok"] * world


def train(model: nn.Module, batches, steps: int, world: int, rank: int) -> list[float]:
    """Adam on mean-per-rank losses with the global aux/z losses and selection-bias updates."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x, target = batches[step]
        per = x.shape[0] // world
        x, target = x[rank * per:(rank + 1) * per], target[rank * per:(rank + 1) * per]
        out = model(x)
        task = nn.functional.mse_loss(out, target)
        loss = task + ep.moe_aux_loss(model, aux_coef=0.1, z_coef=0.01)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ep.sync_gradients_(model)
        ep.clip_grad_norm_(model, 0.5)
        opt.step()
        ep.update_selection_bias(model, 1e-2)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses


def case_training(rank, world):
    config = MoEConfig(**BASE, scoring="sigmoid", selection_bias=True, shared_expert_d_ff=4)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, D, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
               for _ in range(20)]
    single = model_of(config)
    want = train(single, batches, 20, 1, 0)
    mine = model_of(dataclasses.replace(config, expert_parallel_group=dist.group.WORLD))
    got = train(mine, batches, 20, world, rank)
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), (step, a, b)
    # Replicated parameters stay bitwise identical on every rank.
    for name, p in ep.replicated_parameters(mine):
        every = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(every, p.detach())
        assert all(torch.equal(e, every[0]) for e in every), name
    sb = mine[1].router.selection_bias
    assert torch.equal(sb, single[1].router.selection_bias)
    # The expert shards are the single-process experts.
    for name, p in ep.expert_parameters(mine):
        torch.testing.assert_close(p, mine[1]._ep.local_slice(dict(single.named_parameters())[name]),
                                   rtol=1e-9, atol=1e-11)
    return got


def test_training_at_world_2_equals_world_1():
    losses = run_ranks(2, "case_training")
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]


def case_activation_checkpointing(rank, world):
    from torch.utils.checkpoint import checkpoint

    config = MoEConfig(**BASE, shared_expert_d_ff=4)
    full = full_layer(config, torch.float64)
    mine = sharded_copy(full)
    x, g = global_batch(world, 5, D, torch.float64)
    xs, gs = x[rank * 5:(rank + 1) * 5], g[rank * 5:(rank + 1) * 5]
    plain = forward_backward(mine, xs, gs)
    mine.zero_grad(set_to_none=True)
    xi = xs.clone().requires_grad_(True)
    (checkpoint(mine, xi, use_reentrant=False) * gs).sum().backward()
    assert torch.equal(xi.grad, plain[1])
    for n, p in mine.named_parameters():
        assert torch.equal(p.grad, plain[2][n]), n


def test_activation_checkpointing_under_expert_parallelism():
    run_ranks(2, "case_activation_checkpointing")


def case_ddp_and_statistics(rank, world):
    config = MoEConfig(**BASE, router_bias=True)
    x, target = global_batch(world, 6, D, torch.float64)
    target = target[:, :3]
    xs, ts = x[rank * 6:(rank + 1) * 6], target[rank * 6:(rank + 1) * 6]
    manual = model_of(dataclasses.replace(config, expert_parallel_group=dist.group.WORLD))
    ddp_base = model_of(dataclasses.replace(config, expert_parallel_group=dist.group.WORLD))
    ep.ddp_ignore_experts_(ddp_base)
    ddp = nn.parallel.DistributedDataParallel(ddp_base)
    for model in (manual, ddp):
        nn.functional.mse_loss(model(xs), ts).backward()
    ep.sync_gradients_(manual)
    ep.sync_gradients_(ddp_base, replicated=False)
    for (n, a), (_, b) in zip(manual.named_parameters(), ddp_base.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=n)
    # The single-process gradients of the mean loss over the concatenated batch.
    single = model_of(config)
    nn.functional.mse_loss(single(x), target).backward()
    for name, p in manual.named_parameters():
        ref = dict(single.named_parameters())[name].grad
        if name.endswith(ep._EXPERT_PARAMS):
            ref = manual[1]._ep.local_slice(ref)
        torch.testing.assert_close(p.grad, ref, rtol=1e-10, atol=1e-12, msg=name)
    norm = ep.clip_grad_norm_(manual, 1e-3)
    want = nn.utils.clip_grad_norm_(single.parameters(), 1e-3)
    torch.testing.assert_close(norm.double(), want.double(), rtol=1e-6, atol=1e-9)
    # Per-rank statistics by default; the global ones (one all-reduce) equal the single-process layer's.
    stats = ep.global_statistics(manual[1])
    assert torch.equal(stats["tokens_per_expert"], single[1].tokens_per_expert)
    for key in ("aux_loss", "z_loss", "dropped_fraction", "router_entropy"):
        torch.testing.assert_close(stats[key].double(), getattr(single[1], key).double(), rtol=1e-6, atol=1e-7)
    assert manual[1].tokens_per_expert.sum() == 6 * 2  # this rank's picks


def test_ddp_clip_and_global_statistics():
    run_ranks(2, "case_ddp_and_statistics")


def case_shard_experts(rank, world):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)).double()
    model = nn.Sequential(nn.Linear(D, D), dense).double()
    sparsemoe.moeify(model, 4, 2, seed=0, expert_noise=0.1)
    whole = [m for _, m in sparsemoe.moe_layers(model)][0]
    reference = MoELayer.from_config(whole.config, dtype=torch.float64)
    reference.load_state_dict(whole.state_dict())
    ep.shard_experts_(model, dist.group.WORLD)
    layer = [m for _, m in sparsemoe.moe_layers(model)][0]
    assert layer.gate_up_proj.shape[0] == 4 // world and layer._ep is not None
    x, g = global_batch(world, 5, D, torch.float64)
    xs = model[0](x[rank * 5:(rank + 1) * 5]).detach()
    got = layer(xs)
    with torch.no_grad():
        want = reference(model[0](x)).detach()[rank * 5:(rank + 1) * 5]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already sharded"):
        ep.shard_experts_(model, dist.group.WORLD)


def test_shard_experts_of_a_moeified_model():
    run_ranks(2, "case_shard_experts")


def case_readme_example(rank, world, folder):
    from pathlib import Path
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "train_ep.py" in b)
    setup = 'dist.init_process_group("gloo")  # "nccl" on GPUs'
    assert setup in block
    os.chdir(folder)  # where the example writes its checkpoint
    exec(block.replace(setup, "pass  # the harness made the process group"), {})
    return os.path.getsize("moe.safetensors")


def test_readme_example_trains_and_saves(tmp_path):
    sizes = run_ranks(2, "case_readme_example", str(tmp_path))
    assert sizes[0] > 0


def case_initialisation(rank, world):
    # The same seed gives the single-process layer's experts, this rank's slice of them.
    options = dict(BASE, num_experts=8, expert_bias=True, shared_expert_d_ff=4)
    torch.manual_seed(7)
    single = MoELayer(**options)
    torch.manual_seed(7)
    mine = MoELayer(**options, expert_parallel_group=dist.group.WORLD)
    for name, p in mine.named_parameters():
        want = dict(single.named_parameters())[name]
        assert torch.equal(p, mine._ep.local_slice(want) if name in ep._EXPERT_PARAMS else want), name


def test_initialisation_matches_the_single_process_layer():
    run_ranks(2, "case_initialisation")


def test_moeify_takes_no_group():
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))
    with pytest.raises(ValueError, match=r"^expert_parallel_group: moeify builds whole layers .* "
                                         r"sparsemoe\.distributed\.shard_experts_\(model, group\)"):
        sparsemoe.moeify(nn.Sequential(model), 4, 2, expert_parallel_group=object())


def case_nccl_one_gpu(rank, world):
    # NCCL with one process on one GPU: the layer takes the single-process path, bitwise.
    config = MoEConfig(**BASE, shared_expert_d_ff=4)
    full = full_layer(config, torch.float32).cuda()
    mine = sharded_copy(full).cuda()
    assert mine._ep is None
    x, g = (t.cuda() for t in global_batch(1, 9, D, torch.float32))
    for a, b in zip(forward_backward(mine, x, g)[:2], forward_backward(full, x, g)[:2]):
        assert torch.equal(a, b)


@needs_cuda
def test_nccl_on_one_gpu():
    run_ranks(1, "case_nccl_one_gpu", backend="nccl")
