#!/usr/bin/env python3
"""Build a deterministic mixed backup-benchmark corpus.

    make_corpus.py DEST --size-mib N [--random-percent P] [--seed S]

The corpus is made of two parts:

* real files copied from /usr/share, /usr/lib, /usr/include and /usr/bin
  (walked in that order, each tree in sorted order, regular files only,
  symlinks not followed, files over 64 MiB and unreadable files skipped) until
  (100-P)% of N MiB is reached; they keep their path relative to / (so
  /usr/share/doc/x lands in DEST/usr/share/doc/x), their permission bits and
  their mtime;
* P% (default 10) of N MiB of incompressible pseudo-random data from
  random.Random(seed).randbytes, as a handful of files of varied sizes
  (1 KiB .. 64 MiB) in DEST/random/.

The same arguments give a byte-identical corpus on the same machine (same
/usr contents). The corpus is built in DEST.partial and renamed into place;
DEST/.corpus-stamp records the arguments and the summary, and a later run with
the same arguments does nothing. A DEST that exists without a stamp is never
deleted: the script refuses instead.

Prints one line of JSON on stdout: {"dest", "files", "bytes", ..., "cached"}.
"""

import argparse
import json
import os
import random
import shutil
import stat
import sys

SOURCES = ["/usr/share", "/usr/lib", "/usr/include", "/usr/bin"]
MAX_FILE = 64 * 1024 * 1024
# Random files cycle through these sizes; the last one is cut to fit.
RANDOM_SIZES = [
    1 << 10,
    16 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
]
RANDOM_MTIME = 1_577_836_800  # 2020-01-01T00:00:00Z, fixed for determinism
STAMP = ".corpus-stamp"
STAMP_VERSION = 1
COPY_BUF = 1 << 20


def die(msg):
    print(f"make_corpus.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def walk_sorted(root):
    """Yield the regular files under root, depth-first, in sorted order."""
    def onerror(err):
        print(f"make_corpus.py: skipping {err.filename}: {err.strerror}", file=sys.stderr)

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def copy_file(src, dst, st):
    """Copy src to dst; return the bytes copied, or None if src is unreadable."""
    try:
        fin = open(src, "rb")
    except OSError:
        return None
    copied = 0
    try:
        with fin, open(dst, "wb") as fout:
            while True:
                buf = fin.read(COPY_BUF)
                if not buf:
                    break
                fout.write(buf)
                copied += len(buf)
    except OSError as err:
        print(f"make_corpus.py: skipping {src}: {err}", file=sys.stderr)
        try:
            os.unlink(dst)
        except OSError:
            pass
        return None
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))
    return copied


def copy_real_files(dest, budget):
    files = 0
    total = 0
    made_dirs = set()
    for root in SOURCES:
        if total >= budget:
            break
        if not os.path.isdir(root):
            continue
        for src in walk_sorted(root):
            remaining = budget - total
            if remaining <= 0:
                break
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # symlinks, sockets, ...
            if st.st_size > MAX_FILE or st.st_size > remaining:
                # Too big for the corpus, or for what is left of the budget:
                # skipping (rather than stopping) lets smaller files fill the
                # remainder, so the corpus size lands close to the target.
                continue
            rel = os.path.relpath(src, "/")
            dst = os.path.join(dest, rel)
            parent = os.path.dirname(dst)
            if parent not in made_dirs:
                os.makedirs(parent, exist_ok=True)
                made_dirs.add(parent)
            copied = copy_file(src, dst, st)
            if copied is None:
                continue
            files += 1
            total += copied
    return files, total


def write_random_files(dest, budget, seed):
    rng = random.Random(seed)
    rdir = os.path.join(dest, "random")
    os.makedirs(rdir, exist_ok=True)
    files = 0
    total = 0
    i = 0
    while total < budget:
        size = min(RANDOM_SIZES[i % len(RANDOM_SIZES)], budget - total)
        path = os.path.join(rdir, f"rand-{i:03d}-{size}.bin")
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, COPY_BUF)
                f.write(rng.randbytes(n))
                left -= n
        os.chmod(path, 0o644)
        os.utime(path, (RANDOM_MTIME, RANDOM_MTIME))
        files += 1
        total += size
        i += 1
    return files, total


def read_stamp(dest):
    try:
        with open(os.path.join(dest, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(
        description="Build a deterministic mixed corpus (real /usr files + seeded random data)."
    )
    ap.add_argument("dest", help="directory to create")
    ap.add_argument("--size-mib", type=int, required=True, help="total corpus size in MiB")
    ap.add_argument("--random-percent", type=float, default=10.0,
                    help="share of incompressible random data, in percent (default 10)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random data (default 1)")
    args = ap.parse_args()

    if args.size_mib <= 0:
        die("--size-mib must be positive")
    if not 0 <= args.random_percent <= 100:
        die("--random-percent must be between 0 and 100")

    dest = os.path.abspath(args.dest)
    params = {
        "version": STAMP_VERSION,
        "size_mib": args.size_mib,
        "random_percent": args.random_percent,
        "seed": args.seed,
        "sources": SOURCES,
    }

    stamp = read_stamp(dest) if os.path.isdir(dest) else None
    if stamp is not None and stamp.get("params") == params:
        print(json.dumps({"dest": dest, **stamp["summary"], "cached": True}))
        return
    if os.path.lexists(dest):
        if stamp is None:
            die(f"{dest} exists and is not a corpus made by this script "
                f"(no {STAMP}); remove it or choose another DEST")
        shutil.rmtree(dest)  # an older corpus with other arguments

    total_bytes = args.size_mib * 1024 * 1024
    random_budget = int(total_bytes * args.random_percent / 100)
    real_budget = total_bytes - random_budget

    partial = dest + ".partial"
    if os.path.lexists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)

    real_files, real_bytes = copy_real_files(partial, real_budget)
    rand_files, rand_bytes = write_random_files(partial, random_budget, args.seed)

    # No DEST in the stamp: two corpora built elsewhere stay byte-identical.
    summary = {
        "files": real_files + rand_files,
        "bytes": real_bytes + rand_bytes,
        "real_files": real_files,
        "real_bytes": real_bytes,
        "random_files": rand_files,
        "random_bytes": rand_bytes,
    }
    if real_bytes < real_budget * 0.9:
        print(f"make_corpus.py: warning: only {real_bytes} bytes of real files found "
              f"(wanted {real_budget})", file=sys.stderr)

    # Directory mtimes are set last (writing files changes them) so they are
    # deterministic too; the stamp is written before, as the last file.
    with open(os.path.join(partial, STAMP), "w") as f:
        json.dump({"params": params, "summary": summary}, f, sort_keys=True)
        f.write("\n")
    os.utime(os.path.join(partial, STAMP), (RANDOM_MTIME, RANDOM_MTIME))
    for dirpath, _dirs, _files in os.walk(partial, topdown=False):
        os.utime(dirpath, (RANDOM_MTIME, RANDOM_MTIME))

    os.rename(partial, dest)
    print(json.dumps({"dest": dest, **summary, "cached": False}))


if __name__ == "__main__":
    main()
