#!/usr/bin/env bash
# Backs up a real folder into a fresh local repository, backs it up again
# (nothing changed: nothing new is stored), restores it, and proves the
# restore is identical. Usage: scripts/demo.sh [FOLDER] (default /usr/share/doc)
set -euo pipefail
cd "$(dirname "$0")/.."

src=$(realpath "${1:-/usr/share/doc}")
[ -d "$src" ] || { echo "demo: $src is not a directory" >&2; exit 1; }

echo "== building chunkvault (release)"
cargo build --release --quiet
cv=$PWD/target/release/chunkvault

work=$(mktemp -d /tmp/chunkvault-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export CHUNKVAULT_REPO=$work/repo
export CHUNKVAULT_PASSWORD=demo-password

echo "== init a repository at $CHUNKVAULT_REPO"
$cv init
echo "== backup $src ($(du -sh "$src" | cut -f1))"
$cv backup "$src" --tag demo
echo "== backup again: unchanged files are not read, nothing new is stored"
$cv backup "$src" --tag demo
$cv snapshots
echo "== check --read-data: every blob decrypted and verified"
$cv check --read-data
echo "== restore latest to $work/restore"
$cv restore latest --target "$work/restore"
echo "== compare"
diff -r --no-dereference "$src" "$work/restore$src"
echo "repository size: $(du -sh "$CHUNKVAULT_REPO" | cut -f1); source: $(du -sh "$src" | cut -f1)"
echo "demo: restore is identical to $src"
