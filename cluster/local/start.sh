#!/usr/bin/env bash
# Start a single-node Ray on this machine, reachable from 127.0.0.1 only.
# Usage: cluster/local/start.sh [NUM_CPUS]   (default 4)
# Relative paths in jobs resolve against this checkout (IMGCLS_BASE_DIR), also for `ray job submit`.
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
ray_bin="${repo_root}/.venv/bin/ray"
[ -x "$ray_bin" ] || ray_bin="ray"
# TensorFlow C++ start-up chatter (CUDA probing on CPU nodes) buries the useful log lines.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export IMGCLS_BASE_DIR="${IMGCLS_BASE_DIR:-$repo_root}"
export PATH="${repo_root}/.venv/bin:${PATH}"
# Token authentication: anyone who reaches the Jobs API can run code (CVE-2023-48022).
export RAY_AUTH_MODE=token
"$ray_bin" get-auth-token --generate >/dev/null
chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
"$ray_bin" start --head \
    --num-cpus "${1:-4}" \
    --node-ip-address 127.0.0.1 \
    --dashboard-host 127.0.0.1 --dashboard-port 8265 \
    --disable-usage-stats
echo "Ray is up with token authentication. Submit jobs with:"
echo "  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265"
echo "  ray job submit --working-dir . -- python jobs/train.py --config examples/configs/digits.yaml"
