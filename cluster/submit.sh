#!/usr/bin/env bash
# `ray job submit` for schedules and alerting: submit, follow the job's logs, then exit with the
# job's own exit code: 0 succeeded, 2 a user error, 1 an internal failure. A job stopped before its
# end (`ray job stop`, a lost driver) also exits 1, where `ray job submit` alone exits 0.
#
# Usage: cluster/submit.sh [ray job submit options ...] -- ENTRYPOINT ...
#   cluster/submit.sh --runtime-env cluster/runtime_env.yaml --entrypoint-num-cpus 1 -- \
#       python jobs/predict.py --model runs/digits/model --input examples/data/digits/test \
#       --output runs/digits/predictions --set num_actors=2
#
# The cluster and the token come as for `ray job submit`: RAY_ADDRESS (or --address), RAY_AUTH_MODE=token
# and the token (RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token or RAY_AUTH_TOKEN). Without --submission-id
# the job gets imgcls-<UTC date and time>-<random>; the first log line names it.
set -uo pipefail
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
ray_bin="${repo_root}/.venv/bin/ray"
python_bin="${repo_root}/.venv/bin/python"
[ -x "$ray_bin" ] || ray_bin="ray"
[ -x "$python_bin" ] || python_bin="python"

options=()
submission_id=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        --submission-id=*) submission_id="${1#*=}" ;;
        --submission-id) submission_id="${2:-}"; options+=("$1"); shift ;;
        --address=*) export RAY_API_SERVER_ADDRESS="${1#*=}" ;;
        --address) export RAY_API_SERVER_ADDRESS="${2:-}"; options+=("$1"); shift ;;
    esac
    options+=("$1")
    shift
done
if [ "$#" -lt 2 ]; then
    echo "usage: $0 [ray job submit options ...] -- ENTRYPOINT ..." >&2
    exit 2
fi
shift  # the --
if [ -z "$submission_id" ]; then
    submission_id="imgcls-$(date -u +%Y%m%d-%H%M%S)-${RANDOM}"
    options+=(--submission-id "$submission_id")
fi
echo "imgcls: submitting job ${submission_id}" >&2

"$ray_bin" job submit ${options[@]+"${options[@]}"} -- "$@"
submitted=$?

# The job's final state from the Jobs API; only SUCCEEDED is success.
"$python_bin" - "$submission_id" "$submitted" <<'EOF'
import sys

from ray.job_submission import JobStatus, JobSubmissionClient

submission_id, submitted = sys.argv[1], int(sys.argv[2])
try:
    info = JobSubmissionClient().get_job_info(submission_id)
except Exception as error:  # the cluster is gone, or the job never got there
    print(f"imgcls: no state for job {submission_id} ({error}); `ray job submit` exited {submitted}", file=sys.stderr)
    sys.exit(1 if submitted in (0, 1) else submitted)
code = 0 if info.status == JobStatus.SUCCEEDED else info.driver_exit_code if info.driver_exit_code in (1, 2) else 1
print(f"imgcls: job {submission_id} {info.status.value}, driver exit code {info.driver_exit_code}; exit {code}",
      file=sys.stderr)
sys.exit(code)
EOF
