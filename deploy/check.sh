#!/usr/bin/env bash
# Checks the deploy files against the programs in build/bin (CI runs it after the build):
#   - every example config and the Helm chart's default config load (--check-config of both
#     programs), with placeholder values for the ${VAR}s they name;
#   - docker-compose.yml is a valid compose file (docker-compose config);
#   - the systemd units verify (systemd-analyze verify, with ExecStart pointed at build/bin;
#     any complaint, even an "unknown key" warning, fails);
#   - the chart's static YAML lints (yamllint, deploy/.yamllint);
#   - the stunnel example for Redis over TLS loads (stunnel, listening on loopback for a moment).
# Needs docker-compose, yamllint and stunnel4 (Debian packages; .ci/run installs them). The chart's
# templates are not rendered here (no helm in Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/build/bin"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

check_config() { # file
    local vars=() v
    for v in $(grep -o '\${[A-Za-z_][A-Za-z0-9_]*}' "$1" | sort -u | tr -d '${}'); do
        vars+=("$v=placeholder-$v")
    done
    env "${vars[@]}" "$bin/promptq-broker" --check-config --config "$1" >"$tmp/out" 2>&1 ||
        { cat "$tmp/out" >&2; echo "deploy check: $1 does not load (promptq-broker)" >&2; exit 1; }
    env "${vars[@]}" "$bin/promptq-worker" --check-config --config "$1" >"$tmp/out" 2>&1 ||
        { cat "$tmp/out" >&2; echo "deploy check: $1 does not load (promptq-worker)" >&2; exit 1; }
    echo "config $1: loads"
}

for f in deploy/examples/*.json; do
    check_config "$f"
done
python3 - "$tmp/helm-config.json" <<'PY'
import json, sys, yaml
values = yaml.safe_load(open("deploy/helm/promptq/values.yaml"))
cfg = values["config"]
cfg.setdefault("broker", {})["listen"] = "127.0.0.1:8080"  # the chart sets these two
cfg["broker"]["spool_dir"] = "/tmp/promptq-helm-check-spool"
json.dump(cfg, open(sys.argv[1], "w"))
PY
check_config "$tmp/helm-config.json"

docker-compose -f deploy/docker-compose.yml config -q
echo "compose deploy/docker-compose.yml: valid"

for u in deploy/systemd/*.service; do
    # a template unit verifies as an instance of itself
    sed "s#/usr/local/bin/#$bin/#g" "$u" >"$tmp/$(basename "$u" | sed 's/@\.service$/@1.service/')"
done
if ! systemd-analyze verify --man=no "$tmp"/*.service >"$tmp/verify" 2>&1 || [ -s "$tmp/verify" ]; then
    cat "$tmp/verify" >&2
    echo "deploy check: systemd-analyze verify complained about deploy/systemd" >&2
    exit 1
fi
echo "systemd deploy/systemd/*.service: verified"

yamllint -s -c deploy/.yamllint deploy/helm/promptq/values.yaml deploy/helm/promptq/Chart.yaml
echo "yamllint deploy/helm/promptq: clean"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed "s/^accept = .*/accept = 127.0.0.1:$port/" deploy/examples/stunnel-redis.conf >"$tmp/stunnel.conf"
timeout 2 stunnel "$tmp/stunnel.conf" >"$tmp/stunnel.log" 2>&1 || true
if ! grep -q "Configuration successful" "$tmp/stunnel.log"; then
    cat "$tmp/stunnel.log" >&2
    echo "deploy check: deploy/examples/stunnel-redis.conf does not load" >&2
    exit 1
fi
echo "stunnel deploy/examples/stunnel-redis.conf: loads"
