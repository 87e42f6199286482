#!/usr/bin/env bash
# Download here (where PyPI is reachable) the wheels a GPU machine without network lacks, for
# scripts/gpu_check.sh to install there with `pip install --no-index` (see BENCHMARKS.md, "GPU check").
#   bash scripts/gpu_check_wheels.sh                  # -> .cache/gpu_check_wheels (git-ignored)
#   PY_VERSION=3.11 bash scripts/gpu_check_wheels.sh  # another CPython of the GPU machine
# Each package is fetched at the version installed in this environment (the tested one), as a
# manylinux x86_64 wheel for CPython PY_VERSION; packages published as source only (deepspeed,
# rouge-score) are built here into pure-Python wheels (DeepSpeed without precompiled ops; it picks
# the CUDA accelerator at run time and compiles no op for this check's torch AdamW).
# Environment: OUT_DIR (default .cache/gpu_check_wheels), PY_VERSION (default 3.12), PACKAGES (default:
# what the targeted CUDA image lacks of requirements.txt, with DeepSpeed's and datasets' own needs).
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUT_DIR:=${BASE_PATH}/.cache/gpu_check_wheels}"
: "${PY_VERSION:=3.12}"
: "${PYTHON:=python}"
: "${PACKAGES:=deepspeed hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess
  rapidfuzz rouge-score nltk}"
mkdir -p "${OUT_DIR}"
for pkg in ${PACKAGES}; do
  ver=$("${PYTHON}" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "${pkg}") \
    || { echo "[gpu_check_wheels] ${pkg} is not installed here: install requirements.txt first" >&2; exit 2; }
  if ! "${PYTHON}" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "${OUT_DIR}" "${pkg}==${ver}" 2>/dev/null; then
    echo "[gpu_check_wheels] ${pkg}==${ver}: no wheel published; building a pure-Python one" >&2
    src=$(mktemp -d)
    "${PYTHON}" -m pip download -q --no-deps --no-binary=:all: -d "${src}" "${pkg}==${ver}"
    DS_BUILD_OPS=0 "${PYTHON}" -m pip wheel -q --no-deps --no-build-isolation -w "${OUT_DIR}" "${src}"/*
    rm -rf "${src}"
  fi
done
ls -l "${OUT_DIR}"
du -sh "${OUT_DIR}"
