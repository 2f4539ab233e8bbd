#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the registry's tests and for trying
# several auth nodes on one registry: Debian's `postgresql` package, a
# cluster made with initdb in a work dir, listening only on a unix socket
# there, with durability off (fsync, synchronous_commit) because it holds
# nothing worth keeping.
#
#   scripts/postgres.sh install          apt-get install postgresql, when initdb is missing
#   eval "$(scripts/postgres.sh start)"  make (once) and start the cluster, export its URL
#   scripts/postgres.sh env              print the settings again
#   scripts/postgres.sh stop             stop the cluster (its files stay for the next start)
#   scripts/postgres.sh destroy          stop it and delete its files
#
# `start` prints shell `export` lines: CHUNKVAULT_TEST_POSTGRES (a URL of the
# cluster's `postgres` database as its superuser `chunkvault`; the tests
# create a database of their own in it for each test) and
# CHUNKVAULT_REQUIRE_POSTGRES=1 (tests fail rather than skip when the
# cluster cannot be reached). Everything else goes to stderr. Starting a
# running cluster only prints the settings.
#
# PostgreSQL refuses to run as root: as root, the cluster belongs to the
# `postgres` user the package creates (commands run through runuser);
# otherwise to the caller.
#
# Settings: CHUNKVAULT_POSTGRES_DIR (work dir, default
# /tmp/chunkvault-postgres), CHUNKVAULT_POSTGRES_PORT (names the socket,
# default 39300; nothing listens on TCP).
set -euo pipefail

WORK=${CHUNKVAULT_POSTGRES_DIR:-/tmp/chunkvault-postgres}
PORT=${CHUNKVAULT_POSTGRES_PORT:-39300}
DATA=$WORK/data
SUPERUSER=chunkvault

log() { echo "postgres: $*" >&2; }
die() { log "$*"; exit 1; }

# The newest installed server's bin directory (Debian keeps them versioned).
bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $dir && -x $dir/initdb ]] || return 1
    echo "$dir"
}

# Runs a command as the cluster's owner (from /, which it can read
# whatever directory the caller is in).
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

install() {
    if bindir >/dev/null; then
        return
    fi
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    log "installing Debian's postgresql package"
    $sudo apt-get update -qq >&2
    # The package's own cluster is not needed; it may or may not be made
    # (there is no init system to start it in a container).
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
    bindir >/dev/null || die "apt-get installed postgresql but no initdb is in /usr/lib/postgresql/*/bin"
}

print_env() {
    # The socket directory goes in the query (`host=/dir`): tokio-postgres
    # and libpq both read it there.
    echo "export CHUNKVAULT_TEST_POSTGRES='postgresql://$SUPERUSER@/postgres?host=$WORK&port=$PORT'"
    echo "export CHUNKVAULT_REQUIRE_POSTGRES=1"
}

running() {
    local bin
    bin=$(bindir) || return 1
    [[ -f $DATA/PG_VERSION ]] && as_owner "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start() {
    local bin
    bin=$(bindir) || die "PostgreSQL is not installed: run scripts/postgres.sh install"
    if running; then
        log "already running in $WORK"
        print_env
        return
    fi
    mkdir -p "$WORK"
    if [[ $(id -u) -eq 0 ]]; then
        getent passwd postgres >/dev/null || die "no postgres user (the postgresql package makes it)"
        chown postgres: "$WORK"
    fi
    chmod 700 "$WORK"
    if [[ ! -f $DATA/PG_VERSION ]]; then
        rm -rf "$DATA"
        log "initdb in $DATA"
        # Trust is safe here: the only way in is the socket in a 0700 directory.
        as_owner "$bin/initdb" -D "$DATA" -U "$SUPERUSER" -A trust --no-sync -E UTF8 --locale C >"$WORK/initdb.log" 2>&1 ||
            { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
    fi
    # -w waits (bounded by -t) until the server accepts connections.
    as_owner "$bin/pg_ctl" -D "$DATA" -l "$WORK/server.log" -w -t 60 start -o \
        "-c listen_addresses='' -c unix_socket_directories='$WORK' -p $PORT -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >&2 ||
        { tail -n 30 "$WORK/server.log" >&2; die "the server did not start (log: $WORK/server.log)"; }
    log "running: socket in $WORK, port $PORT"
    print_env
}

stop() {
    local bin
    bin=$(bindir) || return 0
    if running; then
        as_owner "$bin/pg_ctl" -D "$DATA" -m fast -w stop >&2
    fi
}

case "${1:-}" in
install) install ;;
start) start ;;
env) print_env ;;
stop) stop ;;
destroy) stop; rm -rf "$WORK" ;;
*) sed -n '2,27p' "$0" >&2; exit 2 ;;
esac
