#!/usr/bin/env bash
# README's test command: installs what is missing, builds, runs every ctest label
# (unit, fuzz, integration). Integration tests start their own redis-server, promptq-devkafka
# and promptq-sim processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/install-deps.sh
deploy/dev/build.sh ${PQ_CMAKE_ARGS:-}
cd build
ctest -L 'unit|fuzz' -j"$(nproc)" --output-on-failure
ctest -L integration --output-on-failure --timeout "$((900 * ${PQ_TIMEOUT_MULT:-1}))"
