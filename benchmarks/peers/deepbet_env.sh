#!/usr/bin/env bash
# Create the virtual environment of the deepbet peer (brain extraction) used by
# benchmarks/segmentation.py.
#
#   bash benchmarks/peers/deepbet_env.sh           # -> ${SMOULDER_PEERS:-~/.cache/smoulder-peers}/deepbet-venv
#
# deepbet (Fisch et al., Computers in Biology and Medicine 2024; PyPI `deepbet`, MIT) ships its
# two networks (bounding box, mask) inside the wheel, so nothing is downloaded when it runs. It
# is kept out of smoulder's environment because it pulls a GUI toolkit (customtkinter) and
# pandas that the pipeline does not need. torch is pinned to the CPU build smoulder uses.
#
# Known to work (2026-12): Python 3.11, deepbet 1.0.2, torch 2.13.0+cpu.
# Check: `$VENV/bin/python -c "from deepbet import run_bet"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

peer_venv deepbet deepbet-venv '"$VENV/bin/python" -c "from deepbet import run_bet"' \
    "torch==2.13.0" "deepbet==1.0.2"
"$VENV/bin/python" -c "from deepbet import run_bet; import deepbet; print('deepbet ready:', deepbet.__file__)"
echo "deepbet installed: $VENV"
