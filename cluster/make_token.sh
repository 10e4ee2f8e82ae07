#!/usr/bin/env bash
# Create a Ray authentication token file that is private from its first byte: the file mode 0600 and,
# when this creates it, its folder 0700 (umask 077). An existing non-empty token of the current user is
# kept and set to 0600. The token is 32 random bytes in hex, as `ray get-auth-token --generate` makes them.
#
# Never writes into an existing file: a new token goes into a fresh temporary file in the same folder,
# which is then renamed into place, so a file someone else planted (empty, or readable by them) and a
# symlink pointing elsewhere are never filled with the secret. Both are refused (exit 2).
#
# Usage: cluster/make_token.sh PATH
#   cluster/make_token.sh ~/.ray/auth_token           the local cluster (cluster/local/start.sh does it)
#   cluster/make_token.sh ~/.ray/imgcls-aws-token     one token per cluster: cluster/aws, cluster/kuberay
set -euo pipefail
[ "$#" -eq 1 ] || { echo "usage: $0 PATH" >&2; exit 2; }
token_path="$1"
shown="${token_path:0:200}"  # a path is echoed in an error message at most this long

refuse() {
    echo "make_token.sh: $1" >&2
    exit 2
}

# -L first: the other tests follow a symlink, to a target that may belong to anyone.
if [ -L "$token_path" ]; then
    refuse "$shown is a symlink; give the path of the token file itself"
fi
if [ -e "$token_path" ]; then
    [ -f "$token_path" ] || refuse "$shown exists and is not a regular file"
    [ -O "$token_path" ] || refuse "$shown exists and belongs to another user; remove it or choose another path"
    if [ -s "$token_path" ]; then
        chmod 600 "$token_path"
        exit 0
    fi
fi

umask 077
folder="$(dirname -- "$token_path")"
mkdir -p -- "$folder"
token="$(od -An -vtx1 -N32 /dev/urandom | tr -d ' \n')"
[[ "$token" =~ ^[0-9a-f]{64}$ ]] || refuse "could not read 32 random bytes from /dev/urandom"
temporary="$(mktemp "$folder/.$(basename -- "$token_path").XXXXXXXX")"
trap 'rm -f -- "$temporary"' EXIT
printf '%s' "$token" >"$temporary"
chmod 600 "$temporary"
# rename(2) replaces the name, never the contents of what it named (even a symlink put there since).
mv -f -- "$temporary" "$token_path"
trap - EXIT
