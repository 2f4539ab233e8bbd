#!/usr/bin/env bash
# Device benchmark: the local CLI against a device backing up to and
# restoring from `chunkvault serve` on loopback, alternating in one run.
# See bench/README.md ("Device against local") for what it measures.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

SIZE_MIB=512
RUNS=3
WORKDIR=/tmp/cv-devices
RESTORE_DIR=/dev/shm/cv-devices-restore
CHUNKVAULT=""
RANDOM_PERCENT=10
SEED=1
PASSWORD=bench
ADMIN_TOKEN=bench-admin-token
SERVER_ROOT=""
STORAGE_PIDS=""

usage() {
    cat <<EOF
Usage: bench/devices.sh [options]

Times, alternating in each run and with a warm page cache: a local CLI
backup, a device backup to \`chunkvault serve\` on 127.0.0.1, a second device
backing up the same data (everything deduplicated), a local re-hash of it
(\`backup --force\`), a local restore and a device restore. Prints medians,
min-max, wall and CPU seconds of the client and of the server, peak RSS of
both, and device/local ratios (also written to WORKDIR/results.md).

Options:
  --size-mib N          corpus size in MiB (default $SIZE_MIB)
  --runs R              runs (default $RUNS)
  --workdir DIR         corpus, repositories, server root (default $WORKDIR)
  --restore-dir DIR     where both restores write (default $RESTORE_DIR, tmpfs)
  --chunkvault PATH     use this binary instead of cargo build --release
  --random-percent P    share of random data in the corpus (default $RANDOM_PERCENT)
  --seed S              seed of the random data (default $SEED)
  --server-root LOC     the storage node's root: a directory, or
                        s3://bucket/prefix for the S3 backend (settings from
                        the environment, e.g. eval "\$(scripts/garage-cluster.sh start)";
                        the registry then stays in WORKDIR); default WORKDIR/server-root
  --storage-pids "P..." processes serving the server root (e.g. the Garage
                        nodes: "\$(pgrep -x garage)"), whose CPU during each
                        step is reported as a column of its own
  -h, --help            show this help
EOF
}

die() {
    printf 'devices.sh: error: %s\n' "$*" >&2
    exit 1
}
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --size-mib) need_arg "$@"; SIZE_MIB=$2; shift 2 ;;
        --runs) need_arg "$@"; RUNS=$2; shift 2 ;;
        --workdir) need_arg "$@"; WORKDIR=$2; shift 2 ;;
        --restore-dir) need_arg "$@"; RESTORE_DIR=$2; shift 2 ;;
        --chunkvault) need_arg "$@"; CHUNKVAULT=$2; shift 2 ;;
        --random-percent) need_arg "$@"; RANDOM_PERCENT=$2; shift 2 ;;
        --seed) need_arg "$@"; SEED=$2; shift 2 ;;
        --server-root) need_arg "$@"; SERVER_ROOT=$2; shift 2 ;;
        --storage-pids) need_arg "$@"; STORAGE_PIDS=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ -x /usr/bin/time ]] || die "/usr/bin/time is needed (apt-get install time)"
command -v python3 >/dev/null || die "python3 is needed"

if [[ -z $CHUNKVAULT ]]; then
    log "building the release binary"
    (cd "$REPO_ROOT" && cargo build --release --bin chunkvault) >&2
    CHUNKVAULT=$REPO_ROOT/target/release/chunkvault
fi
[[ -x $CHUNKVAULT ]] || die "$CHUNKVAULT is not executable"
CHUNKVAULT=$(cd "$(dirname "$CHUNKVAULT")" && pwd)/$(basename "$CHUNKVAULT")

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
LOG=$WORKDIR/devices.log
RAW=$WORKDIR/devices-raw.tsv
RESULTS=$WORKDIR/results.md
: >"$LOG"

CORPUS=$WORKDIR/corpus-${SIZE_MIB}mib-r${RANDOM_PERCENT}-s${SEED}
log "corpus $CORPUS"
python3 "$SCRIPT_DIR/make_corpus.py" "$CORPUS" --size-mib "$SIZE_MIB" \
    --random-percent "$RANDOM_PERCENT" --seed "$SEED" >>"$LOG"
CORPUS_BYTES=$(find "$CORPUS" -type f ! -name .corpus-stamp -printf '%s\n' | awk '{s += $1} END {print s}')
CORPUS_FILES=$(find "$CORPUS" -type f ! -name .corpus-stamp | wc -l)

CLK_TCK=$(getconf CLK_TCK)
RUNS_DIR=$WORKDIR/runs
rm -rf "$RUNS_DIR" "$RESTORE_DIR"
mkdir -p "$RUNS_DIR" "$RESTORE_DIR"
# The node's settings: a local root is made fresh; an S3 root gets a fresh
# prefix of its own per invocation (nothing is deleted in the bucket), and
# the registry a file in WORKDIR.
SERVER_ARGS=()
SERVER_ENV=()
if [[ $SERVER_ROOT == s3://* ]]; then
    SERVER_ROOT=${SERVER_ROOT%/}/devices-$(date +%Y%m%d-%H%M%S)-$$
    rm -f "$WORKDIR/registry.db"*
    rm -rf "$WORKDIR/server-cache"
    SERVER_ARGS=(--registry "$WORKDIR/registry.db")
    SERVER_ENV=(CHUNKVAULT_CACHE_DIR="$WORKDIR/server-cache")
else
    SERVER_ROOT=${SERVER_ROOT:-$WORKDIR/server-root}
    rm -rf "$SERVER_ROOT"
    mkdir -p "$SERVER_ROOT"
fi
log "server root $SERVER_ROOT"

# ---------------------------------------------------------- the server ----

SERVER_OUT=$WORKDIR/server.stdout
env CHUNKVAULT_PASSWORD=$PASSWORD CHUNKVAULT_ADMIN_TOKEN=$ADMIN_TOKEN "${SERVER_ENV[@]}" \
    "$CHUNKVAULT" serve --listen 127.0.0.1:0 --root "$SERVER_ROOT" "${SERVER_ARGS[@]}" >"$SERVER_OUT" 2>>"$LOG" &
SERVER_PID=$!
cleanup() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    rm -rf "$RESTORE_DIR"
}
trap cleanup EXIT
URL=""
for _ in $(seq 1 100); do
    URL=$(sed -n 's/^listening on //p' "$SERVER_OUT" | head -n1)
    [[ -n $URL ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited (see $LOG)"
    sleep 0.1
done
[[ -n $URL ]] || die "the server did not start (see $LOG)"
log "server $URL (pid $SERVER_PID)"

server_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
# The CPU ticks of the --storage-pids processes (0 without them).
storage_ticks() {
    local total=0 pid
    for pid in $STORAGE_PIDS; do
        [[ -r /proc/$pid/stat ]] || die "storage process $pid is gone"
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}
server_hwm() { awk '/^VmHWM/ {print $2}' "/proc/$SERVER_PID/status"; }

warm() { find "$@" -type f -print0 | xargs -0 -r cat >/dev/null; }

printf 'run\tstep\twall_s\tclient_rss_kib\tclient_user_s\tclient_sys_s\tserver_cpu_s\tserver_hwm_kib\tstorage_cpu_s\n' >"$RAW"

# timed RUN STEP CMD... : runs CMD under /usr/bin/time, with the server's
# CPU time and (reset) peak RSS measured around it, and the storage
# processes' CPU time.
timed() {
    local run=$1 step=$2 tfile=$WORKDIR/time.out t0 t1 s0 s1 wall rss usr sys rc=0
    shift 2
    printf '\n==== run %s %s: %s\n' "$run" "$step" "$*" >>"$LOG"
    sync
    # Resets the server's VmHWM to its current RSS (Linux clear_refs 5).
    echo 5 >"/proc/$SERVER_PID/clear_refs" 2>/dev/null || true
    t0=$(server_ticks)
    s0=$(storage_ticks)
    /usr/bin/time -f '%e %M %U %S' -o "$tfile" "$@" </dev/null >>"$LOG" 2>&1 || rc=$?
    t1=$(server_ticks)
    s1=$(storage_ticks)
    if ((rc != 0)); then
        # Recorded and reported, not fatal: a step that fails on one build
        # (the baseline of a change) still leaves the others measured.
        tail -n 3 "$LOG" >&2
        log "  $step FAILED (exit $rc; log $LOG)"
        printf '%s\t%s\tfailed\t0\t0\t0\t0\t0\t0\n' "$run" "$step" >>"$RAW"
        return 1
    fi
    read -r wall rss usr sys < <(tail -n 1 "$tfile")
    local scpu stcpu hwm
    scpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')
    stcpu=$(awk -v a="$s0" -v b="$s1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')
    hwm=$(server_hwm)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$step" "$wall" "$rss" "$usr" "$sys" "$scpu" "$hwm" "$stcpu" >>"$RAW"
    log "  $step: ${wall}s, client cpu ${usr}u ${sys}s rss ${rss} KiB; server cpu ${scpu}s peak ${hwm} KiB; storage cpu ${stcpu}s"
}

verify() {
    local restored=$1$CORPUS
    diff -r -q "$CORPUS" "$restored" >>"$LOG" 2>&1 || die "restore $restored differs from the corpus (see $LOG)"
}

for ((run = 1; run <= RUNS; run++)); do
    log "run $run/$RUNS"
    rd=$RUNS_DIR/$run
    mkdir -p "$rd"
    # Local: a fresh repository and cache.
    export XDG_CACHE_HOME=$rd/cache
    export CHUNKVAULT_REPO=$rd/repo CHUNKVAULT_PASSWORD=$PASSWORD
    "$CHUNKVAULT" init >>"$LOG" 2>&1
    # Device: a fresh tenant per run, two devices of one user.
    token=$(CHUNKVAULT_ADMIN_TOKEN=$ADMIN_TOKEN "$CHUNKVAULT" admin --server "$URL" \
        deployment-token create --tenant "bench$run" 2>>"$LOG" | tail -n1)
    for d in a b; do
        printf '{"serverURL":"%s","userEmail":"bench@example.com","deploymentToken":"%s","deviceId":"dev-%s-%s"}' \
            "$URL" "$token" "$d" "$run" >"$rd/managed-$d.json"
        CHUNKVAULT_DEVICE_STATE=$rd/state-$d "$CHUNKVAULT" device activate \
            --managed-config "$rd/managed-$d.json" >>"$LOG" 2>&1
    done

    warm "$CORPUS"
    timed "$run" local-backup "$CHUNKVAULT" backup "$CORPUS" --quiet --json || true
    warm "$CORPUS"
    timed "$run" device-backup env CHUNKVAULT_DEVICE_STATE="$rd/state-a" "$CHUNKVAULT" device backup "$CORPUS" --json || true
    warm "$CORPUS"
    timed "$run" local-rehash "$CHUNKVAULT" backup "$CORPUS" --force --quiet --json || true
    warm "$CORPUS"
    timed "$run" device2-backup env CHUNKVAULT_DEVICE_STATE="$rd/state-b" "$CHUNKVAULT" device backup "$CORPUS" --json || true

    warm "$rd/repo"
    timed "$run" local-restore "$CHUNKVAULT" restore latest --target "$RESTORE_DIR/local-$run" --quiet &&
        verify "$RESTORE_DIR/local-$run"
    rm -rf "$RESTORE_DIR/local-$run"
    # An S3 root is read through the network, as it would be in production.
    [[ $SERVER_ROOT == s3://* ]] || warm "$SERVER_ROOT/bench$run"
    timed "$run" device-restore env CHUNKVAULT_DEVICE_STATE="$rd/state-a" "$CHUNKVAULT" device restore latest \
        --target "$RESTORE_DIR/device-$run" && verify "$RESTORE_DIR/device-$run"
    rm -rf "$RESTORE_DIR/device-$run" "$rd/repo"
    unset XDG_CACHE_HOME CHUNKVAULT_REPO
done

machine="$(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), \
$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr), \
load $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$RAW" "$CORPUS_BYTES" "$CORPUS_FILES" "$RUNS" "$machine" "$("$CHUNKVAULT" --version 2>/dev/null | head -n1)" \
    "$RESTORE_DIR" "$SERVER_ROOT" >"$RESULTS" <<'PY'
import csv, statistics, sys
raw, cbytes, cfiles, runs, machine, version, restore_dir, server_root = sys.argv[1:]
cbytes = int(cbytes)
allrows = list(csv.DictReader(open(raw), delimiter="\t"))
rows = [r for r in allrows if r["wall_s"] != "failed"]
failed = [f"run {r['run']} {r['step']}" for r in allrows if r["wall_s"] == "failed"]
steps = ["local-backup", "device-backup", "local-rehash", "device2-backup", "local-restore", "device-restore"]
def vals(step, f):
    return [f(r) for r in rows if r["step"] == step]
def wall(r): return float(r["wall_s"])
def ccpu(r): return float(r["client_user_s"]) + float(r["client_sys_s"])
def scpu(r): return float(r["server_cpu_s"]) if r["step"].startswith("device") else 0.0
def tcpu(r): return ccpu(r) + scpu(r)
def mbs(r): return cbytes / 1e6 / max(wall(r), 0.01)
def crss(r): return int(r["client_rss_kib"]) / 1024
def srss(r): return int(r["server_hwm_kib"]) / 1024
med = lambda step, f: statistics.median(vals(step, f))
def cell(step, f, fmt="{:.2f}"):
    v = vals(step, f)
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"
out = []
p = out.append
p("# chunkvault: device against local\n")
p(f"Corpus: {cfiles} files, {cbytes} bytes; {runs} run(s), steps alternating in each run, "
  f"warm page cache; restores to {restore_dir}; server on 127.0.0.1 on the same machine, "
  f"its root {server_root}.\n")
p(f"Machine: {machine}. Binary: {version}.\n")
def stcpu(r): return float(r["storage_cpu_s"])
# The storage column only when --storage-pids were watched.
storage = any(stcpu(r) > 0 for r in rows)
p("Median (min–max). CPU s: user + system. Server columns: `chunkvault serve` during the step "
  "(its peak RSS reset before each step)"
  + ("; storage CPU: the processes serving its root (`--storage-pids`), not in the total" if storage else "")
  + ".\n")
p("| step | wall s | MB/s | client CPU s | server CPU s | total CPU s | client peak RSS MiB | server peak RSS MiB |"
  + (" storage CPU s |" if storage else ""))
p("|---|---|---|---|---|---|---|---|" + ("---|" if storage else ""))
for s in steps:
    if not vals(s, wall):
        continue
    dev = s.startswith("device")
    p(f"| {s} | {cell(s, wall)} | {cell(s, mbs, '{:.0f}')} | {cell(s, ccpu)} | "
      f"{cell(s, scpu) if dev else '-'} | {cell(s, tcpu)} | {cell(s, crss, '{:.0f}')} | "
      f"{cell(s, srss, '{:.0f}') if dev else '-'} |" + (f" {cell(s, stcpu)} |" if storage else ""))
if failed:
    p("\n**Failed steps** (not in the medians; see the log): " + "; ".join(failed) + ".")
p("\n## Against the targets of issue 16 (ratios of medians)\n")
def ratio(a, b):
    try:
        return f"{a():.2f}"
    except (statistics.StatisticsError, ZeroDivisionError):
        return "n/a (failed)"
p("| target | measured | goal |")
p("|---|---|---|")
p(f"| device backup throughput / local backup | {ratio(lambda: med('local-backup', wall) / med('device-backup', wall), 0)} | ≥ 0.80 |")
p(f"| device + server CPU / local backup CPU | {ratio(lambda: med('device-backup', tcpu) / med('local-backup', tcpu), 0)} | ≤ 1.50 |")
p(f"| device restore throughput / local restore | {ratio(lambda: med('local-restore', wall) / med('device-restore', wall), 0)} | ≥ 0.80 |")
p(f"| second device time / local chunk+hash (`backup --force`) | {ratio(lambda: med('device2-backup', wall) / med('local-rehash', wall), 0)} | ≤ 1.50 |")
p("\n## Raw\n")
p("| run | step | wall s | client RSS KiB | client user s | client sys s | server CPU s | server peak KiB | storage CPU s |")
p("|---|---|---|---|---|---|---|---|---|")
for r in allrows:
    p(f"| {r['run']} | {r['step']} | {r['wall_s']} | {r['client_rss_kib']} | {r['client_user_s']} | "
      f"{r['client_sys_s']} | {r['server_cpu_s']} | {r['server_hwm_kib']} | {r['storage_cpu_s']} |")
print("\n".join(out))
PY
echo
cat "$RESULTS"
log "results in $RESULTS (raw $RAW, log $LOG)"
