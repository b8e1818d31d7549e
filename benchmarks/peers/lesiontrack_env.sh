#!/usr/bin/env bash
# Create the virtual environment of the lesiontrack peer used by benchmarks/longitudinal.py.
#
#   bash benchmarks/peers/lesiontrack_env.sh       # -> ${SMOULDER_PEERS:-~/.cache/smoulder-peers}/lesiontrack-venv
#
# lesiontrack (PyPI, MIT; C. Conday) tracks lesions across sessions on an overlap graph and
# finds slowly expanding lesion candidates after Elliott et al. (Mult Scler 2019) from the
# Jacobian of a greedy registration in halfway space. greedy comes as the `picsl_greedy`
# wheel (CPU only), so nothing else is downloaded.
#
# Its pins are loose (numpy >= 1.24, nibabel >= 5, picsl_greedy >= 1.4), but
# pandas, scikit-image and matplotlib come with it: the separate environment keeps them out.
#
# Known to work (2026-12): Python 3.11, lesiontrack 0.2.0, picsl_greedy 1.4.0.3, numpy 2.4.6,
# scipy 1.17.1, nibabel 5.4.2, pandas 3.1.1, scikit-image 0.26.0 (825 MB; about a minute).
# Check: `$VENV/bin/lesiontrack --help`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

peer_venv lesiontrack lesiontrack-venv '"$VENV/bin/lesiontrack" --help' "lesiontrack==0.2.0"
"$VENV/bin/lesiontrack" --help >/dev/null
"$VENV/bin/python" -c "import lesiontrack, picsl_greedy; print('lesiontrack ready:', lesiontrack.__file__)"
"$VENV/bin/pip" list 2>/dev/null | grep -iE '^(lesiontrack|picsl.greedy|numpy|scipy|nibabel|pandas|scikit-image) '
echo "lesiontrack installed: $VENV"
