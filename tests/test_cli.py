"""The command line: python -m sparsemoe {demo,info}."""

import json
import math
import os
import subprocess
import sys

import pytest

from sparsemoe.cli import main

TINY = ["--steps", "40", "--batch-size", "8", "--seq-len", "16", "--d-model", "16", "--heads", "2",
        "--layers", "1", "--expert-d-ff", "16", "--experts", "4", "--top-k", "2", "--eval-batches", "2",
        "--eval-every", "10", "--lr", "1e-2", "--no-progress"]


def run_main(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr), whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "sparsemoe", "demo", *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_demo_runs_and_prints_summary(tiny_demo):
    proc, out = tiny_demo
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in ("MoE (4 experts, top-2", "dense (d_ff 32)", "tokens/s", "held-out", "blocks.0.ffn",
                 "summary.json", "demo.png"):
        assert text in proc.stdout, text


def test_demo_json(tiny_demo):
    _, out = tiny_demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 40 and summary["config"]["dense_d_ff"] == 32
    moe, dense = summary["moe"], summary["dense"]
    for r in (moe, dense):
        assert len(r["train_curve"]) == 40
        for key in ("train_loss", "held_out_loss", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert all(math.isfinite(v) for v in r["train_curve"])
        assert [e["step"] for e in r["eval_curve"]] == [0, 10, 20, 30, 40]
    # equal active parameters, apart from the router (d_model * E per layer)
    assert moe["active_parameters"] - dense["active_parameters"] == 16 * 4
    assert moe["parameters"] > moe["active_parameters"]
    # the MoE model learns: held-out and train losses fall over the run
    assert moe["eval_curve"][-1]["loss"] < moe["eval_curve"][0]["loss"] - 0.5
    assert sum(moe["train_curve"][-5:]) < sum(moe["train_curve"][:5]) - 2.5
    assert moe["initial_held_out_loss"] == pytest.approx(math.log(256), abs=0.5)
    # expert load: one entry per layer, per expert, summing to 1
    assert len(moe["routing"]) == 1
    for layer in moe["routing"]:
        assert layer["layer"] == "blocks.0.ffn"
        assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0)
        assert all(v >= 0 for v in layer["load"])
        assert sum(layer["tokens_per_expert"]) == 2 * 2 * 8 * 16  # eval batches * batch * seq * top_k
        assert 0 < layer["router_entropy"] <= layer["max_entropy"] + 1e-6
    assert len(moe["load_history"]) == 40
    assert all(len(row) == 4 and sum(row) == pytest.approx(1.0) for row in moe["load_history"])
    assert "routing" not in dense


def test_demo_expert_parallel_equals_the_single_process_run(tiny_demo, tmp_path):
    _, single = tiny_demo
    out = tmp_path / "ep"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "sparsemoe", "demo", *TINY, "--out", str(out), "--expert-parallel", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "experts sharded over 2 processes (2 per rank)" in proc.stdout
    assert "blocks.0.ffn   rank 0:" in proc.stdout and "blocks.0.ffn   rank 1:" in proc.stdout
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single, out))
    for kind in ("moe", "dense"):
        for x, y in zip(a[kind]["train_curve"], b[kind]["train_curve"]):
            assert y == pytest.approx(x, rel=1e-5)
        assert b[kind]["parameters"] == a[kind]["parameters"]
    per_rank = b["moe"]["routing"][0]["tokens_per_expert_by_rank"]
    assert len(per_rank) == 2 and [sum(c) for c in zip(*per_rank)] == b["moe"]["routing"][0]["tokens_per_expert"]


def test_demo_plot(tiny_demo):
    _, out = tiny_demo
    import matplotlib  # noqa: F401  (a test dependency: the README's test command installs it)
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((out / "summary.json").read_text())["plot"] == str(out / "demo.png")


def test_demo_custom_corpus_bf16(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = ["demo", *TINY, "--steps", "5", "--corpus", str(corpus), "--dtype", "bfloat16", "--out", str(tmp_path / "o")]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["config"]["corpus_source"] == str(corpus) and summary["config"]["dtype"] == "bfloat16"
    assert math.isfinite(summary["moe"]["held_out_loss"])


def test_info(capsys):
    import torch

    import sparsemoe
    code, out, err = run_main(["info"], capsys)
    assert code == 0, err
    assert f"sparsemoe {sparsemoe.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert torch.backends.cpu.get_cpu_capability() in out
    assert "avx512f" in out and "avx512_bf16" in out and "amx_bf16" in out
    assert ("CUDA kernels: built" if sparsemoe._C.with_cuda else "CUDA kernels: not built") in out
    assert f"torch.get_num_threads() = {torch.get_num_threads()}" in out
    assert ("CPU packed expert weights: oneDNN micro-kernel" if sparsemoe.ops.packed_kernels_available()
            else "CPU packed expert weights: off") in out
    if sparsemoe.ops.packed_kernels_available():
        assert ("VNNI pairs" in out) == sparsemoe.ops.panels_in_pairs(torch.bfloat16)
        assert (f"fewer than {sparsemoe._C.pairs_backward_max_rows} rows" in out) == \
            sparsemoe.ops.panels_in_pairs(torch.bfloat16)
        streamed = [n for n in ("float32", "bfloat16") if sparsemoe.ops.panels_stream(getattr(torch, n))]
        line = next(x for x in out.splitlines() if x.startswith("CPU few-row panel products"))
        assert f"up to {sparsemoe._C.stream_max_rows} rows" in line
        assert (f"kernel for {' and '.join(streamed)}," in line) if streamed else "no AVX-512" in line
    line = next(x for x in out.splitlines() if x.startswith("CPU unpacked bfloat16 forward: "))
    in_range = (f"with {sparsemoe._C.native_forward_min_rows} to {sparsemoe._C.native_forward_max_rows} rows on the "
                "weights in place")
    assert (in_range in line) == sparsemoe.ops.native_forward_runs(torch.bfloat16), line
    hardware = sparsemoe.ops.bf16_gemm_hardware()
    assert f"bfloat16 GEMM hardware: {'none (emulated)' if hardware == 'none' else hardware}" in out
    flags = sparsemoe.cli.cpu_flags()  # the kernel's view of the CPU, against ATen's
    if flags:
        assert hardware == ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "none")
    if sparsemoe.ops.packed_kernels_available(torch.bfloat16):
        line = next(x for x in out.splitlines() if x.startswith("CPU bfloat16 packing: "))
        assert ("training steps never pack" in line) == (hardware == "AMX"), line
        assert (f"forwards run unpacked from {sparsemoe.packing.AMX_UNPACKED_MIN_ROWS} rows" in line) == \
            (hardware == "AMX"), line
    limit = sparsemoe.ops.buffer_cache_limit()
    line = next(x for x in out.splitlines() if x.startswith("CPU buffer cache: "))
    assert (f"keeps up to {limit / 2 ** 20:g} MiB" in line) if limit > 0 else "off" in line
    assert "OpenMP" in out or "ATen/Parallel" in out


def test_info_subprocess():
    proc = subprocess.run([sys.executable, "-m", "sparsemoe", "info"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sparsemoe" in proc.stdout and proc.stderr == ""


BAD = {
    "missing corpus": (["--corpus", "/nonexistent/corpus.txt"], "no such file"),
    "top_k > experts": (["--experts", "2", "--top-k", "3"], "--top-k 3 is larger than --experts 2"),
    "unknown device": (["--device", "banana"], "unknown device"),
    "unknown dtype": (["--dtype", "float8"], "--dtype"),
    "steps 0": (["--steps", "0"], "--steps"),
    "steps negative": (["--steps", "-3"], "--steps"),
    "steps not a number": (["--steps", "many"], "--steps"),
    "heads do not divide": (["--heads", "3"], "does not divide"),
    "corpus too short": (None, "too short"),
    "experts not divisible": (["--experts", "3", "--top-k", "1", "--expert-parallel", "2"],
                              "--experts 3 is not divisible by the 2 expert-parallel processes"),
    "batch not divisible": (["--batch-size", "7", "--expert-parallel", "2"],
                            "--batch-size 7 is not divisible by the 2 expert-parallel processes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments(case, capsys, tmp_path):
    extra, expected = BAD[case]
    if extra is None:
        (tmp_path / "short.txt").write_text("tiny")
        extra = ["--corpus", str(tmp_path / "short.txt")]
    code, out, err = run_main(["demo", *TINY, *extra, "--out", str(tmp_path / "o")], capsys)
    assert code not in (0, None)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err and "error" in err
    assert not (tmp_path / "o").exists()


def test_cuda_unavailable_is_one_line(capsys, tmp_path, monkeypatch):
    import torch
    # Run as on a machine without a GPU, whatever this one has.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(["demo", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err


def test_bad_argument_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsemoe", "demo", "--corpus", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "no such file" in proc.stderr


def test_no_subcommand(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_demo_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = run_main(["demo", *TINY, "--steps", "3", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "plot" in line and "summary" not in line]
    assert len(notes) == 1 and "plot skipped" in notes[0]
    assert not (tmp_path / "demo.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plot"] is None and len(summary["moe"]["train_curve"]) == 3
