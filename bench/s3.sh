#!/usr/bin/env bash
# Backup and restore throughput of one corpus to a local repository and to
# the 3-node Garage cluster (scripts/garage-cluster.sh), in the same run, and
# the S3 requests sent per GiB backed up.
#
#   bench/s3.sh [--size-mib N] [--workdir DIR] [--chunkvault PATH]
#
# Defaults: 1024 MiB corpus (bench/make_corpus.py, 10% random data), workdir
# /tmp/cv-bench-s3, chunkvault built with cargo build --release. Uses the
# cluster whose settings are in the environment, or starts one (and stops it
# at the end). Prints a markdown table; every command's output is in
# WORKDIR/bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=1024
WORK=/tmp/cv-bench-s3
BIN=
while (($#)); do
    case $1 in
    --size-mib) SIZE=$2; shift 2 ;;
    --workdir) WORK=$2; shift 2 ;;
    --chunkvault) BIN=$2; shift 2 ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
    esac
done
mkdir -p "$WORK"
LOG=$WORK/bench.log
: >"$LOG"

if [[ -z $BIN ]]; then
    cargo build --release --quiet
    BIN=target/release/chunkvault
fi
if [[ -z ${CHUNKVAULT_TEST_S3_BUCKET:-} ]]; then
    eval "$(scripts/garage-cluster.sh start)"
    trap 'scripts/garage-cluster.sh stop' EXIT
fi

CORPUS=$WORK/corpus-${SIZE}mib
python3 bench/make_corpus.py "$CORPUS" --size-mib "$SIZE" >>"$LOG"
BYTES=$(du -sb --apparent-size "$CORPUS" | cut -f1)
export CHUNKVAULT_PASSWORD=bench
export CHUNKVAULT_CACHE_DIR=$WORK/cache

now() { date +%s.%N; }
rate() { python3 -c "import sys; print(f'{$BYTES / ($2 - $1) / 2**20:.1f}')"; }

row() {
    local name=$1 repo=$2
    rm -rf "$WORK/repo" "$WORK/restore" "$CHUNKVAULT_CACHE_DIR"
    export CHUNKVAULT_REPO=$repo
    "$BIN" init >>"$LOG" 2>&1
    local t0 t1 t2
    t0=$(now)
    CHUNKVAULT_LOG=chunkvault::backend::s3=debug "$BIN" backup --quiet "$CORPUS" >>"$LOG" 2>"$WORK/backup.err"
    t1=$(now)
    CHUNKVAULT_LOG=chunkvault::backend::s3=debug "$BIN" restore latest --target "$WORK/restore" >>"$LOG" 2>"$WORK/restore.err"
    t2=$(now)
    cat "$WORK/backup.err" "$WORK/restore.err" >>"$LOG"
    diff -r -q "$CORPUS" "$WORK/restore$CORPUS" >>"$LOG"
    echo "| $name | $(rate "$t0" "$t1") | $(rate "$t1" "$t2") | $(requests "$WORK/backup.err") | $(requests "$WORK/restore.err") |"
}

# S3 requests per GiB of corpus, from the backend's closing debug line.
requests() {
    grep -s "S3 backend closed" "$1" | python3 -c "
import re, sys
n = {k: int(v) for k, v in re.findall(r'(put|get|head|list|delete): (\d+)', sys.stdin.read())}
gib = $BYTES / 2**30
parts = ', '.join(f'{k} {v / gib:.0f}' for k, v in n.items() if v)
print(f'{sum(n.values()) / gib:.0f} ({parts})' if n else '-')"
}

echo "Corpus: $SIZE MiB ($BYTES bytes) from bench/make_corpus.py; $(nproc) cores; $(date -u +%F)"
echo
echo "| repository | backup MiB/s | restore MiB/s | S3 requests per GiB, backup | S3 requests per GiB, restore |"
echo "| --- | --- | --- | --- | --- |"
row "local directory" "$WORK/repo"
row "Garage, 3 nodes, replication 3 (loopback)" "s3://$CHUNKVAULT_TEST_S3_BUCKET/bench-$(date +%s)"
