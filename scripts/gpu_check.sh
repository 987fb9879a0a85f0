#!/usr/bin/env bash
# Fareway's check on a GPU machine in one command of at most 8 minutes: the gpu-marked tests, GPU vs
# CPU logits, decode tokens/s and effective bandwidth (scripts/gpu_check.py; docs/gpu.md).
#
#   scripts/gpu_check.sh --prepare   here, with the package index: the wheels the GPU machine lacks,
#                                    into .gpu_wheels/ (ignored; carry it to the machine)
#   scripts/gpu_check.sh             there: installs .gpu_wheels/ into a temporary folder, runs the check
#   scripts/gpu_check.sh --dry-run   anywhere: every section on the CPU with small shapes (CI runs it)
#
# Other arguments go to scripts/gpu_check.py (--help lists them). PYTHON picks the interpreter
# (default .venv/bin/python if there is one, else python3); GPU_CHECK_BUDGET_S the whole run's seconds.
set -euo pipefail

started=$SECONDS
cd "$(dirname "$0")/.."
root=$PWD
wheels=$root/.gpu_wheels
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
budget_s=${GPU_CHECK_BUDGET_S:-480}
# The GPU machine's Python, which its binary wheels are built for (docs/gpu.md).
gpu_python_version=${GPU_PYTHON_VERSION:-3.12}
# The seconds kept back for the interpreter's exit and the last table after the driver's budget.
margin_s=15

prepare() {
  rm -rf "$wheels"
  mkdir -p "$wheels"
  local requirements
  requirements=$("$PYTHON" scripts/gpu_check.py --wheel-requirements)
  # shellcheck disable=SC2086 # one requirement per word
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
    --python-version "$gpu_python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    $requirements
  echo "$(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$wheels" | cut -f1), in $wheels"
}

# Installs the wheels that fit this interpreter into a temporary folder put first on PYTHONPATH.
install_wheels() {
  site=$(mktemp -d "${TMPDIR:-/tmp}/fareway-gpu-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  local tag fits=() wheel
  tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  for wheel in "$wheels"/*.whl; do
    case $(basename "$wheel") in
      *-none-any.whl | *-"$tag"-*.whl | *-abi3-*.whl) fits+=("$wheel") ;;
      *) echo "not installed (built for another Python than $tag): $(basename "$wheel")" >&2 ;;
    esac
  done
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --root-user-action=ignore --target "$site" "${fits[@]}"
  echo "installed ${#fits[@]} wheels from $wheels in $((SECONDS - started)) s" >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

if [[ ${1:-} == --prepare ]]; then
  prepare
  exit
fi
if compgen -G "$wheels/*.whl" >/dev/null; then
  install_wheels
elif [[ " $* " != *" --dry-run "* ]]; then
  echo "no wheels in $wheels: if this machine lacks packages the check imports, run" \
    "scripts/gpu_check.sh --prepare where pip reaches an index and bring the folder (docs/gpu.md)" >&2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" scripts/gpu_check.py --budget-s $((budget_s - (SECONDS - started) - margin_s)) "$@"
