"""The CPU cache of expert weights packed for the GEMM micro-kernel (ops.pack_expert_weights),
shared by MoELayer and the Hugging Face experts backend.

The cache is keyed on the source parameters' version counters and storages (a weak reference
to each storage pins its identity, so a new storage is never mistaken for the old one, even at
the same address): an in-place change, an optimizer step, load_state_dict, .to(...) or a new
.data all repack at the next forward. A write through ``.data`` bypasses the version counter;
``clear()`` after one.

Packing pays when the panels are reused (the weights unchanged since the last forward: inference,
decoding) or when the experts run in bfloat16 / float16 on enough rows: bf16 panels in VNNI pairs
beat oneDNN's bf16 GEMMs (which re-pack the weights every call) where the CPU has AVX512-BF16 or
AMX, and widened panels beat ATen's emulated ones where it has no native bf16 GEMM. A training
step (grad enabled), whose weights change every step, would spend more on repacking than the
panels save in float32, or in bf16 with fewer than PACK_MIN_ROWS rows per expert on average,
and runs unpacked. Where the unpacked bf16 forward multiplies the weights in place on the native
micro-kernel (ops.native_forward_runs), a training step packs only above
_C.native_forward_max_rows rows per expert on average: up to there the in-place blocks need no
packing and are as fast as the panels. Where the CPU has AMX, oneDNN's bf16 GEMMs run on its tiles and
beat panels packed every step at any row count, so a bf16 training step never packs there; they
also beat the reused panels of an inference forward from AMX_UNPACKED_MIN_ROWS rows per expert on
average, which then runs unpacked (the panels stay cached for smaller batches).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch.multiprocessing.reductions import StorageWeakRef

from . import _C, ops

# Rows per expert (on average) from which a bf16 / fp16 training step packs the expert weights:
# packing touches every weight once, as a forward on that many rows per expert roughly does.
PACK_MIN_ROWS = 16
# Rows per expert (on average) from which a bf16 forward on AMX runs unpacked even with panels
# cached: measured, oneDNN's GEMMs there tie with the panels at 512 rows on fine-grained experts
# and beat them by 10-20% on coarse ones (d=512, f=1792) and from 1024 rows.
AMX_UNPACKED_MIN_ROWS = 512


# Off, an AMX CPU packs as the others do (benchmarks/bench_packing.py times the rule against that).
_amx_rule = True


def _on_amx(dtype: torch.dtype) -> bool:
    return _amx_rule and dtype == torch.bfloat16 and ops.bf16_gemm_hardware() == "AMX"


def _training_pack_min_rows(dtype: torch.dtype) -> float:
    """Rows per expert on average from which a training step packs `dtype` expert weights."""
    if dtype == torch.float32 or _on_amx(dtype):
        return float("inf")
    if ops.native_forward_runs(dtype):
        return _C.native_forward_max_rows + 1
    return PACK_MIN_ROWS


class PackedWeights:
    """One experts module's packed weights, rebuilt when their source parameters change."""

    def __init__(self) -> None:
        self.key: tuple | None = None  # (dtype, (version, storage, data_ptr, shape, stride) per source)
        self.tensor: Tensor | None = None
        self._storages: list[StorageWeakRef] = []  # keep the keyed storages' identities unique

    def get(self, sources: tuple[Tensor, ...], w1: Tensor, w2: Tensor, activation: str,
            gate_up_interleaved: bool, rows: int, always: bool = False) -> Tensor | None:
        """The panels of w1 and w2 (computed from the parameters `sources`), or None to run on w1
        and w2 themselves; `rows` is the number of rows the experts will see. `always` packs in
        training steps too (a batch-invariant layer's experts run on the panels only)."""
        if (w1.device.type != "cpu" or w1.dtype == torch.float64 or torch.compiler.is_compiling()
                or not ops.packed_kernels_available(w1.dtype)):
            self.clear()
            return None
        key = (w1.dtype, *((p._version, p.untyped_storage()._cdata, p.data_ptr(), tuple(p.shape), p.stride())
                           for p in sources))
        if not always and _on_amx(w1.dtype) and rows >= AMX_UNPACKED_MIN_ROWS * w1.shape[0]:
            return None  # oneDNN's AMX GEMMs win at this size; keep any panels for smaller batches
        if self.tensor is not None and self.key == key:
            return self.tensor
        if not always and torch.is_grad_enabled() and any(p.requires_grad for p in sources) and (
                rows < _training_pack_min_rows(w1.dtype) * w1.shape[0]):
            self.clear()  # stale panels: free them
            return None
        # Repack into the stale panels' buffer when the dtype and shapes still match (no allocation).
        stale = self.tensor if self.key is not None and self.key[0] == key[0] and all(
            a[3] == b[3] for a, b in zip(self.key[1:], key[1:])) else None
        self.clear()
        self.tensor = ops.pack_expert_weights(w1, w2, activation, gate_up_interleaved, out=stale)
        self.key = key
        self._storages = [StorageWeakRef(p.untyped_storage()) for p in sources]
        return self.tensor

    # A copy or a pickle of the module starts with an empty cache: the panels are derived data.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def clear(self) -> None:
        self.key, self.tensor, self._storages = None, None, []

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.nbytes
