#!/usr/bin/env bash
# Run HERE (internet to PyPI), right before the device call: fetches the wheels the GPU machine
# lacks into .whl/, builds smoulder's own wheel from this working tree, and copies the data the
# checks read into .device-data/. Both folders are git-ignored; the device call carries them:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl", ".device-data"], timeout_s=570)
# PYVER: the device's Python (3.12); PYTHON: a Python with pip here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-../shared/data}
rm -rf .whl .device-data
mkdir -p .whl .device-data/shared/data/open_ms/cross_sectional
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux_2_5_x86_64 manylinux1_x86_64 any; do plat+=(--platform "$p"); done
grep -v '^#' benchmarks/device/wheels.txt | grep . >.whl/requirements.txt
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${plat[@]}" -d .whl -r .whl/requirements.txt
# docopt (for num2words) is published as a source archive only: a pure-Python wheel from it
"$PYTHON" -m pip wheel -q --no-deps -w .whl docopt==0.6.2
# smoulder itself, from this working tree (pure Python: any 3.x)
"$PYTHON" -m pip wheel -q --no-deps -w .whl .
rm .whl/requirements.txt
# the QSM head model (the 0.7-mm 5-echo speed case) and one real FLAIR + T1 (segmentation)
cp -r "$SHARED/qsm_head_model" .device-data/shared/data/
mkdir -p .device-data/shared/data/open_ms/cross_sectional/patient07
cp "$SHARED"/open_ms/cross_sectional/patient07/{FLAIR,T1_,GOLD}* \
  .device-data/shared/data/open_ms/cross_sectional/patient07/
du -sh .whl .device-data
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{printf "tracked files: %.1f MB (the call carries at most 64 MiB in all)\n", $1 / 1e6}'
