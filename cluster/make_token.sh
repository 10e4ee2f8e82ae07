#!/usr/bin/env bash
# Create a Ray authentication token file that is private from its first byte: the file mode 0600 and,
# when this creates it, its folder 0700 (umask 077 in a subshell). An existing token is kept and set
# to 0600. The token is 32 random bytes in hex, as `ray get-auth-token --generate` makes them.
#
# Usage: cluster/make_token.sh PATH
#   cluster/make_token.sh ~/.ray/auth_token           the local cluster (cluster/local/start.sh does it)
#   cluster/make_token.sh ~/.ray/imgcls-aws-token     one token per cluster: cluster/aws, cluster/kuberay
set -euo pipefail
[ "$#" -eq 1 ] || { echo "usage: $0 PATH" >&2; exit 2; }
token_path="$1"
if [ ! -s "$token_path" ]; then
    (
        umask 077
        mkdir -p "$(dirname "$token_path")"
        od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$token_path"
    )
fi
chmod 600 "$token_path"
