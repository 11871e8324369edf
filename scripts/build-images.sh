#!/usr/bin/env bash
# Builds the mesh's container images from docker/Dockerfile, one target each:
#   HUB/proxy, HUB/pilot, HUB/injector and the sample apps
#   HUB/examples-bookinfo-{productpage,details,reviews,ratings},
#   HUB/examples-callme, HUB/examples-caller
# all tagged TAG.
#
# Usage: scripts/build-images.sh [TAG]
#   TAG  default: the workspace version in Cargo.toml
#   HUB  (environment) registry and repository prefix, default: mesh
#
# Progress goes to stderr; the images built are printed on stdout, one a
# line, so another script can capture them.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(
  proxy
  pilot
  injector
  examples-bookinfo-productpage
  examples-bookinfo-details
  examples-bookinfo-reviews
  examples-bookinfo-ratings
  examples-callme
  examples-caller
)

case "${1:-}" in
  -h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
if [ $# -gt 1 ]; then
  echo "usage: scripts/build-images.sh [TAG]" >&2
  exit 64
fi

workspace_version() {
  awk -F'"' '
    /^\[workspace\.package\]/ { inside = 1; next }
    /^\[/ { inside = 0 }
    inside && /^version[[:space:]]*=/ { print $2; exit }
  ' Cargo.toml
}

TAG="${1:-$(workspace_version)}"
HUB="${HUB:-mesh}"
if [ -z "$TAG" ]; then
  echo "error: no TAG given and no version under [workspace.package] in Cargo.toml" >&2
  exit 1
fi

if ! command -v docker >/dev/null 2>&1; then
  echo "error: docker is not installed (or not on PATH); building the images needs Docker with BuildKit" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "error: docker is installed but the Docker daemon does not answer ('docker info' failed); start it or check DOCKER_HOST" >&2
  exit 1
fi

# The Dockerfile's cache mounts need BuildKit (the default since Docker 23).
export DOCKER_BUILDKIT=1

built=()
for target in "${TARGETS[@]}"; do
  image="$HUB/$target:$TAG"
  printf '\n==> %s\n' "docker build --target $target -t $image" >&2
  # The first target compiles everything; the others reuse the build stage.
  docker build --target "$target" -t "$image" -f docker/Dockerfile . >&2
  built+=("$image")
done

printf '\n==> built %d images:\n' "${#built[@]}" >&2
printf '%s\n' "${built[@]}"
