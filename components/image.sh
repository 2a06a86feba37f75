#!/usr/bin/env bash
# `make image-test`: the container image, for real, on a machine without Docker Hub. Starts a
# Docker engine if none answers (own socket and data root, stopped afterwards), makes a Debian
# bookworm base with debootstrap, builds components/Dockerfile on it (variants in
# DUDCH_IMAGE_VARIANTS: "cpu", the default, and/or "cuda"), starts a loopback registry, pushes
# the image, compiles build/pipeline.yaml against the pushed digest, then runs tests/test_image.py:
# the pipeline on a small subset with KFP's DockerRunner (every stage in the image) against the
# same run with the subprocess runner. Writes benchmarks/results/image.md. Needs root (dockerd)
# and Debian's docker.io, docker-registry and debootstrap (installed when missing).
# DUDCH_IMAGE_NO_CACHE=1 builds without the layer cache (for the build time in image.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${DUDCH_IMAGE_WORK:-/tmp/dudch-image}
VARIANTS=${DUDCH_IMAGE_VARIANTS:-cpu}
REGISTRY_PORT=${DUDCH_REGISTRY_PORT:-5555}
TORCH_CPU_WHEEL=${DUDCH_TORCH_CPU_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1)}
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DOCKER=/usr/bin/docker  # Debian's CLI: it builds with BuildKit without the buildx plugin
export DOCKER_HOST=${DOCKER_HOST:-unix://$WORK/docker.sock} DOCKER_BUILDKIT=1
mkdir -p "$WORK" build/wheels benchmarks/results
started_engine= registry_pid=

cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
  if [ -n "$started_engine" ]; then kill "$(cat "$WORK/docker.pid")" 2>/dev/null || true; fi
}
trap cleanup EXIT

for tool in dockerd:docker.io docker-registry:docker-registry debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${tool#*:}" >/dev/null
done

if ! $DOCKER info >/dev/null 2>&1; then
  echo "starting dockerd ($DOCKER_HOST, data in $WORK/root)"
  dockerd --host "$DOCKER_HOST" --data-root "$WORK/root" --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" \
    --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
  started_engine=1
  for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
  $DOCKER info >/dev/null
fi

if ! $DOCKER image inspect local/debian:bookworm >/dev/null 2>&1; then
  echo "making the base image: debootstrap bookworm from $MIRROR"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | $DOCKER import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - local/debian:bookworm >/dev/null
  rm -rf "$WORK/rootfs"
fi

declare -A build_s size_b
for variant in $VARIANTS; do
  rm -f build/wheels/*.whl
  torch=torch==2.13.0  # PyPI's x86_64 wheel: the CUDA build
  if [ "$variant" = cpu ]; then
    cp "$TORCH_CPU_WHEEL" build/wheels/
    torch=$(basename "$TORCH_CPU_WHEEL")
  fi
  echo "building local/dudch-python:$variant"
  start=$(date +%s)
  # Host network: the build reaches the package registries as this machine does; the CA bundle
  # is a build secret, in no layer.
  $DOCKER build ${DUDCH_IMAGE_NO_CACHE:+--no-cache} --network host --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
    --build-arg BASE=local/debian:bookworm --build-arg TORCH="$torch" \
    -f components/Dockerfile -t "local/dudch-python:$variant" . >"$WORK/build-$variant.log" 2>&1 \
    || { tail -20 "$WORK/build-$variant.log"; exit 1; }
  build_s[$variant]=$(( $(date +%s) - start ))
  size_b[$variant]=$($DOCKER image inspect --format '{{.Size}}' "local/dudch-python:$variant")
done
rm -f build/wheels/*.whl

mkdir -p "$WORK/registry"
cat >"$WORK/registry.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: 127.0.0.1:$REGISTRY_PORT
EOF
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
registry_pid=$!
sleep 2
variant=${VARIANTS%% *}
$DOCKER tag "local/dudch-python:$variant" "127.0.0.1:$REGISTRY_PORT/dudch-python:$variant"
start=$(date +%s)
$DOCKER push "127.0.0.1:$REGISTRY_PORT/dudch-python:$variant" >"$WORK/push.log"
push_s=$(( $(date +%s) - start ))
digest=$($DOCKER image inspect --format '{{join .RepoDigests "\n"}}' "local/dudch-python:$variant" \
         | grep "^127.0.0.1:$REGISTRY_PORT/" | head -1)
echo "pushed $digest"
DUDCH_IMAGE=$digest .venv/bin/dudch compile --output build/pipeline.yaml >/dev/null

DUDCH_IMAGE_UNDER_TEST=$digest DUDCH_IMAGE_REPORT="$WORK/report.json" .venv/bin/pytest -q tests/test_image.py

{
  echo "# The container image"
  echo
  echo "Machine: $(.venv/bin/python -c 'from benchmarks.quality import machine; print(machine())'). Docker $($DOCKER version --format '{{.Server.Version}}'),"
  echo "base \`local/debian:bookworm\` (debootstrap minbase). Command: \`${DUDCH_IMAGE_NO_CACHE:+DUDCH_IMAGE_NO_CACHE=1 }DUDCH_IMAGE_VARIANTS=\"$VARIANTS\" make image-test\`"
  echo "at commit $(git rev-parse --short HEAD)."
  echo
  echo "| variant | build time ($([ -n "${DUDCH_IMAGE_NO_CACHE:-}" ] && echo "no layer cache" || echo "layer cache allowed")) | image size |"
  echo "|---|---|---|"
  for v in $VARIANTS; do
    echo "| $v | ${build_s[$v]} s | $(( size_b[$v] / 1000000 )) MB |"
  done
  echo
  echo "Pushed to a loopback registry (\`docker-registry\`) in ${push_s} s as \`$digest\`;"
  echo "build/pipeline.yaml compiled against that digest."
  echo
  .venv/bin/python - "$WORK/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"The pipeline on {report['items']} drawings, {report['bits']} bits, the same seed, run twice:")
print(f"KFP DockerRunner (every task in the image) {report['docker']['wall_s']:.0f} s, subprocess runner "
      f"{report['subprocess']['wall_s']:.0f} s. Per stage (each stage's MLflow `stage_wall_time_s`):")
print()
print("| stage | DockerRunner | subprocess |")
print("|---|---|---|")
for stage, seconds in report["docker"]["stages"].items():
    print(f"| {stage} | {seconds:.1f} s | {report['subprocess']['stages'][stage]:.1f} s |")
print()
print(f"Same results: {report['same']}. The image features of these drawings were already in the shared "
      f"cache (.dudch/cache, by content), so prepare only read them in both runs.")
PY
} > benchmarks/results/image.md
cat benchmarks/results/image.md
