#!/usr/bin/env bash
# Quick start: installs what is missing, builds, and runs promptq's main job on the embedded
# stack (promptq-devkafka, redis-server, promptq-sim, promptq-broker, promptq-worker, all on
# loopback): a batch of prompts through a provider outage.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/install-deps.sh
deploy/dev/build.sh
exec python3 deploy/dev/demo.py "$@"
