#!/usr/bin/env bash
# A 3-node Garage cluster on 127.0.0.1 (replication factor 3) for tests,
# benchmarks and trying chunkvault's S3 backend.
#
#   scripts/garage-cluster.sh install        build Garage once (cached, ~20+ min on 2 cores)
#   eval "$(scripts/garage-cluster.sh start)" start the cluster, export its settings
#   scripts/garage-cluster.sh env             print the settings again
#   scripts/garage-cluster.sh stop-node N     stop node N (1-3)
#   scripts/garage-cluster.sh start-node N    start node N again, wait until it is back
#   scripts/garage-cluster.sh stop            stop every node
#
# `start` prints shell `export` lines: CHUNKVAULT_S3_ENDPOINT (node 1's S3
# API), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
# CHUNKVAULT_TEST_S3_BUCKET. Everything else goes to stderr.
#
# Settings: CHUNKVAULT_GARAGE_DIR (work dir, default /tmp/chunkvault-garage),
# CHUNKVAULT_GARAGE_PORT (first port, default 39100; node N uses
# PORT+10*(N-1) for S3, +1 RPC, +3 admin), CHUNKVAULT_TOOLS_DIR (where the
# Garage binary is cached, default ~/.cache/chunkvault-tools).
set -euo pipefail

GARAGE_VERSION=2.5.0
TOOLS=${CHUNKVAULT_TOOLS_DIR:-$HOME/.cache/chunkvault-tools}
GARAGE=$TOOLS/garage-$GARAGE_VERSION/bin/garage
WORK=${CHUNKVAULT_GARAGE_DIR:-/tmp/chunkvault-garage}
BASE_PORT=${CHUNKVAULT_GARAGE_PORT:-39100}
BUCKET=chunkvault-test
REGION=garage
NODES=(1 2 3)

log() { echo "garage-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

s3_port() { echo $((BASE_PORT + 10 * ($1 - 1))); }
rpc_port() { echo $((BASE_PORT + 10 * ($1 - 1) + 1)); }
admin_port() { echo $((BASE_PORT + 10 * ($1 - 1) + 3)); }
conf() { echo "$WORK/node$1/garage.toml"; }
g() { local n=$1; shift; "$GARAGE" -c "$(conf "$n")" "$@"; }

# Waits (bounded) until "$@" succeeds, polling; no blind sleeps.
wait_for() {
    local what=$1 secs=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${secs}s waiting for $what (logs: $WORK/node*/garage.log)"
        fi
        sleep 0.2
    done
}

install() {
    if [[ -x $GARAGE ]]; then
        return
    fi
    log "building Garage $GARAGE_VERSION into $TOOLS (once per machine; about 20+ minutes on 2 cores)"
    cargo install garage --version "$GARAGE_VERSION" --locked --no-default-features \
        --features bundled-libs,sqlite --root "$TOOLS/garage-$GARAGE_VERSION" \
        --target-dir "${CHUNKVAULT_GARAGE_BUILD_DIR:-/tmp/garage-build}" >&2
    [[ -x $GARAGE ]] || die "cargo install did not produce $GARAGE"
}

write_config() {
    local n=$1 secret=$2 dir=$WORK/node$1
    mkdir -p "$dir/meta" "$dir/data"
    cat >"$(conf "$n")" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$(rpc_port "$n")"
rpc_public_addr = "127.0.0.1:$(rpc_port "$n")"
rpc_secret = "$secret"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$(s3_port "$n")"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$(admin_port "$n")"
EOF
    chmod 600 "$(conf "$n")"
}

pid_of() {
    local f=$WORK/node$1/pid
    [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

start_node() {
    local n=$1
    if pid_of "$n" >/dev/null; then
        return
    fi
    RUST_LOG=${GARAGE_LOG:-warn} nohup "$GARAGE" -c "$(conf "$n")" server >>"$WORK/node$n/garage.log" 2>&1 &
    echo $! >"$WORK/node$n/pid"
    wait_for "node $n to answer" 60 g "$n" status
}

stop_node() {
    local n=$1 pid
    pid=$(pid_of "$n") || return 0
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill -9 "$pid" 2>/dev/null || true; break; }
        sleep 0.1
    done
    rm -f "$WORK/node$n/pid"
}

healthy() {
    g 1 json-api GetClusterHealth | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["status"] != "healthy")'
}

print_env() {
    [[ -f $WORK/env ]] || die "no cluster settings in $WORK (run start first)"
    cat "$WORK/env"
}

start() {
    install
    for n in "${NODES[@]}"; do stop_node "$n"; done
    rm -rf "$WORK"
    mkdir -p "$WORK"
    chmod 700 "$WORK"
    local secret
    secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    for n in "${NODES[@]}"; do
        write_config "$n" "$secret"
        start_node "$n"
    done
    local ids=()
    for n in "${NODES[@]}"; do
        ids+=("$(g "$n" node id -q 2>/dev/null || g "$n" node id)")
    done
    for n in 2 3; do
        g 1 node connect "${ids[$((n - 1))]}" >&2
    done
    for n in "${NODES[@]}"; do
        g 1 layout assign -z dc1 -c 10G "${ids[$((n - 1))]%%@*}" >&2
    done
    g 1 layout apply --version 1 >&2
    wait_for "the cluster to be healthy" 120 healthy
    local key
    key=$(g 1 json-api CreateKey '{"name":"chunkvault-test"}')
    local key_id secret_key
    key_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["accessKeyId"])' <<<"$key")
    secret_key=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["secretAccessKey"])' <<<"$key")
    g 1 bucket create "$BUCKET" >&2
    g 1 bucket allow --read --write --owner "$BUCKET" --key "$key_id" >&2
    umask 077
    cat >"$WORK/env" <<EOF
export CHUNKVAULT_S3_ENDPOINT=http://127.0.0.1:$(s3_port 1)
export AWS_ACCESS_KEY_ID=$key_id
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_REGION=$REGION
export CHUNKVAULT_TEST_S3_BUCKET=$BUCKET
EOF
    log "3 nodes up, bucket $BUCKET, S3 endpoint http://127.0.0.1:$(s3_port 1)"
    print_env
}

node_arg() {
    [[ ${1:-} =~ ^[123]$ ]] || die "expected a node number 1-3, got '${1:-}'"
}

case ${1:-} in
install) install ;;
start) start ;;
env) print_env ;;
stop) for n in "${NODES[@]}"; do stop_node "$n"; done ;;
stop-node) node_arg "${2:-}"; stop_node "$2" ;;
start-node)
    node_arg "${2:-}"
    start_node "$2"
    wait_for "the cluster to be healthy" 120 healthy
    ;;
*) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
