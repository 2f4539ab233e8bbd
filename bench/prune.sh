#!/usr/bin/env bash
# Prune benchmark: chunkvault prune against restic prune on the same history.
#
# Builds a corpus (bench/make_corpus.py), takes N snapshots of it with both
# tools, changing a few percent of the files between snapshots, forgets all
# but the newest K with each tool, then times `chunkvault prune` and
# `restic prune` with /usr/bin/time -v (wall time and peak RSS) and checks
# both repositories afterwards. Prints a markdown table (also written to
# WORKDIR/prune-results.md); every command's output goes to WORKDIR/prune.log.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

SIZE_MIB=1024
SNAPSHOTS=30
CHANGE_PERCENT=3
KEEP_LAST=5
WORKDIR=/tmp/cv-prune-bench
CHUNKVAULT=""
MAX_UNUSED=5

usage() {
    cat <<EOF
Usage: bench/prune.sh [options]

  --size-mib N          corpus size in MiB (default $SIZE_MIB)
  --snapshots N         snapshots taken (default $SNAPSHOTS)
  --change-percent P    share of files changed between snapshots (default $CHANGE_PERCENT)
  --keep-last K         snapshots kept by forget (default $KEEP_LAST)
  --max-unused P        repack threshold in percent, both tools (default $MAX_UNUSED)
  --workdir DIR         scratch directory (default $WORKDIR)
  --chunkvault PATH     use this binary instead of building target/release/chunkvault
  -h, --help            show this help

Needs restic, python3 and /usr/bin/time (package time).
EOF
}

die() { printf 'prune.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --size-mib) need_arg "$@"; SIZE_MIB=$2; shift 2 ;;
        --snapshots) need_arg "$@"; SNAPSHOTS=$2; shift 2 ;;
        --change-percent) need_arg "$@"; CHANGE_PERCENT=$2; shift 2 ;;
        --keep-last) need_arg "$@"; KEEP_LAST=$2; shift 2 ;;
        --max-unused) need_arg "$@"; MAX_UNUSED=$2; shift 2 ;;
        --workdir) need_arg "$@"; WORKDIR=$2; shift 2 ;;
        --chunkvault) need_arg "$@"; CHUNKVAULT=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
for v in SIZE_MIB SNAPSHOTS KEEP_LAST; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
command -v restic >/dev/null || die "restic is not installed"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is not installed (apt-get install time)"

if [[ -z $CHUNKVAULT ]]; then
    log "building chunkvault (release)"
    (cd "$REPO_ROOT" && cargo build --release --quiet)
    CHUNKVAULT=$REPO_ROOT/target/release/chunkvault
fi
[[ -x $CHUNKVAULT ]] || die "no chunkvault binary at $CHUNKVAULT"

mkdir -p "$WORKDIR"
LOG=$WORKDIR/prune.log
: >"$LOG"
CORPUS=$WORKDIR/corpus-${SIZE_MIB}mib
DATA=$WORKDIR/data
CV_REPO=$WORKDIR/cv-repo
RESTIC_REPO=$WORKDIR/restic-repo
export CHUNKVAULT_PASSWORD=bench RESTIC_PASSWORD=bench
export RESTIC_CACHE_DIR=$WORKDIR/restic-cache

run() { printf '+ %s\n' "$*" >>"$LOG"; "$@" >>"$LOG" 2>&1 || die "failed: $* (see $LOG)"; }

log "corpus of $SIZE_MIB MiB in $CORPUS"
run python3 "$SCRIPT_DIR/make_corpus.py" "$CORPUS" --size-mib "$SIZE_MIB"
rm -rf "$DATA" "$CV_REPO" "$RESTIC_REPO" "$RESTIC_CACHE_DIR"
cp -a "$CORPUS" "$DATA"
rm -f "$DATA/.corpus-stamp"

run "$CHUNKVAULT" init --repo "$CV_REPO"
run restic -r "$RESTIC_REPO" init

# Changes CHANGE_PERCENT% of the files (chosen by seed): overwrites 4 KiB at a
# random place of each with new random bytes, so each snapshot adds a little.
mutate() {
    python3 - "$DATA" "$CHANGE_PERCENT" "$1" <<'EOF'
import os, random, sys
root, percent, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
rng = random.Random(seed)
for path in rng.sample(files, max(1, int(len(files) * percent / 100))):
    size = os.path.getsize(path)
    off = rng.randrange(0, max(1, size))
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(rng.randbytes(4096))
EOF
}

for s in $(seq 1 "$SNAPSHOTS"); do
    [[ $s -gt 1 ]] && mutate "$s"
    log "snapshot $s/$SNAPSHOTS"
    run "$CHUNKVAULT" backup --repo "$CV_REPO" --quiet "$DATA"
    run restic -r "$RESTIC_REPO" --quiet backup "$DATA"
done

run "$CHUNKVAULT" forget --repo "$CV_REPO" --keep-last "$KEEP_LAST"
run restic -r "$RESTIC_REPO" forget --keep-last "$KEEP_LAST"
cv_before=$(du -sb "$CV_REPO" | cut -f1)
restic_before=$(du -sb "$RESTIC_REPO" | cut -f1)

# Runs a command under /usr/bin/time -v; prints "seconds peak_kib".
measure() {
    local out=$WORKDIR/time.txt
    printf '+ %s\n' "$*" >>"$LOG"
    /usr/bin/time -v -o "$out" "$@" >>"$LOG" 2>&1 || die "failed: $* (see $LOG)"
    cat "$out" >>"$LOG"
    python3 - "$out" <<'EOF'
import sys
t = open(sys.argv[1]).read().splitlines()
get = lambda k: next(l.split(": ", 1)[1] for l in t if l.strip().startswith(k))
parts = [float(p) for p in get("Elapsed (wall clock) time").split(":")]
secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
print(f"{secs:.2f} {get('Maximum resident set size')}")
EOF
}

log "timing prune"
read -r cv_secs cv_kib < <(measure "$CHUNKVAULT" prune --repo "$CV_REPO" --quiet --max-unused-percent "$MAX_UNUSED")
read -r restic_secs restic_kib < <(measure restic -r "$RESTIC_REPO" prune --max-unused "$MAX_UNUSED%")
cv_after=$(du -sb "$CV_REPO" | cut -f1)
restic_after=$(du -sb "$RESTIC_REPO" | cut -f1)

log "checking both repositories"
run "$CHUNKVAULT" check --repo "$CV_REPO"
run restic -r "$RESTIC_REPO" check

mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }
{
    echo "Prune after forget --keep-last $KEEP_LAST of $SNAPSHOTS snapshots of a $SIZE_MIB MiB corpus"
    echo "($CHANGE_PERCENT% of files changed between snapshots; repack threshold $MAX_UNUSED%)"
    echo
    echo "| tool | prune wall time (s) | peak RSS (MiB) | repository before (MiB) | after (MiB) |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    echo "| chunkvault | $cv_secs | $(mib $((cv_kib * 1024))) | $(mib "$cv_before") | $(mib "$cv_after") |"
    echo "| restic $(restic version | cut -d' ' -f2) | $restic_secs | $(mib $((restic_kib * 1024))) | $(mib "$restic_before") | $(mib "$restic_after") |"
} | tee "$WORKDIR/prune-results.md"
