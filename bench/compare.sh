#!/usr/bin/env bash
# End-to-end benchmark: chunkvault against restic and borg on the same corpus.
# See bench/README.md for what it measures and how to read the results.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

SIZE_MIB=1024
RUNS=3
TOOLS="chunkvault restic borg"
WORKDIR=/tmp/cv-bench
CHUNKVAULT=""
RANDOM_PERCENT=10
SEED=1
PASSWORD=bench

usage() {
    cat <<EOF
Usage: bench/compare.sh [options]

Times initial backup, no-change re-backup and restore of a deterministic
corpus (real files from /usr plus incompressible random data) with chunkvault,
restic and borg, verifies every restore, and prints a markdown table of
medians and min-max over the runs (also written to WORKDIR/results.md).

Options:
  --size-mib N          corpus size in MiB (default $SIZE_MIB)
  --runs R              number of runs; tools alternate within a run (default $RUNS)
  --tools "LIST"        tools to compare, from: chunkvault restic borg
                        (default "$TOOLS")
  --workdir DIR         scratch directory for corpus, repositories, restores,
                        caches and results (default $WORKDIR)
  --chunkvault PATH     use this chunkvault binary instead of building
                        target/release/chunkvault with cargo build --release
  --random-percent P    share of random data in the corpus (default $RANDOM_PERCENT)
  --seed S              seed of the random data (default $SEED)
  -h, --help            show this help

Missing restic, borg or /usr/bin/time are installed with apt-get.
EOF
}

die() {
    printf 'compare.sh: error: %s\n' "$*" >&2
    exit 1
}

log() {
    printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

need_arg() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --size-mib) need_arg "$@"; SIZE_MIB=$2; shift 2 ;;
        --runs) need_arg "$@"; RUNS=$2; shift 2 ;;
        --tools) need_arg "$@"; TOOLS=$2; shift 2 ;;
        --workdir) need_arg "$@"; WORKDIR=$2; shift 2 ;;
        --chunkvault) need_arg "$@"; CHUNKVAULT=$2; shift 2 ;;
        --random-percent) need_arg "$@"; RANDOM_PERCENT=$2; shift 2 ;;
        --seed) need_arg "$@"; SEED=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "--size-mib must be a positive integer, got '$SIZE_MIB'"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer, got '$RUNS'"
[[ $SEED =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer, got '$SEED'"
read -r -a TOOL_LIST <<<"$TOOLS"
[[ ${#TOOL_LIST[@]} -gt 0 ]] || die "--tools is empty"
for t in "${TOOL_LIST[@]}"; do
    case $t in
        chunkvault | restic | borg) ;;
        *) die "unknown tool '$t' in --tools (known: chunkvault restic borg)" ;;
    esac
done

has_tool() {
    local t
    for t in "${TOOL_LIST[@]}"; do [[ $t == "$1" ]] && return 0; done
    return 1
}

# ---------------------------------------------------------------- setup ----

APT_UPDATED=0
wait_for_apt() {
    local waited=0
    while fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
        >/dev/null 2>&1; do
        ((waited % 30 == 0)) && log "waiting for another apt/dpkg to finish..."
        sleep 5
        waited=$((waited + 5))
        ((waited < 1800)) || die "apt/dpkg still locked after 30 minutes"
    done
}

apt_install() {
    command -v apt-get >/dev/null || die "need to install $* but apt-get is not available"
    local try
    for try in 1 2 3 4 5; do
        wait_for_apt
        if ((APT_UPDATED == 0)); then
            if apt-get -o DPkg::Lock::Timeout=600 update -q >&2; then
                APT_UPDATED=1
            else
                log "apt-get update failed (try $try), retrying"; sleep 10; continue
            fi
        fi
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
            install -y -q "$@" >&2; then
            return 0
        fi
        log "apt-get install $* failed (try $try), retrying"
        sleep 10
    done
    die "apt-get install $* failed"
}

ensure_packages() {
    local pkgs=()
    [[ -x /usr/bin/time ]] || pkgs+=(time)
    if has_tool restic && ! command -v restic >/dev/null; then pkgs+=(restic); fi
    if has_tool borg && ! command -v borg >/dev/null; then pkgs+=(borgbackup); fi
    if ((${#pkgs[@]} > 0)); then
        log "installing ${pkgs[*]} with apt-get"
        apt_install "${pkgs[@]}"
    fi
    local cmd
    for cmd in python3 sha256sum find du tar; do
        command -v "$cmd" >/dev/null || die "'$cmd' is required but not installed"
    done
}

RESTIC_COMPRESSION=(--compression auto)
NOTES=()

check_restic() {
    local v help
    v=$(restic version | awk '{print $2; exit}')
    # Not piped into grep -q: under pipefail an early grep exit fails the pipe.
    help=$(restic backup --help 2>&1 || true)
    if [[ $help != *--compression* ]]; then
        RESTIC_COMPRESSION=()
        NOTES+=("restic $v has no --compression flag (needs >= 0.14): restic ran uncompressed")
    elif [[ $(printf '%s\n' "$v" 0.14.0 | sort -V | head -n1) != 0.14.0 ]]; then
        RESTIC_COMPRESSION=()
        NOTES+=("restic $v is older than 0.14: restic ran uncompressed")
    fi
}

build_chunkvault() {
    if [[ -n $CHUNKVAULT ]]; then
        [[ -x $CHUNKVAULT ]] || die "--chunkvault '$CHUNKVAULT' is not an executable file"
        CHUNKVAULT=$(cd "$(dirname "$CHUNKVAULT")" && pwd)/$(basename "$CHUNKVAULT")
        return
    fi
    command -v cargo >/dev/null || die "cargo not found; build chunkvault or pass --chunkvault PATH"
    log "building chunkvault (cargo build --release)"
    (cd "$REPO_ROOT" && cargo build --release >&2) || die "cargo build --release failed"
    CHUNKVAULT=$REPO_ROOT/target/release/chunkvault
    [[ -x $CHUNKVAULT ]] || die "cargo build succeeded but $CHUNKVAULT is missing"
}

ensure_packages
has_tool restic && check_restic
has_tool chunkvault && build_chunkvault

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd -P)
CORPUS=$WORKDIR/corpus-${SIZE_MIB}mib-r${RANDOM_PERCENT}-s${SEED}
RUNS_DIR=$WORKDIR/runs
RUNDIR=$RUNS_DIR/setup
LOG=$WORKDIR/bench.log
RAW=$WORKDIR/raw.tsv
RESULTS=$WORKDIR/results.md
: >"$LOG"

log "building corpus $CORPUS (${SIZE_MIB} MiB, ${RANDOM_PERCENT}% random, seed $SEED)"
CORPUS_JSON=$(python3 "$SCRIPT_DIR/make_corpus.py" "$CORPUS" --size-mib "$SIZE_MIB" \
    --random-percent "$RANDOM_PERCENT" --seed "$SEED") || die "make_corpus.py failed"
read -r CORPUS_FILES CORPUS_BYTES < <(python3 -c \
    'import json,sys; d=json.loads(sys.argv[1]); print(d["files"], d["bytes"])' "$CORPUS_JSON")
[[ ${CORPUS_BYTES:-} =~ ^[0-9]+$ ]] || die "could not read the corpus summary: $CORPUS_JSON"
log "corpus: $CORPUS_FILES files, $CORPUS_BYTES bytes"

# A listing of every entry (type, mode, symlink target) plus the sha256 of
# every regular file, relative to the given root: equal listings mean an
# identical tree (owners and timestamps are not compared).
manifest() {
    local root=$1 out=$2
    (
        cd "$root"
        find . -mindepth 1 -printf '%y %#m %P -> %l\n' | LC_ALL=C sort
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
    ) >"$out"
}

MANIFEST=$WORKDIR/corpus.manifest
log "warm-up read of the corpus and its manifest (untimed)"
# GNU tar skips reading file data when the archive is literally /dev/null, so
# pipe it through cat to really read the corpus into the page cache.
tar -C "$CORPUS" -cf - . | cat >/dev/null
manifest "$CORPUS" "$MANIFEST"

# ------------------------------------------------------------ tool runs ----

CLK_TCK=$(getconf CLK_TCK)
# CPU time (in clock ticks) the whole machine has spent busy since boot.
cpu_busy_ticks() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}

# Anything else busy on the machine (a cargo build...) skews the timings:
# sample the machine for 3 s and say so in the results instead of silently
# publishing noisy numbers. (The load average lags by minutes: not used.)
check_idle() {
    local b0 b1 cores
    b0=$(cpu_busy_ticks)
    sleep 3
    b1=$(cpu_busy_ticks)
    cores=$(awk -v b="$((b1 - b0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", b / hz / 3 }')
    if awk -v c="$cores" 'BEGIN { exit !(c > 0.2) }'; then
        NOTES+=("the machine was busy (${cores} cores in use) before the benchmark started: timings are noisy")
        log "warning: ${cores} cores busy before the benchmark; top processes:"
        ps -eo pcpu,etime,comm --sort=-pcpu | head -n 4 >&2 || true
    fi
}
check_idle

# Environment and commands of each tool, for a repository, a restore
# directory and a cache directory.
tool_env() {
    local tool=$1 repo=$2 cache=$3
    case $tool in
        chunkvault)
            printf '%s\n' "CHUNKVAULT_REPO=$repo" "CHUNKVAULT_PASSWORD=$PASSWORD" \
                "XDG_CACHE_HOME=$cache"
            ;;
        restic)
            printf '%s\n' "RESTIC_REPOSITORY=$repo" "RESTIC_PASSWORD=$PASSWORD" \
                "RESTIC_CACHE_DIR=$cache"
            ;;
        borg)
            printf '%s\n' "BORG_PASSPHRASE=$PASSWORD" "BORG_BASE_DIR=$cache" \
                "BORG_CACHE_DIR=$cache/cache" "BORG_CONFIG_DIR=$cache/config" \
                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes" \
                "BORG_RELOCATED_REPO_ACCESS_IS_OK=yes" "BORG_DISPLAY_PASSPHRASE=no"
            ;;
    esac
}

# Sets CMD to the command array for step $2 of tool $1.
tool_cmd() {
    local tool=$1 step=$2 repo=$3 restore=$4 cache=$5
    case $tool/$step in
        chunkvault/init) CMD=("$CHUNKVAULT" init) ;;
        chunkvault/backup1 | chunkvault/backup2 | chunkvault/backup3)
            CMD=("$CHUNKVAULT" backup "$CORPUS" --quiet --json) ;;
        chunkvault/restore) CMD=("$CHUNKVAULT" restore latest --target "$restore" --quiet) ;;
        restic/init) CMD=(restic init --cache-dir "$cache") ;;
        restic/backup1 | restic/backup2 | restic/backup3)
            CMD=(restic backup --cache-dir "$cache" "${RESTIC_COMPRESSION[@]}" "$CORPUS") ;;
        restic/restore) CMD=(restic restore latest --cache-dir "$cache" --target "$restore") ;;
        borg/init) CMD=(borg init --encryption=repokey-blake2 "$repo") ;;
        borg/backup1) CMD=(borg create --compression "zstd,3" "$repo::backup1" "$CORPUS") ;;
        borg/backup2) CMD=(borg create --compression "zstd,3" "$repo::backup2" "$CORPUS") ;;
        borg/backup3) CMD=(borg create --compression "zstd,3" "$repo::backup3" "$CORPUS") ;;
        borg/restore) CMD=(borg extract "$repo::backup1") ;;
        *) die "internal: no command for $tool/$step" ;;
    esac
}

# run_step TOOL STEP RUN REPO RESTORE CACHE TIMED
#   -> sets STEP_SECS, STEP_RSS and STEP_FOREIGN (CPU seconds the machine spent
#      on anything but the timed command while it ran: other processes,
#      kernel writeback, steal; a large value means a disturbed measurement)
run_step() {
    local tool=$1 step=$2 run=$3 repo=$4 restore=$5 cache=$6 timed=$7
    local -a envs CMD
    local tfile=$RUNDIR/time.out rc=0 cwd=$RUNDIR busy0 busy1 usr sys
    mapfile -t envs < <(tool_env "$tool" "$repo" "$cache")
    tool_cmd "$tool" "$step" "$repo" "$restore" "$cache"
    # borg extract writes into the current directory; the others take --target.
    [[ $step == restore ]] && cwd=$restore
    printf '\n==== run %s %s %s: %s\n' "$run" "$tool" "$step" "${CMD[*]}" >>"$LOG"
    if [[ $timed == 1 ]]; then
        # Flush the previous step's dirty pages first so their writeback is
        # not charged to this step (and so to another tool).
        sync
        busy0=$(cpu_busy_ticks)
        (cd "$cwd" && env "${envs[@]}" /usr/bin/time -f '%e %M %U %S' -o "$tfile" "${CMD[@]}") \
            </dev/null >>"$LOG" 2>&1 || rc=$?
        busy1=$(cpu_busy_ticks)
    else
        (cd "$cwd" && env "${envs[@]}" "${CMD[@]}") </dev/null >>"$LOG" 2>&1 || rc=$?
    fi
    if ((rc != 0)); then
        printf '\ncompare.sh: %s %s (run %s) FAILED with exit code %s; last log lines:\n' \
            "$tool" "$step" "$run" "$rc" >&2
        tail -n 25 "$LOG" >&2
        die "$tool $step failed (full log: $LOG)"
    fi
    if [[ $timed == 1 ]]; then
        # time(1) prepends "Command exited with non-zero status" lines on
        # failure; the measurement is always the last line.
        read -r STEP_SECS STEP_RSS usr sys < <(tail -n 1 "$tfile")
        [[ $STEP_SECS =~ ^[0-9.]+$ && $STEP_RSS =~ ^[0-9]+$ ]] ||
            die "could not parse /usr/bin/time output for $tool $step: $(cat "$tfile")"
        STEP_FOREIGN=$(awk -v b="$((busy1 - busy0))" -v hz="$CLK_TCK" -v u="$usr" -v s="$sys" \
            'BEGIN { f = b / hz - u - s; printf "%.2f", (f < 0 ? 0 : f) }')
        log "  $tool $step: ${STEP_SECS}s (cpu ${usr}u ${sys}s), peak RSS ${STEP_RSS} KiB, other cpu ${STEP_FOREIGN}s"
    fi
}

verify_restore() {
    local tool=$1 run=$2 restore=$3
    # chunkvault and restic restore absolute paths under the target; borg
    # strips the leading / and extracts under the current directory: both
    # put the corpus at $restore$CORPUS.
    local restored=$restore$CORPUS out=$RUNDIR/restore.manifest
    if [[ ! -d $restored ]]; then
        printf '\n!!!! %s run %s: RESTORE VERIFICATION FAILED: %s does not exist; restore holds:\n' \
            "$tool" "$run" "$restored" >&2
        find "$restore" -maxdepth 4 | head -n 20 >&2
        die "$tool restore verification failed (restore kept in $restore)"
    fi
    manifest "$restored" "$out"
    if ! cmp -s "$MANIFEST" "$out"; then
        printf '\n!!!! %s run %s: RESTORE VERIFICATION FAILED: %s differs from the corpus\n' \
            "$tool" "$run" "$restored" >&2
        diff "$MANIFEST" "$out" | head -n 40 >&2 || true
        die "$tool restore is not identical to the corpus (restore kept in $restore; manifests $MANIFEST and $out)"
    fi
    log "  $tool restore verified identical ($CORPUS_FILES files)"
}

# "Warm page cache" must hold for every tool at the moment it reads: this
# machine may evict page cache that has not been touched for a while (here,
# DAMON proactive reclaim pages out what is idle for ~60 s, which is shorter
# than one tool's turn), so whichever tool ran after the longest gap would
# read from disk. Read the files through once right before each timed read.
warm() {
    find "$@" -type f -print0 | xargs -0 -r cat >/dev/null
}

printf 'run\ttool\tbackup_s\tbackup_rss_kib\trebackup_s\trebackup_rss_kib\trestore_s\trestore_rss_kib\trepo_bytes\tincr_s\tincr_bytes\tother_cpu_s\n' >"$RAW"

# The incremental step edits the shared corpus in place; whatever happens,
# put it back before exiting so the next tool and the next run see the same
# bytes.
EDIT_SAVE=$WORKDIR/edit-originals
revert_edits() {
    if [[ -d $EDIT_SAVE ]]; then
        python3 "$SCRIPT_DIR/edit_corpus.py" "$CORPUS" --revert "$EDIT_SAVE" >>"$LOG" ||
            printf 'compare.sh: could not revert the corpus edits; delete %s and %s\n' "$CORPUS" "$EDIT_SAVE" >&2
    fi
}
trap revert_edits EXIT
revert_edits

# Every tool's run directory (repository and restore) stays until the end.
rm -rf "$RUNS_DIR" "$WORKDIR/run"
need_kib=$((RUNS * ${#TOOL_LIST[@]} * SIZE_MIB * 2 * 1024))
avail_kib=$(df --output=avail -k "$WORKDIR" | tail -n 1)
((avail_kib > need_kib)) ||
    die "$WORKDIR has $((avail_kib / 1024)) MiB free; the runs need about $((need_kib / 1024)) MiB (fewer --runs or a smaller --size-mib)"

for ((run = 1; run <= RUNS; run++)); do
    for tool in "${TOOL_LIST[@]}"; do
        log "run $run/$RUNS: $tool"
        # A fresh directory per tool and run; all are deleted at the end, not
        # between steps: on ext4 without a journal, creating files within
        # seconds of deleting tens of thousands makes every inode allocation
        # skip the recently deleted ones (the kernel's recently_deleted()),
        # which turned one restore into 15 s of kernel time for whichever
        # tool restored soonest after the previous tool's cleanup.
        RUNDIR=$RUNS_DIR/$run-$tool
        mkdir -p "$RUNDIR"
        repo=$RUNDIR/repo
        restore=$RUNDIR/restore
        cache=$RUNDIR/cache
        mkdir -p "$restore" "$cache"
        run_step "$tool" init "$run" "$repo" "$restore" "$cache" 0
        warm "$CORPUS"
        run_step "$tool" backup1 "$run" "$repo" "$restore" "$cache" 1
        b_s=$STEP_SECS b_rss=$STEP_RSS b_f=$STEP_FOREIGN
        run_step "$tool" backup2 "$run" "$repo" "$restore" "$cache" 1
        rb_s=$STEP_SECS rb_rss=$STEP_RSS rb_f=$STEP_FOREIGN
        warm "$repo"
        run_step "$tool" restore "$run" "$repo" "$restore" "$cache" 1
        r_s=$STEP_SECS r_rss=$STEP_RSS r_f=$STEP_FOREIGN
        verify_restore "$tool" "$run" "$restore"
        repo_bytes=$(du -sb "$repo" | cut -f1)
        log "  $tool repository: $repo_bytes bytes"
        # Incremental: 5% of the files get 64 bytes inserted in the middle.
        python3 "$SCRIPT_DIR/edit_corpus.py" "$CORPUS" --apply "$EDIT_SAVE" --percent 5 --seed "$SEED" >>"$LOG"
        warm "$CORPUS"
        run_step "$tool" backup3 "$run" "$repo" "$restore" "$cache" 1
        i_s=$STEP_SECS i_f=$STEP_FOREIGN
        revert_edits
        incr_bytes=$(($(du -sb "$repo" | cut -f1) - repo_bytes))
        log "  $tool incremental added $incr_bytes bytes"
        other=$(awk -v a="$b_f" -v b="$rb_f" -v c="$r_f" -v d="$i_f" 'BEGIN { printf "%.2f", a + b + c + d }')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$tool" "$b_s" "$b_rss" \
            "$rb_s" "$rb_rss" "$r_s" "$r_rss" "$repo_bytes" "$i_s" "$incr_bytes" "$other" >>"$RAW"
    done
done

log "removing the run directories"
rm -rf "$RUNS_DIR"

# -------------------------------------------------------------- report ----

version_of() {
    case $1 in
        chunkvault) "$CHUNKVAULT" --version 2>/dev/null | head -n1 || echo "chunkvault (no --version)" ;;
        restic) restic version | head -n1 ;;
        borg) borg --version | head -n1 ;;
    esac
}

{
    echo "nproc	$(nproc)"
    echo "cpu	$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "memory	$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "kernel	$(uname -sr)"
    for t in "${TOOL_LIST[@]}"; do echo "version	$(version_of "$t")"; done
    for n in "${NOTES[@]}"; do echo "note	$n"; done
} >"$WORKDIR/machine.tsv"

python3 - "$RAW" "$WORKDIR/machine.tsv" "$CORPUS_BYTES" "$CORPUS_FILES" "$SIZE_MIB" \
    "$RANDOM_PERCENT" "$SEED" "$RUNS" "$TOOLS" >"$RESULTS" <<'PY'
import csv
import statistics
import sys

raw, machine, cbytes, cfiles, size_mib, rnd, seed, runs, tools = sys.argv[1:]
cbytes = int(cbytes)
tools = tools.split()
rows = list(csv.DictReader(open(raw), delimiter="\t"))
info = [line.rstrip("\n").split("\t", 1) for line in open(machine)]

MB = 1e6
MIB = 1024 * 1024

def metrics(r):
    return {
        "backup": cbytes / MB / max(float(r["backup_s"]), 0.01),
        "rebackup": float(r["rebackup_s"]),
        "restore": cbytes / MB / max(float(r["restore_s"]), 0.01),
        "backup_rss": int(r["backup_rss_kib"]) / 1024,
        "restore_rss": int(r["restore_rss_kib"]) / 1024,
        "repo": int(r["repo_bytes"]) / MIB,
        "incr": float(r["incr_s"]),
        "incr_growth": int(r["incr_bytes"]) / MIB,
    }

per_tool = {t: [metrics(r) for r in rows if r["tool"] == t] for t in tools}
med = {t: {k: statistics.median(m[k] for m in ms) for k in ms[0]}
       for t, ms in per_tool.items() if ms}

def cell(t, key, fmt):
    vals = [m[key] for m in per_tool[t]]
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(med[t][key])} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"

out = []
p = out.append
p("# chunkvault end-to-end benchmark\n")
p(f"Corpus: {int(size_mib)} MiB requested, {cfiles} files, {cbytes} bytes "
  f"({rnd}% seeded random data, seed {seed}); {runs} run(s), tools alternating "
  "within each run; warm page cache, cold tool caches.\n")
p("## Machine\n")
for k, v in info:
    if k in ("nproc", "cpu", "memory", "kernel"):
        p(f"- {k}: {v}")
p("\n## Tool versions\n")
for k, v in info:
    if k == "version":
        p(f"- {v}")
notes = [v for k, v in info if k == "note"]
if notes:
    p("\n## Notes\n")
    for n in notes:
        p(f"- **{n}**")
p("\n## Results (median, min–max over runs)\n")
p("MB = 10^6 bytes; throughput = corpus bytes / wall seconds.\n")
p("| tool | backup MB/s | re-backup s | restore MB/s | backup peak RSS MiB "
  "| restore peak RSS MiB | repo MiB | repo / corpus | incremental s | incremental growth MiB |")
p("|---|---|---|---|---|---|---|---|---|---|")
for t in tools:
    if not per_tool[t]:
        continue
    p(f"| {t} | {cell(t, 'backup', '{:.1f}')} | {cell(t, 'rebackup', '{:.2f}')} "
      f"| {cell(t, 'restore', '{:.1f}')} | {cell(t, 'backup_rss', '{:.0f}')} "
      f"| {cell(t, 'restore_rss', '{:.0f}')} | {cell(t, 'repo', '{:.1f}')} "
      f"| {med[t]['repo'] * MIB / cbytes * 100:.1f}% | {cell(t, 'incr', '{:.2f}')} "
      f"| {cell(t, 'incr_growth', '{:.2f}')} |")

others = [t for t in ("restic", "borg") if t in med]
if "chunkvault" in med and others:
    ours = med["chunkvault"]
    p("\n## Ratios (of medians)\n")
    p("Throughput and re-backup speed: > 1 means chunkvault is faster. "
      "Repository size: < 1 means chunkvault's repository is smaller.\n")
    p("| ratio | backup throughput | restore throughput | re-backup speed "
      "(their s / our s) | repo size (ours / theirs) | incremental growth (ours / theirs) |")
    p("|---|---|---|---|---|---|")
    for o in others:
        th = med[o]
        rb = th["rebackup"] / ours["rebackup"] if ours["rebackup"] > 0 else float("inf")
        p(f"| chunkvault/{o} | {ours['backup'] / th['backup']:.2f}× "
          f"| {ours['restore'] / th['restore']:.2f}× | {rb:.2f}× "
          f"| {ours['repo'] / th['repo']:.2f}× "
          f"| {ours['incr_growth'] / th['incr_growth'] if th['incr_growth'] > 0 else float('inf'):.2f}× |")

p("\n## Raw runs\n")
p("*other CPU s*: CPU seconds the machine spent on anything but the timed "
  "commands while they ran (other processes, kernel writeback, steal).\n")
p("| run | tool | backup s | re-backup s | restore s | backup RSS KiB "
  "| re-backup RSS KiB | restore RSS KiB | repo bytes | incremental s | incremental bytes | other CPU s |")
p("|---|---|---|---|---|---|---|---|---|---|---|---|")
disturbed = []
for r in rows:
    p(f"| {r['run']} | {r['tool']} | {r['backup_s']} | {r['rebackup_s']} | {r['restore_s']} "
      f"| {r['backup_rss_kib']} | {r['rebackup_rss_kib']} | {r['restore_rss_kib']} "
      f"| {r['repo_bytes']} | {r['incr_s']} | {r['incr_bytes']} | {r['other_cpu_s']} |")
    wall = float(r["backup_s"]) + float(r["rebackup_s"]) + float(r["restore_s"]) + float(r["incr_s"])
    # More than a quarter of a core busy elsewhere on average: flag the run.
    if float(r["other_cpu_s"]) > max(0.25 * wall, 0.5):
        disturbed.append(f"run {r['run']} {r['tool']} ({r['other_cpu_s']} s other CPU "
                         f"in {wall:.1f} s)")
if disturbed:
    p("\n**Possibly disturbed runs** (something else used the CPU): "
      + "; ".join(disturbed) + ".")
print("\n".join(out))
PY

echo
cat "$RESULTS"
log "results written to $RESULTS (raw numbers: $RAW, tool output: $LOG)"
