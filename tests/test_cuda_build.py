"""Every CUDA source compiles with nvcc for sm_90, also where torch is CPU-only and no GPU exists.

The test configures CMake with SPARSEMOE_CUDA_COMPILE_CHECK=ON in build/cuda-compile-check (kept
between runs, so only changed files are compiled again) and builds the object library of every
csrc/cuda/*.cu file. Nothing is linked or installed.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "cuda-compile-check"
TIMEOUT_S = 3600


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_cmake() -> str | None:
    path = shutil.which("cmake")
    if path is None:
        try:
            import cmake  # the PyPI wheel of CMake

            path = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            return None
    return path


def run_niced(cmd: list[str]) -> subprocess.CompletedProcess:
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    return subprocess.run(nice + cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def compiler_errors(output: str) -> str:
    """The error lines of a build log with a few lines of context each, else its last lines."""
    lines = output.splitlines()
    shown = sorted({j for i, line in enumerate(lines) if re.search(r"\berror\b", line) for j in range(i, min(i + 4, len(lines)))})
    return "\n".join(lines[j] for j in shown[:400]) if shown else "\n".join(lines[-150:])


def test_every_cuda_source_compiles_with_nvcc():
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    cmake = find_cmake()
    assert cmake is not None, "cmake not found: install CMake (for instance `pip install cmake`)"
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no csrc/cuda/*.cu files"

    configure = run_niced([
        cmake, "-S", str(ROOT), "-B", str(BUILD_DIR),
        "-DSPARSEMOE_CUDA_COMPILE_CHECK=ON",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ])
    if configure.returncode != 0:
        pytest.fail(f"CMake configure of the CUDA compile check failed:\n{configure.stdout}\n{configure.stderr}")

    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    build = run_niced([cmake, "--build", str(BUILD_DIR), "-j", jobs])
    if build.returncode != 0:
        pytest.fail(f"nvcc failed on csrc/cuda:\n{compiler_errors(build.stdout + build.stderr)}")

    objects = {p.name for p in BUILD_DIR.rglob("*.cu.o")}
    missing = [s.name for s in sources if f"{s.name}.o" not in objects]
    assert not missing, f"no object file for {missing}"
