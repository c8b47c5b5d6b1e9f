"""MoEConfig: the one list of layer options. The layer builds and exposes it, it round-trips
through JSON, refuses unknown options, fills options missing from older files with defaults,
and its presets set exactly what the README's model table says."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from sparsemoe import MoEConfig, MoELayer
from sparsemoe.config import OPTION_NAMES
from helpers import CASES, D, FF

README = Path(__file__).resolve().parent.parent / "README.md"
EVERY_OPTION = MoEConfig(d_model=D, d_ff=FF, num_experts=8, top_k=3, scoring="sigmoid", renormalize=False,
                         routed_scaling_factor=2.5, router_bias=True, router_dtype=torch.float64, router_jitter=0.1,
                         selection_bias=True, num_groups=4, topk_groups=2, capacity_factor=1.25, expert_capacity=3,
                         drop_policy="probability", capacity_scope="sequence", activation="clamped_swiglu",
                         expert_bias=True, swiglu_alpha=1.5, swiglu_limit=0.75, weights_on_input=True,
                         shared_expert_d_ff=10, shared_expert_gate=True)


# Expert choice rules out the selection bias, groups and weights on the input.
EXPERT_CHOICE = dataclasses.replace(EVERY_OPTION, routing="expert_choice", selection_bias=False, num_groups=1,
                                    topk_groups=1, weights_on_input=False)


def test_every_field_is_set_in_the_every_option_configs():
    # Between them they differ from the defaults everywhere, so the tests below cover every field.
    assert set(EVERY_OPTION.non_defaults()) | set(EXPERT_CHOICE.non_defaults()) == set(OPTION_NAMES)


def test_layer_keyword_construction_builds_the_config():
    positional = ("d_model", "d_ff", "num_experts", "top_k", "activation", "renormalize")
    layer = MoELayer(D, FF, 8, 3, "clamped_swiglu", False,
                     **{f.name: getattr(EVERY_OPTION, f.name) for f in dataclasses.fields(MoEConfig)
                        if f.name not in positional})
    assert layer.config == EVERY_OPTION
    for name in OPTION_NAMES:
        if name != "shared_expert_gate":  # that name is the gate's nn.Linear on the layer
            assert getattr(layer, name) == getattr(EVERY_OPTION, name), name
    assert isinstance(layer.shared_expert_gate, torch.nn.Linear)
    with pytest.raises(AttributeError):
        layer.top_k = 2  # the options are read-only: build a new layer (or replace the config)


def test_from_config_equals_keyword_construction():
    for config, _ in CASES.values():
        layer = MoELayer.from_config(config, dtype=torch.float64)
        assert layer.config == config
        assert layer.gate_up_proj.dtype == torch.float64
        keyword = MoELayer(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        assert {k: v.shape for k, v in keyword.state_dict().items()} == \
            {k: v.shape for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"^config: expected a sparsemoe\.MoEConfig, got dict"):
        MoELayer.from_config({"d_model": 4})


def test_signature_lists_every_option():
    params = inspect.signature(MoELayer).parameters
    assert set(OPTION_NAMES) <= set(params)
    assert params["capacity_factor"].default is None and params["top_k"].default is inspect.Parameter.empty


def test_unknown_layer_option_is_refused():
    with pytest.raises(ValueError, match=r"^MoELayer: unknown MoEConfig option\(s\) \['capacity'\]"):
        MoELayer(D, FF, 4, 2, capacity=3)


def test_to_dict_from_dict_round_trip_through_json():
    for config in [EVERY_OPTION, EXPERT_CHOICE, *(c for c, _ in CASES.values())]:
        text = json.dumps(config.to_dict())
        assert MoEConfig.from_dict(json.loads(text)) == config
    assert EVERY_OPTION.to_dict()["router_dtype"] == "float64"


def test_from_dict_refuses_unknown_keys_and_fills_missing_options():
    data = EVERY_OPTION.to_dict()
    with pytest.raises(ValueError, match=r"^config: unknown MoEConfig option\(s\) \['top_p'\]"):
        MoEConfig.from_dict({**data, "top_p": 0.9})
    # A file written before some options existed: they take their defaults.
    old = {k: data[k] for k in ("d_model", "d_ff", "num_experts", "top_k", "scoring")}
    assert MoEConfig.from_dict(old) == MoEConfig(**old)
    with pytest.raises(ValueError, match=r"^config: missing required option\(s\) \['top_k'\]"):
        MoEConfig.from_dict({k: data[k] for k in ("d_model", "d_ff", "num_experts")})
    with pytest.raises(ValueError, match=r"^router_dtype: expected None or one of .*got 'float8'"):
        MoEConfig.from_dict({**old, "router_dtype": "float8"})
    with pytest.raises(ValueError, match=r"^config: expected a dict of MoEConfig options, got list"):
        MoEConfig.from_dict([1, 2])


def test_config_is_frozen_and_replace_validates():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EVERY_OPTION.top_k = 1
    assert dataclasses.replace(EVERY_OPTION, top_k=4).top_k == 4
    with pytest.raises(ValueError, match=r"^top_k\b"):
        dataclasses.replace(EVERY_OPTION, top_k=9)


def test_extra_repr_shows_only_what_differs_from_the_defaults():
    assert MoELayer(D, FF, 4, 2).extra_repr() == f"d_model={D}, d_ff={FF}, num_experts=4, top_k=2"
    text = MoELayer(D, FF, 4, 2, capacity_factor=1.5, router_dtype=torch.float32).extra_repr()
    assert text.endswith("router_dtype=torch.float32, capacity_factor=1.5")
    assert "scoring" not in text and "drop_policy" not in text


@pytest.mark.parametrize("tokens,expected", [(0, 0), (10, 5), (3, 2), (1, 1)])
def test_capacity_is_ceil_and_never_more_than_the_group(tokens, expected):
    config = MoEConfig(d_model=D, d_ff=FF, num_experts=4, top_k=2, capacity_factor=1.0)
    assert config.capacity(tokens) == expected  # ceil(tokens * 2 / 4), at most the group's tokens
    assert dataclasses.replace(config, capacity_factor=1e30).capacity(tokens) == tokens
    assert dataclasses.replace(config, expert_capacity=2**62).capacity(tokens) == tokens
    assert dataclasses.replace(config, capacity_factor=None).capacity(tokens) == -1


# --- presets against the README's model table ------------------------------------------------------


def readme_model_table() -> list[dict[str, str]]:
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | preset |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


SIZES = dict(d_model=D, d_ff=FF)
PRESET_ARGS = {  # the arguments each preset needs beyond the sizes, small enough to build
    "mixtral": {}, "qwen3_moe": {}, "olmoe": {}, "gpt_oss": {}, "llama4": {},
    "qwen2_moe": dict(shared_expert_d_ff=20),
    "deepseek_v3": dict(num_experts=16, top_k=4, num_groups=4, topk_groups=2),
    "switch": dict(expert_capacity=4),
}


@pytest.mark.parametrize("row", readme_model_table(), ids=lambda r: r["model"])
def test_presets_match_the_readme_table(row):
    name = re.fullmatch(r"`MoEConfig\.(\w+)\(\.\.\.\)`", row["preset"]).group(1)
    preset = getattr(MoEConfig, name)
    for norm in ((False, True) if row["renormalize"] == "`norm_topk_prob`" else (None,)):
        kwargs = {**SIZES, **PRESET_ARGS[name]} | ({} if norm is None else {"norm_topk_prob": norm})
        config = preset(**kwargs)
        scoring, _, topk = row["scoring"].partition(", ")
        assert config.scoring == scoring
        if topk:
            assert topk == "top-1" and config.top_k == 1
        assert config.renormalize == {"yes": True, "no": False, "—": False}.get(row["renormalize"], norm)
        for option in re.findall(r"`(\w+)(?:=([^`]+))?`", row["other options"]):
            key, value = option
            if value:
                assert str(getattr(config, key)).removeprefix("torch.") == value.strip('"'), key
            else:
                field = next(f for f in dataclasses.fields(MoEConfig) if f.name == key)
                assert getattr(config, key) != field.default, key
        MoELayer.from_config(config)  # and it builds


def test_readme_config_example_runs():
    text = README.read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "MoEConfig.deepseek_v3(" in b)
    scope: dict = {}
    exec("import dataclasses, torch, sparsemoe\n" + block, scope)
    assert scope["layer"].config == scope["cfg"] and scope["layer"].gate_up_proj.dtype == torch.bfloat16
