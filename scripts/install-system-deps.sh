#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive for real: headless Chromium and its
# driver (web page test), Prometheus and promtool (rules, scrape test), wrk (load generator), and
# Alertmanager (the drift alert's route into the operator), the real node's parts: docker (image builds), containerd + runc (the kubelet's runtime), the CNI
# plugins, iptables and conntrack (kube-proxy), mmdebstrap (base images without a registry).
# Idempotent and quick when everything is there; needs root (or sudo) only when something is missing.
set -euo pipefail

declare -A wanted=(
  [chromium]=/usr/bin/chromium
  [chromium-driver]=/usr/bin/chromedriver
  [prometheus]=/usr/bin/promtool
  [wrk]=/usr/bin/wrk
  [openssl]=/usr/bin/openssl
  [docker.io]=/usr/sbin/dockerd
  [containerd]=/usr/bin/containerd
  [runc]=/usr/sbin/runc
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [iptables]=/usr/sbin/iptables
  [conntrack]=/usr/sbin/conntrack
  [iproute2]=/usr/sbin/ip
  [mmdebstrap]=/usr/bin/mmdebstrap
  [prometheus-alertmanager]=/usr/bin/prometheus-alertmanager
)
missing=()
for package in "${!wanted[@]}"; do
  [ -x "${wanted[$package]}" ] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}" >&2
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
