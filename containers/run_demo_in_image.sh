#!/usr/bin/env bash
# Run `smoulder demo /out` in the image built by containers/build_rootfs.sh, with OUTPUT_DIR
# on the host bind-mounted at /out.
#
# usage (as root):  containers/run_demo_in_image.sh OUTPUT_DIR [IMAGE]
#
# MODE=podman (default): `podman run`, no network, as the image's user smoulder; the output
#   directory is handed to that user with the `:U` volume option (podman chowns it).
#   Where crun fails ("cgroups in hybrid mode not supported": cgroup v1 + v2 hybrid hosts) the
#   runc runtime is used when installed (PODMAN_RUNTIME), and the rlimits are kept at or under
#   the host's hard limits (podman's default nofile=1048576 fails with "setrlimit RLIMIT_NOFILE:
#   Operation not permitted" where raising limits is not allowed). PODMAN_ULIMITS overrides.
# MODE=buildah: no OCI runtime at all: `buildah run --isolation chroot` on a working container
#   made from the image (host network and cgroups, but still the image's file system and user).
# STORAGE_DRIVER=vfs: as for build_rootfs.sh.
set -euo pipefail

OUT=${1:?usage: $0 OUTPUT_DIR [IMAGE]}
IMAGE=${2:-smoulder:local}
MODE=${MODE:-podman}
STORE=(${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"})
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

case "$MODE" in
podman)
    if [ -z "${PODMAN_RUNTIME+x}" ]; then
        PODMAN_RUNTIME=$(command -v runc >/dev/null && echo runc || echo "")
    fi
    if [ -z "${PODMAN_ULIMITS+x}" ]; then
        hn=$(ulimit -Hn); hu=$(ulimit -Hu)
        if [ "$hn" = unlimited ] || [ "$hn" -gt 8192 ]; then hn=8192; fi
        if [ "$hu" = unlimited ] || [ "$hu" -gt 8192 ]; then hu=8192; fi
        PODMAN_ULIMITS="--ulimit nofile=$hn:$hn --ulimit nproc=$hu:$hu"
    fi
    cg=()
    [ -d /run/systemd/system ] || cg=(--cgroup-manager cgroupfs)
    set -x
    exec podman "${STORE[@]}" ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"} run --rm \
        "${cg[@]}" --network none $PODMAN_ULIMITS \
        -v "$OUT:/out:U" "$IMAGE" demo /out
    ;;
buildah)
    ctr=$(buildah "${STORE[@]}" from "$IMAGE")
    trap 'buildah "${STORE[@]}" rm "$ctr" >/dev/null' EXIT
    user=$(buildah "${STORE[@]}" inspect --format '{{.OCIv1.Config.User}}' "$ctr")
    uid=$(buildah "${STORE[@]}" run --isolation chroot "$ctr" -- id -u "$user")
    chown "$uid" "$OUT"
    set -x
    buildah "${STORE[@]}" run --isolation chroot --user "$user" -v "$OUT:/out" "$ctr" \
        -- /opt/smoulder/bin/smoulder demo /out
    ;;
*) echo "MODE is podman or buildah" >&2; exit 2 ;;
esac
