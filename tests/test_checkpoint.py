"""save_moe / load_moe: every MoEConfig field is in the checkpoint, and a checkpoint whose layer
differs in any one of them is refused, naming the option (the cases are generated from the
dataclass, so a new field is covered without touching this file); files written before an option
existed load with its default; broken metadata gives a clear error, and nothing is loaded."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparsemoe import MoEConfig, MoELayer, load_moe, save_moe
from sparsemoe.checkpoint import ALIAS_KEY, META_KEY
from sparsemoe.config import _CHOICES, OPTION_NAMES
from helpers import D, FF

# Two starting points, so that every field has a valid other value from one of them (expert
# choice rules out groups and a selection bias; the groups need token choice).
BASES = (
    MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, num_groups=2, topk_groups=2, shared_expert_d_ff=4),
    MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, capacity_factor=1.0, expert_capacity=3),
)


def other_values(field: dataclasses.Field, value):
    """Candidate values other than `value` for a field, from its type."""
    kind = field.type
    if field.name in _CHOICES:
        return [c for c in _CHOICES[field.name] if c != value]
    if kind == "bool":
        return [not value]
    if kind == "torch.dtype | None":
        return [d for d in (torch.float64, torch.float32, None) if d != value]
    if kind.startswith("int"):
        return [v for v in (value + 1 if value is not None else 2, 1, 2, 3, 4, 8, None) if v != value]
    if kind.startswith("float"):
        return [v for v in ((value or 0) + 0.5, 0.25, 1.5, None) if v != value]
    raise AssertionError(f"no candidate values for MoEConfig.{field.name} of type {kind}: teach this test")


def variant(name: str) -> tuple[MoEConfig, MoEConfig]:
    """(a config, the same with `name` changed), both valid."""
    field = next(f for f in dataclasses.fields(MoEConfig) if f.name == name)
    for base in BASES:
        for value in other_values(field, getattr(base, name)):
            try:
                return base, dataclasses.replace(base, **{name: value})
            except (TypeError, ValueError):
                continue
    raise AssertionError(f"no valid other value found for MoEConfig.{name}")


def model_of(config: MoEConfig) -> nn.Module:
    return nn.Sequential(nn.Linear(D, D), MoELayer.from_config(config))


def assert_refused(model: nn.Module, path, pattern: str):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        load_moe(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_load_refuses_a_checkpoint_that_differs_in_any_option(name, tmp_path):
    saved, other = variant(name)
    path = tmp_path / "m.safetensors"
    save_moe(model_of(saved), path)
    mine, theirs = other.to_dict()[name], saved.to_dict()[name]
    assert_refused(model_of(other), path,
                   re.escape(f"MoE layer '1' option {name}: expected {mine!r} (model), got {theirs!r} (checkpoint)"))
    load_moe(model_of(saved), path)  # the same settings load


def test_metadata_holds_every_field(tmp_path):
    from safetensors import safe_open

    config = BASES[0]
    save_moe(model_of(config), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    assert meta == {"1": config.to_dict()}


def write(path, model: nn.Module, meta: dict):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def test_older_checkpoints_with_fewer_options_load(tmp_path):
    # The options an older sparsemoe wrote; the rest take their defaults.
    config = MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2)
    old = {k: config.to_dict()[k] for k in ("d_model", "d_ff", "num_experts", "top_k", "activation", "renormalize",
                                              "scoring", "routing", "num_groups", "topk_groups")}
    source = model_of(config)
    write(tmp_path / "old.safetensors", source, {META_KEY: json.dumps({"1": old})})
    target = model_of(config)
    load_moe(target, tmp_path / "old.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    # A layer with a non-default option the old file could not record is refused.
    clamped = model_of(dataclasses.replace(config, activation="clamped_swiglu", swiglu_limit=0.6))
    write(tmp_path / "old2.safetensors", clamped, {META_KEY: json.dumps({"1": {**old, "activation": "clamped_swiglu"}})})
    assert_refused(clamped, tmp_path / "old2.safetensors", r"option swiglu_limit: expected 0\.6 \(model\), got 7\.0")


@pytest.mark.parametrize("meta,pattern", [
    ({META_KEY: "{not json"}, rf"metadata '{META_KEY}' is not valid JSON"),
    ({META_KEY: "[1, 2]"}, rf"metadata '{META_KEY}': expected a JSON object, got list"),
    ({META_KEY: json.dumps({"1": {"d_model": D}})}, r"MoE layer '1' has an invalid configuration: config: missing "
                                                    r"required option\(s\)"),
    ({META_KEY: json.dumps({"1": {"d_model": D, "d_ff": FF, "num_experts": 4, "top_k": 9}})},
     r"MoE layer '1' has an invalid configuration: top_k: expected an int in \[1, num_experts=4\], got 9"),
    ({META_KEY: json.dumps({"1": {"d_model": D, "d_ff": FF, "num_experts": 4, "top_k": 2, "top_p": 1}})},
     r"unknown MoEConfig option\(s\) \['top_p'\]"),
    ({ALIAS_KEY: json.dumps({"0.bias": "nowhere"})}, r"'0\.bias' shares the tensor of 'nowhere', which the file "
                                                     r"does not hold"),
    ({ALIAS_KEY: "7"}, rf"metadata '{ALIAS_KEY}': expected a JSON object, got int"),
])
def test_broken_metadata_is_a_clear_error(meta, pattern, tmp_path):
    model = model_of(MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2))
    write(tmp_path / "m.safetensors", model, meta)
    assert_refused(model, tmp_path / "m.safetensors", pattern)


def test_types_of_the_fields_are_covered():
    # other_values knows every annotation the dataclass uses (a new kind of field fails here first).
    for field in dataclasses.fields(MoEConfig):
        if field.name in OPTION_NAMES:
            assert other_values(field, getattr(BASES[0], field.name)), field.name
    assert typing.get_type_hints(MoEConfig)  # the annotations resolve
