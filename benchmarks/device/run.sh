#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE (after benchmarks/device/prepare.sh here), as one call:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl", ".device-data"], timeout_s=570)
# Each stage has its own time limit and its failure does not stop the next; everything they
# print goes to $OUT/run.log, and each benchmark's JSON and table land in $OUT (9 files).
# DEVICE=cpu THREADS=2 SCALE=6 runs the same stages on a machine without a GPU (to check this
# script; SCALE multiplies every time limit).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smoulder-device-out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/smoulder-site}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
SCALE=${SCALE:-1}
mkdir -p "$OUT"
LOG=$OUT/run.log
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
stage() {
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  limit=$((limit * SCALE))
  log "== $name (limit $limit s): $*"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  log "== $name: rc $rc in $((SECONDS - t)) s"
}

stage install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE OMP_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1
# the benchmarks read ../shared/data beside the repository
if [ ! -d ../shared/data/qsm_head_model ]; then
  mkdir -p ../shared/data && cp -rn .device-data/shared/data/. ../shared/data/ \
    || log "could not copy the data to ../shared/data: the QSM and real-case stages will skip"
fi
stage environment 30 "$PY" -c "
import torch, smoulder, monai, nibabel
print('smoulder', smoulder.__file__, 'torch', torch.__version__, 'monai', monai.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1

# 1. the CUDA paths against the CPU (segmentation, QSM, halfway registration)
[ "$DEVICE" = cpu ] && export SMOULDER_TEST_ALT_DEVICE=cpu
stage cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
# 2. segmentation of one real 1-mm session (issue 5: <= 2 s on a GPU)
stage segmentation 90 "$PY" benchmarks/segmentation.py --out "$OUT" --methods smoulder \
  --cases real-patient07 --device "$DEVICE" --threads "$THREADS" --cache /tmp/smoulder-seg-cache
# 3. QSM of the 0.7-mm 5-echo whole-brain GRE (issue 7: <= 3 s on a GPU)
stage qsm 200 "$PY" benchmarks/qsm.py --out "$OUT" --cases head-e5-snr100-axial \
  --methods smoulder-tv,smoulder-tkd --device "$DEVICE" --threads "$THREADS" --cache /tmp/smoulder-qsm-cache
# 4. torch registration on the 2-mm phantom pair (issue 3's GPU timings)
stage registration 60 "$PY" benchmarks/registration.py --out "$OUT" --cases phantom-2mm \
  --methods smoulder-torch,smoulder-halfway --device "$DEVICE" --threads "$THREADS" \
  --cache /tmp/smoulder-registration-cache
# 5. the rim classifier per 100 lesions (issue 22: <= 5 s on 2 CPU cores; GPU figure for the
#    record), on the quick 3 T set (two 2-mm phantom sessions made here)
stage rims 150 "$PY" benchmarks/rims.py --out "$OUT" --quick --cases 3T-1mm \
  --methods smoulder-prl --device "$DEVICE" --threads "$THREADS" --cache /tmp/smoulder-rims-cache
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
