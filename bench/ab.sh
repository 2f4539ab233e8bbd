#!/usr/bin/env bash
# A/B timing of two (or more) chunkvault binaries: alternating backups of one
# corpus into fresh repositories, page cache warmed before each, then the
# median wall, user and system seconds and peak RSS per binary. Use it to
# measure an optimisation before and after on the same machine in one run.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: bench/ab.sh [--runs N] [--workdir DIR] CORPUS BINARY BINARY...

Backs CORPUS up N times (default 5) with each BINARY in turn, each time into
a fresh repository under DIR (default /tmp/cv-ab, removed at the end), and
prints the medians. A corpus made by bench/compare.sh lives at
/tmp/cv-bench/corpus-1024mib-r10-s1; bench/make_corpus.py makes one too.
Copy the "before" binary aside (cp target/release/chunkvault /tmp/cv-before)
before rebuilding the "after" one.
USAGE
}

RUNS=5
WORKDIR=/tmp/cv-ab
while [[ $# -gt 0 ]]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --workdir) WORKDIR=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) break ;;
    esac
done
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "ab.sh: --runs must be a positive integer" >&2; exit 2; }
CORPUS=$1
shift
[[ -d $CORPUS ]] || { echo "ab.sh: $CORPUS is not a directory" >&2; exit 2; }
for b in "$@"; do
    [[ -x $b ]] || { echo "ab.sh: $b is not an executable" >&2; exit 2; }
done
[[ -x /usr/bin/time ]] || { echo "ab.sh: needs GNU time (apt-get install time)" >&2; exit 2; }

export CHUNKVAULT_PASSWORD=ab
mkdir -p "$WORKDIR"
trap 'rm -rf "$WORKDIR"' EXIT
RAW=$WORKDIR/raw.tsv
: >"$RAW"
for ((i = 1; i <= RUNS; i++)); do
    n=0
    for b in "$@"; do
        n=$((n + 1))
        repo=$WORKDIR/repo-$i-$n
        "$b" -q -r "$repo" init >/dev/null
        find "$CORPUS" -type f -print0 | xargs -0 -r cat >/dev/null
        sync
        /usr/bin/time -f '%e %U %S %M' -o "$WORKDIR/time" "$b" -q -r "$repo" backup "$CORPUS" >/dev/null
        printf '%s\t%s\n' "$n" "$(tail -n 1 "$WORKDIR/time")" >>"$RAW"
        rm -rf "$repo"
    done
done
n=0
printf '%-40s %8s %8s %8s %9s   (medians of %s runs; wall s, all runs)\n' binary wall user sys "RSS MiB" "$RUNS"
for b in "$@"; do
    n=$((n + 1))
    awk -F'\t' -v n="$n" '$1 == n { print $2 }' "$RAW" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
med = [statistics.median(c) for c in zip(*rows)]
walls = " ".join(f"{r[0]:.2f}" for r in sorted(rows))
print(f"{sys.argv[1]:<40} {med[0]:8.2f} {med[1]:8.2f} {med[2]:8.2f} {med[3] / 1024:9.0f}   {walls}")
' "$b"
done
