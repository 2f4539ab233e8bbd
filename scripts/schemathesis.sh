#!/usr/bin/env bash
# Schemathesis (a third-party OpenAPI client and fuzzer) against a live
# `chunkvault serve`: every operation of /v1/openapi.json, with the admin
# token and a real device's session token. The run fails on any 5xx (but
# the uploads' documented 507 quota refusal) and on any response that does not conform to the document (status, content
# type, body schema).
#
# Schemathesis is installed, pinned, into a venv under ~/.cache on the first
# run. The run is bounded by ST_MAX_TIME seconds (default 300). The binary is target/debug/chunkvault (built if missing), or
# $CHUNKVAULT_BIN. ST_MAX_EXAMPLES bounds the examples per operation.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
venv="${XDG_CACHE_HOME:-$HOME/.cache}/chunkvault-tools/schemathesis-$ST_VERSION"
if [ ! -x "$venv/bin/schemathesis" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

bin=${CHUNKVAULT_BIN:-target/debug/chunkvault}
if [ ! -x "$bin" ]; then
    cargo build --bin chunkvault
fi

work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

secret() { head -c 24 /dev/urandom | base64 | tr -d '/+='; }
export CHUNKVAULT_PASSWORD; CHUNKVAULT_PASSWORD=$(secret)
export ST_ADMIN_TOKEN; ST_ADMIN_TOKEN=$(secret)
CHUNKVAULT_ADMIN_TOKEN=$ST_ADMIN_TOKEN "$bin" serve --listen 127.0.0.1:0 --root "$work/root" \
    --tenant-kdf-memory-kib 1024 --tenant-kdf-iterations 1 --session-ttl-secs 3600 \
    >"$work/stdout" 2>"$work/server.log" &
pid=$!
url=
for _ in $(seq 1 600); do
    url=$(sed -n 's/^listening on //p' "$work/stdout")
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log"; echo "the server did not start" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "the server did not say where it listens" >&2; exit 1; }

# A device of tenant `ci` with one snapshot, and its session token. The
# device id is random, so that the fuzzed admin routes do not retire it.
export CHUNKVAULT_ADMIN_TOKEN=$ST_ADMIN_TOKEN
deployment=$("$bin" admin --server "$url" deployment-token create --tenant ci)
device="ci-$(secret | head -c 12)"
cat >"$work/managed.json" <<JSON
{"serverURL": "$url", "userEmail": "ci@example.com", "deploymentToken": "$deployment", "deviceId": "$device"}
JSON
export CHUNKVAULT_DEVICE_STATE="$work/device"
"$bin" device activate --managed-config "$work/managed.json" >/dev/null
mkdir -p "$work/data/docs"
echo "hello" >"$work/data/docs/a.txt"
head -c 300000 /dev/urandom >"$work/data/b.bin"
"$bin" device backup "$work/data" >/dev/null
export ST_SESSION_TOKEN
ST_SESSION_TOKEN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["session"]["token"])' \
    "$work/device/state.json")
unset CHUNKVAULT_ADMIN_TOKEN CHUNKVAULT_DEVICE_STATE

cat >"$work/schemathesis.toml" <<'TOML'
[auth.openapi.admin_token]
bearer = "${ST_ADMIN_TOKEN}"

[auth.openapi.session_token]
bearer = "${ST_SESSION_TOKEN}"

# The fuzzed admin routes may set a quota on tenant `ci` (schemathesis
# learns its name from GET /v1/admin/tenants); the uploads then answer the
# documented 507 `quota_exceeded`, a refusal and not a server fault. Every
# other 5xx on them still fails the run.
[[operations]]
include-name = ["PUT /v1/chunks/{id}", "POST /v1/chunks/bundle"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "507"]
TOML

# Failed activations are throttled per address (429, documented); the
# run's own traffic would hit that limit, which is the point of it.
# From the temporary directory, where schemathesis leaves its cache.
status=0
cd "$work"
"$venv/bin/schemathesis" --no-color --config-file "$work/schemathesis.toml" run "$url/v1/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples "${ST_MAX_EXAMPLES:-40}" \
    --max-time "${ST_MAX_TIME:-300}" \
    --phases examples,coverage,fuzzing \
    --workers 2 \
    --request-timeout 30 || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- server log (last 50 lines)"
    tail -50 "$work/server.log"
fi
exit "$status"
