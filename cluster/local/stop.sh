#!/usr/bin/env bash
# Stop the single-node Ray started by cluster/local/start.sh.
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
ray_bin="${repo_root}/.venv/bin/ray"
[ -x "$ray_bin" ] || ray_bin="ray"
"$ray_bin" stop
