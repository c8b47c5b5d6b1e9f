#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer (the CMake option
# SPARSEMOE_SANITIZE) into build/asan-site, next to the normal install, and runs the op,
# hostile-input, bad-input and fuzz tests against it. Any out-of-bounds access, use after free or
# undefined behaviour in the kernels aborts the run with the sanitizer's report.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --no-build-isolation --no-deps --upgrade --quiet --target build/asan-site \
    -C cmake.define.SPARSEMOE_SANITIZE=ON -C build-dir=build/asan .
# Python itself is not instrumented: the ASan runtime is preloaded, with libstdc++ so that it can
# intercept C++ exceptions. Leak checking is off (the interpreter never frees everything).
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
export PYTHONPATH="$PWD/build/asan-site${PYTHONPATH:+:$PYTHONPATH}"
python -c "import sparsemoe, sys; sys.exit(0 if sparsemoe._C.sanitized else f'not the sanitized build: {sparsemoe.__file__}')"
# --capture=sys: a sanitizer's report (written to fd 2 before it aborts) reaches the log.
python -m pytest -q --capture=sys -p no:cacheprovider tests/test_route.py tests/test_route_schemes.py \
    tests/test_dispatch.py tests/test_dispatch_capacity.py tests/test_combine.py tests/test_expert_ffn.py \
    tests/test_expert_ffn_variants.py tests/test_expert_ffn_layouts.py tests/test_packed_weights.py tests/test_native_forward.py tests/test_batch_invariance.py tests/test_hostile_input.py tests/test_bad_input.py tests/test_fuzz.py \
    tests/test_layer.py tests/test_checkpoint.py tests/test_buffer_cache.py tests/test_moe_inference.py "$@"
