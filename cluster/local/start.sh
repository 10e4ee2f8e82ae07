#!/usr/bin/env bash
# Start a single-node Ray on this machine with token authentication, its dashboard and Jobs API on
# 127.0.0.1 only.
#
# Usage: cluster/local/start.sh [NUM_CPUS [extra `ray start` options ...]]   (NUM_CPUS default 4)
#
# Environment (all optional):
#   RAY_AUTH_TOKEN_PATH    the token file; default ~/.ray/auth_token, where Ray clients look for it.
#                          Created with mode 0600 if missing; an existing one is kept (and set to 0600).
#   IMGCLS_RAY_PORT        GCS port, default 6379; cluster/local/stop.sh finds the cluster by it.
#   IMGCLS_DASHBOARD_PORT  dashboard and Jobs API port, default 8265.
#   IMGCLS_RAY_TEMP_DIR    Ray's session and log folder, default /tmp/imgcls-ray-$UID. Not Ray's
#                          default /tmp/ray: a cluster recorded there is joined by every `ray.init()`
#                          without an address on this machine, so jobs run without RAY_ADDRESS and
#                          the test suite would no longer start their own private Ray.
#   IMGCLS_BASE_DIR        base of relative paths in jobs, also under `ray job submit`; default this checkout.
#
# Ray has no loopback-only mode for its other ports: the GCS, raylet, agents and Ray Client server
# listen on this machine's address (Ray replaces 127.0.0.1 given as node address by it). Token
# authentication guards every one of them; only the metrics exporters answer without it (read-only).
# On a shared network, a host firewall that drops those ports from outside closes them too.
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
venv_bin="${repo_root}/.venv/bin"
ray_bin="${venv_bin}/ray"
[ -x "$ray_bin" ] || ray_bin="ray"

num_cpus="${1:-4}"
[ "$#" -gt 0 ] && shift
gcs_port="${IMGCLS_RAY_PORT:-6379}"
dashboard_port="${IMGCLS_DASHBOARD_PORT:-8265}"
token_path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
temp_dir="${IMGCLS_RAY_TEMP_DIR:-/tmp/imgcls-ray-$(id -u)}"

# Token authentication: anyone who reaches the Jobs API can run code (CVE-2023-48022).
# The token file is created private (0600 from its first byte), see cluster/make_token.sh.
"${repo_root}/cluster/make_token.sh" "$token_path"
export RAY_AUTH_MODE=token
# `ray start` reads the token from RAY_AUTH_TOKEN_PATH, else from ~/.ray/auth_token.
[ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && export RAY_AUTH_TOKEN_PATH

# TensorFlow C++ start-up chatter (CUDA probing on CPU nodes) buries the useful log lines.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export IMGCLS_BASE_DIR="${IMGCLS_BASE_DIR:-$repo_root}"
[ -d "$venv_bin" ] && export PATH="${venv_bin}:${PATH}"

"$ray_bin" start --head \
    --num-cpus "$num_cpus" \
    --port "$gcs_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true \
    --temp-dir "$temp_dir" \
    --disable-usage-stats \
    "$@"

client_env="RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:${dashboard_port}"
[ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && client_env="${client_env} RAY_AUTH_TOKEN_PATH=${token_path}"
echo "Ray is up with token authentication (token file ${token_path}). Submit jobs from this checkout:"
echo "  export ${client_env}"
echo "  ray job submit --runtime-env cluster/runtime_env.yaml --entrypoint-num-cpus 1 -- \\"
echo "      python jobs/train.py --config examples/configs/digits.yaml"
echo "Logs: ${temp_dir}/session_latest/logs. Stop it with: cluster/local/stop.sh"
