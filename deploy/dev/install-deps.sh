#!/usr/bin/env bash
# Installs the Debian packages promptq builds and tests with, skipping those already present.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail

pkgs=(build-essential cmake pkg-config git ca-certificates
      librdkafka-dev libcurl4-openssl-dev libjansson-dev libhiredis-dev libevent-dev libssl-dev
      libcmocka-dev redis-server kcat python3 curl procps openssl)

# tests/node (the OpenAI SDK against the broker) needs Node.js 20 and npm; bookworm ships 18, so
# a newer one (e.g. NodeSource) that is already installed is kept.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    pkgs+=(nodejs npm)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packaged redis-server starts a system instance on 6379; promptq's tests start their own on
# random ports and do not need it.
