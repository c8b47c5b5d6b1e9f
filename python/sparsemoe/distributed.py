"""Expert parallelism (EP) over torch.distributed: the experts of each MoE layer are split
contiguously over the ranks of a process group (rank r holds experts [r*E/W, (r+1)*E/W)), the
router, the selection bias and the shared expert are replicated, and tokens travel to their
experts and back with all-to-alls. gloo (CPU) and NCCL (GPU) run the same code.

Data path of a layer (MoELayer.forward), per rank:
route (global ids) -> dispatch (rows grouped by destination rank, since experts are contiguous)
-> exchange the per-expert counts (an equal-split all-to-all of [W, E/W], started right after
dispatch, the shared expert computed while it is in flight) -> one device-to-host copy of the
split sizes, the only host synchronisation -> all-to-all of the rows (uneven and zero splits)
-> regroup the received rows by local expert (a second stable dispatch: expert-major, source
ranks in order) -> expert_ffn -> undo the regroup -> the reverse all-to-all -> combine.
With ``pad_to_capacity`` the rows travel as fixed [E, capacity] buffers instead: no count
exchange and no host synchronisation, so the shapes are static.

Training convention (the one DistributedDataParallel uses): each rank's loss is the mean over
its own batch, and the gradients of the whole run are those of the mean of the ranks' losses,
which is the single-process loss on the concatenated batch when the ranks' batches are equal.
:func:`sync_gradients_` makes the gradients that: replicated parameters averaged over the group,
expert shards scaled by 1/W (their backward already sums every rank's tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops

__all__ = ["ExpertShard", "clip_grad_norm_", "ddp_ignore_experts_", "expert_parameters", "global_statistics",
           "moe_aux_loss", "replicated_parameters", "shard_experts_", "sync_gradients_", "update_selection_bias"]

_EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


# --- the group and this rank's share of the experts ------------------------------------------------


@dataclass(frozen=True)
class ExpertShard:
    """Where one rank stands in a layer's expert-parallel group."""

    group: dist.ProcessGroup
    rank: int
    world: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.world

    @property
    def first(self) -> int:
        """The global index of this rank's first expert."""
        return self.rank * self.num_local

    @classmethod
    def of(cls, config) -> "ExpertShard | None":
        """The shard of `config`'s group, or None for no group or a group of one rank."""
        group = config.expert_parallel_group
        if group is None:
            return None
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(group, DeviceMesh):
            group = group.get_group()
        if group.size() == 1:
            return None
        return cls(group, dist.get_rank(group), group.size(), config.num_experts)

    def check_same_layer_on_every_rank(self, config) -> None:
        """One collective at construction: every rank must have built the same layer (else the
        all-to-alls would exchange garbage or hang). Raises ValueError on every rank, naming the
        first option that differs and its value on each rank."""
        mine = config.to_dict()
        mine["router_dtype"] = str(mine["router_dtype"])
        every: list = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        for key in mine:
            values = [d[key] for d in every]
            if any(v != values[0] for v in values):
                raise ValueError(f"expert_parallel_group: the ranks built different MoE layers: {key} is "
                                 f"{', '.join(f'{v!r} on rank {r}' for r, v in enumerate(values))}")

    def local_slice(self, t: Tensor) -> Tensor:
        """This rank's experts of a tensor over all experts (dim 0)."""
        return t[self.first:self.first + self.num_local]


# --- the all-to-all, with autograd ------------------------------------------------------------------


def _wire(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    # gloo moves bytes but not every dtype: a bfloat16 tensor travels as the float16 view of its
    # bits (the same size; nothing is computed on it in flight), then is viewed back.
    if t.dtype == torch.bfloat16 and dist.get_backend(group) == "gloo":
        return t.view(torch.float16)
    return t


def _all_to_all_rows(x: Tensor, out_splits: list[int] | None, in_splits: list[int] | None,
                     group: dist.ProcessGroup) -> Tensor:
    """rows [sum(in_splits), d] -> [sum(out_splits), d]; None splits are equal. Every rank
    enters, also with zero rows."""
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(_wire(out, group), _wire(x, group), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """The row all-to-all; its backward is the all-to-all with the splits swapped (the sizes are
    already on the host: no second synchronisation)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        with torch.profiler.record_function("sparsemoe::ep row all-to-all"):
            return _all_to_all_rows(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int] | None, in_splits: list[int] | None,
               group: dist.ProcessGroup) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks, differentiable: every rank's output depends on every rank's
    input, so the gradient of an input is the sum of the output gradients of all ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# --- the experts of one layer, across the group ---------------------------------------------------


def start_count_exchange(shard: ExpertShard, offsets: Tensor):
    """Sends each rank the counts of the rows this rank has for its experts; returns the receive
    buffer and the pending work (the caller overlaps the shared expert with it)."""
    counts = offsets.diff()
    received = torch.empty_like(counts)
    with torch.profiler.record_function("sparsemoe::ep count exchange"):
        work = dist.all_to_all_single(received, counts, group=shard.group, async_op=True)
    return received, work


def run_experts(shard: ExpertShard, send: Tensor, offsets: Tensor, exchange, w1: Tensor, w2: Tensor,
                experts: dict) -> Tensor:
    """The expert outputs [N, d] for dispatch's buffer `send` [N, d] (rows grouped by global
    expert, offsets [E+1]), computed by the ranks that hold the experts."""
    received, work = exchange
    W, E_l = shard.world, shard.num_local
    with torch.profiler.record_function("sparsemoe::ep count exchange"):
        work.wait()
        send_counts, recv_counts = offsets.diff().view(W, E_l), received.view(W, E_l)
        # The one host synchronisation of the layer: the split sizes of the row all-to-alls.
        sizes = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).cpu()
    send_sizes, recv_sizes = sizes[0].tolist(), sizes[1].tolist()
    kept, R = sum(send_sizes), sum(recv_sizes)
    with torch.profiler.record_function("sparsemoe::ep row all-to-all"):
        rows = all_to_all(send[:kept], recv_sizes, send_sizes, shard.group)
    with torch.profiler.record_function("sparsemoe::ep experts"):
        # Received rows are source-rank-major; a stable dispatch by local expert makes them
        # expert-major with the source ranks in order, offsets on the device.
        local = torch.arange(E_l, device=send.device).repeat(W)
        local_ids = torch.repeat_interleave(local, recv_counts.reshape(-1), output_size=R)
        x_local, off_local, slot_local = ops.dispatch(rows, local_ids.unsqueeze(1), E_l)
        y_rows = ops.combine(ops.expert_ffn(x_local, off_local, w1, w2, **experts), slot_local)
    with torch.profiler.record_function("sparsemoe::ep row all-to-all"):
        y = all_to_all(y_rows, send_sizes, recv_sizes, shard.group)
    if y.shape[0] < send.shape[0]:  # capacity padding rows: zero, as expert_ffn leaves them
        y = torch.cat([y, y.new_zeros(send.shape[0] - y.shape[0], y.shape[1])])
    return y


def padded_slots(ids: Tensor, slot: Tensor, offsets: Tensor, per_expert: int) -> Tensor:
    """Slots into a fixed [E * per_expert] buffer: expert e's i-th kept pick goes to row
    e * per_expert + i (dropped picks stay -1)."""
    kept = slot >= 0
    within = slot - offsets[ids]
    return torch.where(kept, ids * per_expert + within, torch.full_like(slot, -1))


def run_experts_padded(shard: ExpertShard, send: Tensor, per_expert: int, w1: Tensor, w2: Tensor,
                       experts: dict) -> Tensor:
    """The expert outputs for a fixed [E * per_expert, d] buffer: equal-split all-to-alls, static
    shapes, no host synchronisation. Padding rows are computed and never read."""
    W, E_l, d = shard.world, shard.num_local, send.shape[1]
    with torch.profiler.record_function("sparsemoe::ep row all-to-all"):
        rows = all_to_all(send, None, None, shard.group)  # [W sources, E_l, per_expert, d]
    with torch.profiler.record_function("sparsemoe::ep experts"):
        x_local = rows.view(W, E_l, per_expert, d).transpose(0, 1).reshape(E_l * W * per_expert, d)
        offsets = torch.arange(E_l + 1, device=send.device) * (W * per_expert)
        y = ops.expert_ffn(x_local, offsets, w1, w2, **experts)
        y = y.view(E_l, W, per_expert, d).transpose(0, 1).reshape(W * E_l * per_expert, d)
    with torch.profiler.record_function("sparsemoe::ep row all-to-all"):
        return all_to_all(y, None, None, shard.group)


# --- building and sharding models ---------------------------------------------------------------


def _layers(model: nn.Module):
    from .layer import moe_layers

    return moe_layers(model)


def shard_experts_(model: nn.Module, group) -> nn.Module:
    """Shards every MoELayer of an already built model (moeify, Hugging Face conversion) over
    `group` in place: each rank keeps its slice of the expert weights. Every rank must hold the
    same model (build it with the same seed or load the same weights). Returns the model."""
    for _, layer in _layers(model):
        if layer._ep is not None:
            raise ValueError("model: its MoE layers are already sharded")
        config = dataclasses.replace(layer.config, expert_parallel_group=group)
        shard = ExpertShard.of(config)
        layer.config, layer._ep = config, shard
        if shard is None:
            continue
        shard.check_same_layer_on_every_rank(config)
        for name in _EXPERT_PARAMS:
            p = getattr(layer, name)
            if p is not None:
                setattr(layer, name, nn.Parameter(shard.local_slice(p.detach()).clone(), p.requires_grad))
    return model


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the expert shards of the model's expert-parallel layers."""
    out = []
    for name, layer in _layers(model):
        if layer._ep is not None:
            out += [(f"{name}.{p}" if name else p, getattr(layer, p)) for p in _EXPERT_PARAMS
                    if getattr(layer, p) is not None]
    return out


def replicated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every other parameter: identical on every rank, trained on every rank's tokens."""
    sharded = {id(p) for _, p in expert_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in sharded]


def _group_of(model: nn.Module, group=None) -> dist.ProcessGroup | None:
    if group is not None:
        from torch.distributed.device_mesh import DeviceMesh

        return group.get_group() if isinstance(group, DeviceMesh) else group
    shards = {id(layer._ep.group): layer._ep.group for _, layer in _layers(model) if layer._ep is not None}
    if len(shards) > 1:
        raise ValueError("model: its MoE layers use different expert-parallel groups; pass group=")
    return next(iter(shards.values()), None)


def ddp_ignore_experts_(model: nn.Module) -> nn.Module:
    """Before wrapping the model in DistributedDataParallel: keep the expert shards out of DDP's
    broadcast and gradient all-reduce (each rank holds other experts). After each backward call
    ``sync_gradients_(model, replicated=False)`` to scale the expert gradients."""
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, _ in expert_parameters(model)])
    return model


@torch.no_grad()
def sync_gradients_(model: nn.Module, group=None, replicated: bool = True) -> None:
    """After backward: the gradients of the mean of the ranks' losses. Replicated parameters'
    gradients are averaged over the group (one all-reduce; leave it to DDP with
    ``replicated=False``), expert shards' gradients are divided by the world size."""
    group = _group_of(model, group)
    if group is None:
        return
    world = group.size()
    for _, p in expert_parameters(model):
        if p.grad is not None:
            p.grad.div_(world)
    if not replicated:
        return
    params = [p for _, p in replicated_parameters(model) if p.requires_grad]
    # Every rank must send the same sizes: a parameter with a gradient on some rank gets a zero
    # one on the others; one no rank's loss reached keeps None (the optimizer skips it, as it
    # would in a single process).
    device = params[0].device if params else torch.device("cpu")
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present, group=group)
    params = [p for p, n in zip(params, present.tolist()) if n > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        start = 0
        for g in grads:
            g.copy_(flat[start:start + g.numel()].view_as(g))
            start += g.numel()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group=None) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) over the whole expert-parallel model: the
    replicated gradients (identical on every rank after sync_gradients_) counted once, the
    expert shards' summed over the ranks (one all-reduce). Returns the total norm."""
    group = _group_of(model, group)
    rep = [p.grad for _, p in replicated_parameters(model) if p.grad is not None]
    exp = [p.grad for _, p in expert_parameters(model) if p.grad is not None]
    device = (rep + exp)[0].device if rep or exp else torch.device("cpu")
    sq = lambda gs: torch.stack([g.double().square().sum() for g in gs]).sum() if gs else \
        torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = sq(exp)
    if group is not None:
        dist.all_reduce(expert_sq, group=group)
    total = (sq(rep) + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in rep + exp:
        g.mul_(coef.to(g.dtype))
    return total.float()


@torch.no_grad()
def update_selection_bias(model: nn.Module, rate: float = 1e-3, group=None) -> None:
    """MoELayer.update_selection_bias for every layer with a selection bias, from the expert
    load of the whole group (one all-reduce for all layers), so the replicated biases stay
    identical on every rank."""
    layers = [layer for _, layer in _layers(model) if layer.router.selection_bias is not None]
    if not layers:
        return
    if any(layer.tokens_per_expert is None for layer in layers):
        raise RuntimeError("update_selection_bias: run a forward first (the step uses its expert load)")
    counts = torch.cat([layer.tokens_per_expert for layer in layers])
    group = _group_of(model, group)
    if group is not None:
        dist.all_reduce(counts, group=group)
    for layer, load in zip(layers, counts.split([layer.num_experts for layer in layers])):
        layer.router.update_selection_bias(load, rate)


# --- statistics and losses over the whole group ---------------------------------------------------


def _global_sums(layers, group) -> list[dict[str, Tensor]]:
    """Per layer, the sums over every rank's tokens that the global statistics need, from one
    all-reduce for all layers; differentiable in the probabilities and the z terms."""
    from .losses import router_probs

    parts, sizes = [], []
    for layer in layers:
        logits, ids, offsets, slot, mask = layer._routing
        probs = router_probs(logits, layer.config.scoring).double()
        real = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device) if mask is None \
            else mask.reshape(-1).double()
        E, k = layer.num_experts, ids.shape[1]
        picks = torch.zeros(E, dtype=torch.float64, device=logits.device)
        picks.index_add_(0, ids.reshape(-1), real.repeat_interleave(k))
        lse = torch.logsumexp(logits.double(), -1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).detach()
        part = torch.cat([picks, (probs * real[:, None]).sum(0), offsets.diff().double(),
                          torch.stack([real.sum(), (lse.square() * real).sum(), (entropy * real).sum(),
                                       torch.tensor(float(slot.numel()), dtype=torch.float64,
                                                    device=logits.device)])])
        parts.append(part)
        sizes.append((E, k))
    total = torch.cat(parts)
    if group is not None:
        total = _AllReduceSum.apply(total, group)
    out, start = [], 0
    for (E, k), part in zip(sizes, parts):
        t = total[start:start + part.numel()]
        start += part.numel()
        picks, prob_sum, kept, rest = t[:E], t[E:2 * E], t[2 * E:3 * E], t[3 * E:]
        out.append(dict(picks=picks, prob_sum=prob_sum, kept=kept, real=rest[0], z_sum=rest[1], entropy_sum=rest[2],
                        slots=rest[3], E=E, k=k))
    return out


def global_statistics(layer: nn.Module, group=None) -> dict[str, Tensor]:
    """The last forward's statistics over the tokens of every rank of the group (one
    all-reduce): ``tokens_per_expert``, ``dropped_fraction``, ``router_entropy`` and the
    differentiable ``aux_loss`` and ``z_loss`` of the concatenated batch (token choice)."""
    if layer._routing is None:
        raise RuntimeError("global_statistics: run a forward first")
    (s,) = _global_sums([layer], _group_of(layer, group))
    return _statistics_from_sums(s)


def _statistics_from_sums(s: dict) -> dict[str, Tensor]:
    tokens = s["real"].clamp_min(1)
    f = s["picks"] / (tokens * s["k"])
    p = s["prob_sum"] / tokens
    return {"aux_loss": (s["E"] * torch.dot(f, p)).float(), "z_loss": (s["z_sum"] / tokens).float(),
            "tokens_per_expert": s["kept"].detach().round().long(),
            "dropped_fraction": (1 - s["kept"].sum() / s["slots"].clamp_min(1)).detach().float(),
            "router_entropy": (s["entropy_sum"] / tokens).detach().float()}


def moe_aux_loss(model: nn.Module, aux_coef: float = 1e-2, z_coef: float = 1e-3, group=None) -> Tensor:
    """sparsemoe.moe_aux_loss with each layer's aux and z losses over the whole group's tokens
    (one all-reduce for all layers): every rank gets the single-process value on the
    concatenated batch, and sync_gradients_ turns its gradients into the single-process ones."""
    layers = [layer for _, layer in _layers(model) if layer._routing is not None]
    if not layers:
        raise RuntimeError("moe_aux_loss: no MoELayer has run a forward yet")
    stats = [_statistics_from_sums(s) for s in _global_sums(layers, _group_of(model, group))]
    aux = torch.stack([s["aux_loss"] for s in stats]).sum()
    z = torch.stack([s["z_loss"] for s in stats]).sum()
    return aux_coef * aux + z_coef * z


# --- checkpoints in the single-process layout ---------------------------------------------------


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() with every expert shard gathered into all of its layer's experts (a
    collective: every rank must call it)."""
    state = model.state_dict()
    for name, layer in _layers(model):
        if layer._ep is None:
            continue
        shard = layer._ep
        for p in _EXPERT_PARAMS:
            key = f"{name}.{p}" if name else p
            if key in state:
                parts = [torch.empty_like(state[key]) for _ in range(shard.world)]
                dist.all_gather(parts, state[key].contiguous(), group=shard.group)
                state[key] = torch.cat(parts)
    return state


def full_shapes(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The shape and dtype of each tensor of full_state_dict(model), without gathering anything."""
    state = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    for name, layer in _layers(model):
        if layer._ep is not None:
            for p in _EXPERT_PARAMS:
                key = f"{name}.{p}" if name else p
                if key in state:
                    shape, dtype = state[key]
                    state[key] = (torch.Size([shape[0] * layer._ep.world, *shape[1:]]), dtype)
    return state


def local_state_dict(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict in the single-process layout cut down to this rank's experts."""
    local = dict(full)
    for name, layer in _layers(model):
        if layer._ep is not None:
            for p in _EXPERT_PARAMS:
                key = f"{name}.{p}" if name else p
                if key in local:
                    local[key] = layer._ep.local_slice(local[key])
    return local


def is_writer(model: nn.Module) -> bool:
    """Whether this rank writes the model's checkpoint files (rank 0 of the expert-parallel group)."""
    group = _group_of(model)
    return group is None or dist.get_rank(group) == 0


def barrier(model: nn.Module) -> None:
    group = _group_of(model)
    if group is not None:
        dist.barrier(group=group)
