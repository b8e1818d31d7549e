#!/usr/bin/env bash
# Build the smoulder image without any registry image: debootstrap a minimal Debian root file
# system, import it with `buildah from scratch`, install Python + smoulder inside (pip, from the
# lock file that CI, containers/Dockerfile and containers/smoulder.def install from too), add the
# non-root user `smoulder` and commit `smoulder:local`.
#
# usage (as root, from anywhere):
#   containers/build_rootfs.sh [REQUIREMENTS.txt] [IMAGE]
# e.g.
#   containers/build_rootfs.sh                      # requirements/lock.txt, smoulder:local
#   containers/run_demo_in_image.sh /tmp/smoulder-demo
#
# Needs: debootstrap, buildah (apt-get install debootstrap buildah podman runc).
# REQUIREMENTS.txt: pinned runtime requirements (`name==version` lines), by default the
# repository's requirements/lock.txt; a line for smoulder itself (or an `-e` line) is dropped,
# the package is installed from this working tree with --no-deps (the lock holds its closure).
# torch is installed from a local CPU wheel (TORCH_WHEEL) copied into the image: plain
# `pip install torch==2.13.0` from PyPI is the CUDA build (several GB of nvidia-* wheels),
# and download.pytorch.org is not reachable everywhere.
#
# Settings (environment):
#   SUITE=bookworm  MIRROR=http://deb.debian.org/debian   the Debian release and mirror
#   WORK=/var/tmp/smoulder-image     where the root file system is kept (reused when complete)
#   TORCH_WHEEL=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt   the host's CA bundle, bind-mounted (not
#       copied) while pip runs, so that pip works behind a TLS-inspecting proxy
#   STORAGE_DRIVER=   e.g. vfs where overlay does not work (default: containers-storage's)
#   ISOLATION=chroot  buildah run isolation: chroot needs no runtime, cgroups nor rlimits
#   SMOULDER_UID=1000 the uid/gid of the user smoulder inside the image
#   EXPORT=           optional path: also write the image as a docker-archive tarball there
#                     (for `podman load`, `docker load` or `apptainer build x.sif docker-archive:...`)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQ=${1:-$REPO/requirements/lock.txt}
IMAGE=${2:-smoulder:local}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${WORK:-/var/tmp/smoulder-image}
ROOTFS=$WORK/rootfs-$SUITE
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
ISOLATION=${ISOLATION:-chroot}
SMOULDER_UID=${SMOULDER_UID:-1000}
BUILDAH=(buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"})

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap and buildah mount need it)" >&2; exit 1; }
[ -f "$REQ" ] || { echo "no requirements file: $REQ" >&2; exit 1; }
[ -f "$TORCH_WHEEL" ] || { echo "no torch wheel: $TORCH_WHEEL (set TORCH_WHEEL)" >&2; exit 1; }
for tool in debootstrap buildah git tar; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install $tool)" >&2; exit 1; }
done

t0=$SECONDS
step() { echo "== [$((SECONDS - t0)) s] $*"; }

# 1. the root file system: Debian minbase + Python 3.11 (bookworm's python3), kept for reuse
if [ ! -e "$ROOTFS/.smoulder-complete" ]; then
    step "debootstrap $SUITE into $ROOTFS"
    rm -rf "$ROOTFS.part"
    mkdir -p "$WORK"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$ROOTFS.part" "$MIRROR"
    rm -rf "$ROOTFS.part"/var/cache/apt/archives/*.deb "$ROOTFS.part"/var/lib/apt/lists/*
    touch "$ROOTFS.part/.smoulder-complete"
    rm -rf "$ROOTFS"
    mv "$ROOTFS.part" "$ROOTFS"
else
    step "reusing $ROOTFS"
fi

# 2. an empty working container, filled with the root file system and the build inputs
ctr=$("${BUILDAH[@]}" from scratch)
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$("${BUILDAH[@]}" mount "$ctr")
step "copying the root file system into $ctr ($mnt)"
cp -a "$ROOTFS/." "$mnt/"
rm -f "$mnt/.smoulder-complete"
mkdir -p "$mnt/tmp/src" "$mnt/tmp/wheels"
# the working tree as git sees it (tracked + untracked, not ignored): no .venv, .git or outputs
( cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
      | tar --null --ignore-failed-read -T - -cf - ) | tar -C "$mnt/tmp/src" -xf -
cp "$TORCH_WHEEL" "$mnt/tmp/wheels/"
# pins only: drop comments, options, -e lines and smoulder itself
grep -v -i -E '^\s*(#|-|$)|^\s*smoulder\s*(==|@|$)' "$REQ" > "$mnt/tmp/requirements.txt" || true
"${BUILDAH[@]}" umount "$ctr" >/dev/null

# 3. Python environment: a venv (Debian's own python3 is PEP 668 externally managed)
step "pip install inside ($ISOLATION isolation)"
run=("${BUILDAH[@]}" run --isolation "$ISOLATION"
     -v "$CA_BUNDLE:/run/host-ca.crt:ro"
     --env PIP_CERT=/run/host-ca.crt --env PIP_NO_CACHE_DIR=1
     --env PIP_DISABLE_PIP_VERSION_CHECK=1 --env PIP_DEFAULT_TIMEOUT=180)
"${run[@]}" "$ctr" -- sh -euxc '
    python3 -m venv /opt/smoulder
    pip=/opt/smoulder/bin/pip
    # torch first, from the wheel: it meets the torch==2.13.0 line of the lock
    $pip install /tmp/wheels/torch-*.whl
    $pip install --find-links /tmp/wheels -r /tmp/requirements.txt
    $pip install --no-deps /tmp/src
    $pip check
    /opt/smoulder/bin/python -c "import torch, smoulder; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)"
    /opt/smoulder/bin/smoulder --help >/dev/null
'

# 4. the non-root user and clean-up
step "user smoulder ($SMOULDER_UID), clean-up"
"${BUILDAH[@]}" run --isolation "$ISOLATION" "$ctr" -- sh -euc "
    groupadd --gid $SMOULDER_UID smoulder
    useradd --uid $SMOULDER_UID --gid $SMOULDER_UID --create-home --shell /bin/bash smoulder
"
mnt=$("${BUILDAH[@]}" mount "$ctr")
rm -rf "$mnt/tmp/src" "$mnt/tmp/wheels" "$mnt/tmp/requirements.txt" "$mnt/root/.cache" \
       "$mnt/run/host-ca.crt" "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin
"${BUILDAH[@]}" umount "$ctr" >/dev/null

# 5. image configuration and commit
"${BUILDAH[@]}" config \
    --entrypoint '["/opt/smoulder/bin/smoulder"]' --cmd '["--help"]' \
    --user smoulder --workingdir /home/smoulder \
    --env PATH=/opt/smoulder/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env HOME=/home/smoulder --env LANG=C.UTF-8 \
    --env OMP_NUM_THREADS=1 --env PYTHONDONTWRITEBYTECODE=1 --env NIPYPE_NO_ET=1 \
    --label org.opencontainers.image.title=smoulder \
    --label org.opencontainers.image.base.name="debian:$SUITE (debootstrap minbase)" \
    --label org.opencontainers.image.revision="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)" \
    "$ctr"
step "commit $IMAGE"
"${BUILDAH[@]}" commit --rm "$ctr" "$IMAGE"
trap - EXIT
if [ -n "${EXPORT:-}" ]; then
    step "export to $EXPORT"
    rm -f "$EXPORT"
    "${BUILDAH[@]}" push "$IMAGE" "docker-archive:$EXPORT:$IMAGE"
fi
"${BUILDAH[@]}" images "$IMAGE"
step "done"
