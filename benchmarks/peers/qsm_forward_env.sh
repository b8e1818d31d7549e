#!/usr/bin/env bash
# Create the virtual environment of qsm-forward, the independent forward model that
# benchmarks/qsm.py checks smoulder's dipole convolution against.
#
#   bash benchmarks/peers/qsm_forward_env.sh   # -> ${SMOULDER_PEERS:-~/.cache/smoulder-peers}/qsm-forward-venv
#
# qsm-forward (PyPI; Stewart et al., the QSM challenge 2.0 forward simulation in Python) is
# kept out of smoulder's environment so that its pins never meet ours.
# Known to work (2026-12): Python 3.12, qsm-forward 0.32, numpy 2.4, scipy 1.17, nibabel 5.4.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

peer_venv qsm-forward qsm-forward-venv '"$VENV/bin/python" -c "import qsm_forward"' qsm-forward
"$VENV/bin/python" -c "import qsm_forward; print('qsm-forward ready:', qsm_forward.get_version())"
