# Sourced by the peers' *_env.sh scripts: where the peers' virtual environments live, and the
# one way to make one.
#
#   SMOULDER_PEERS  folder of the environments (default ~/.cache/smoulder-peers)
#   PYTHON          interpreter the environment is made with (default python3)

PEERS="${SMOULDER_PEERS:-$HOME/.cache/smoulder-peers}"
PYTHON="${PYTHON:-python3}"

# peer_venv LABEL NAME CHECK PACKAGE...
# Make the virtual environment $PEERS/NAME (its path in $VENV) and install PACKAGE... in it,
# unless the shell command CHECK (it may use $VENV) already succeeds: then say so and exit 0,
# since the peer is ready.
peer_venv() {
    local label="$1" check="$3"
    VENV="$PEERS/$2"
    shift 3
    if [ -x "$VENV/bin/python" ] && eval "$check" >/dev/null 2>&1; then
        echo "$label already installed: $VENV"
        exit 0
    fi
    mkdir -p "$PEERS"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --upgrade pip
    "$VENV/bin/pip" install "$@"
}
