#!/usr/bin/env bash
# Create the virtual environment of the SAMSEG peer used by benchmarks/segmentation.py.
#
#   bash benchmarks/peers/samseg_env.sh            # -> ${SMOULDER_PEERS:-~/.cache/smoulder-peers}/samseg-venv
#   PYTHON=python3.11 bash benchmarks/peers/samseg_env.sh
#
# SAMSEG (Puonti et al., NeuroImage 2016; lesion model: Cerri et al., NeuroImage 2021) comes
# from PyPI's `samseg` wheel, which ships the 20-subject atlas and the lesion shape model (VAE),
# so nothing else is downloaded. It is kept out of smoulder's environment: it needs numpy < 2
# and TensorFlow (its lesion VAE uses tf.compat.v1).
#
# Known to work (2026-12): Python 3.11, samseg 0.4a0 (cp311 manylinux wheel), surfa 0.6.3
# (built from its sdist: needs a C compiler and Python headers), numpy 1.26.4,
# tensorflow-cpu 2.21.0. Check: `$VENV/bin/run_samseg --help`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

peer_venv SAMSEG samseg-venv '"$VENV/bin/run_samseg" --help' samseg "numpy<2" tensorflow-cpu
"$VENV/bin/run_samseg" --help >/dev/null
"$VENV/bin/python" -c "import tensorflow.compat.v1, samseg, surfa; print('samseg ready:', samseg.__file__)"
"$VENV/bin/pip" list 2>/dev/null | grep -iE '^(samseg|surfa|numpy|tensorflow-cpu) '
echo "SAMSEG installed: $VENV"
