#!/usr/bin/env bash
# Builds etpo's CUDA path (`--features cuda`) on a machine that has no GPU and no CUDA toolkit,
# for running on a machine that has one. Idempotent.
#
#   scripts/cuda.sh toolkit   # CUDA 13.0 compiler and libraries from PyPI into .venv-cuda
#   scripts/cuda.sh build     # toolkit, then `cargo build --features cuda --bin etpo`;
#                             # copies the binary to target/cuda/etpo
#   scripts/cuda.sh test-build  # toolkit, then the trainer's integration tests without running them,
#                             # copied to target/cuda/tests/integration (the GPU cases:
#                             # `target/cuda/tests/integration cuda:: logits_parity::`)
#   scripts/cuda.sh env       # prints the exports a hand-run cargo command needs
#
# Why each step (see also the README's GPU section):
#   - candle's kernels are compiled with nvcc; PyPI ships it. CUDA is pinned to 13.0: later nvcc
#     releases make cudarc's build script reject the version, and driver 580 runs 13.0 code.
#   - the pip libraries carry only versioned names, so the linker gets unversioned symlinks;
#   - libcuda.so belongs to the GPU driver, which no package ships: for linking only, a stub with
#     soname libcuda.so.1 defines every driver symbol cudarc declares. At run time the loader
#     finds the driver's real libcuda.so.1.
#   - CUDA_COMPUTE_CAP defaults to 90 (H100/H200): nvcc cannot query a GPU here.
#
# The binary links libcublas.so.13, libcudart.so.13 and libcurand.so.10: on the GPU machine, put
# the CUDA 13 libraries on LD_LIBRARY_PATH (PyTorch's .../site-packages/nvidia/cu13/lib has them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${ETPO_CUDA_VENV:-$root/.venv-cuda}"
PYVER="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
CUDA_HOME="$VENV/lib/python$PYVER/site-packages/nvidia/cu13"

toolkit() {
    if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
        echo "cuda: installing the CUDA 13.0 toolkit from PyPI into $VENV" >&2
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 \
            nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    fi
    local lib="$CUDA_HOME/lib" name versioned
    for name in libcublas libcublasLt libcudart libcurand libnvrtc; do
        versioned="$(cd "$lib" && ls "$name".so.* 2>/dev/null | sort | head -n1)"
        [ -n "$versioned" ] || { echo "cuda: $lib has no $name.so.*" >&2; exit 1; }
        ln -sfn "$versioned" "$lib/$name.so"
    done
    stub_libcuda
}

# The driver API symbols are read from the cudarc version in Cargo.lock, so the stub always
# matches what the binary references.
stub_libcuda() {
    local stubs="$CUDA_HOME/lib/stubs"
    [ -f "$stubs/libcuda.so" ] && return
    local version sys
    version="$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$root/Cargo.lock")"
    (cd "$root" && cargo fetch --quiet)
    sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$version"/src/driver/sys/mod.rs | head -n1)"
    [ -f "$sys" ] || { echo "cuda: cannot find cudarc $version's driver bindings" >&2; exit 1; }
    mkdir -p "$stubs"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{ print "void " $4 "(void) {}" }' | sort -u \
        >"$stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
    echo "cuda: stub libcuda.so with $(wc -l <"$stubs/libcuda_stub.c") driver symbols" >&2
}

print_env() {
    cat <<EOF
export CUDA_HOME="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:\$PATH"
export NVCC="$CUDA_HOME/bin/nvcc"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
# cudarc adds $CUDA_HOME/lib and lib/stubs to the link search itself; RUSTFLAGS stays untouched so
# that every dependency not built with CUDA is shared with the CPU build.
export LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
EOF
}

build() {
    toolkit
    eval "$(print_env)"
    (cd "$root" && cargo build --features cuda --bin etpo)
    mkdir -p "$root/target/cuda"
    cp "$root/target/debug/etpo" "$root/target/cuda/etpo"
    echo "cuda: built $root/target/cuda/etpo" >&2
}

# The tests read their fixtures through the source path they were built in: on the GPU machine,
# run them from a checkout at the same path (a symlink will do).
test_build() {
    toolkit
    eval "$(print_env)"
    mkdir -p "$root/target/cuda/tests"
    (cd "$root" && cargo test -p etpo-trainer --features cuda --test integration --no-run \
        --message-format=json) |
        python3 -c '
import json, shutil, sys, os
dest = sys.argv[1]
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
        shutil.copy(msg["executable"], os.path.join(dest, msg["target"]["name"]))
        print("cuda: built", os.path.join(dest, msg["target"]["name"]), file=sys.stderr)
' "$root/target/cuda/tests"
}

case "${1:-}" in
    toolkit) toolkit ;;
    build) build ;;
    test-build) test_build ;;
    env) print_env ;;
    *) echo "usage: scripts/cuda.sh toolkit|build|test-build|env" >&2; exit 2 ;;
esac
