#!/usr/bin/env python3
"""Edits a share of a corpus's files in place, and undoes it.

`edit_corpus.py CORPUS --apply SAVE [--percent P] [--seed S]` picks P% of the
regular files (a seeded sample of the sorted list, so the same arguments pick
the same files), copies each to SAVE (with its metadata), then inserts 64
seeded random bytes in the middle of it: the edit a user makes to a document,
which a content-defined chunker should absorb by re-storing only the chunks
around the insertion.

`edit_corpus.py CORPUS --revert SAVE` copies the saved originals back
(contents, mode and mtime) and removes SAVE, so the corpus is byte-identical
to before. It prints a one-line JSON summary either way.
"""

import argparse
import json
import os
import random
import shutil
import sys

INSERT_LEN = 64


def regular_files(root):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.append(os.path.relpath(path, root))
    return found


def apply(corpus, save, percent, seed):
    if os.path.exists(save):
        sys.exit(f"edit_corpus: {save} exists: revert the previous edit first")
    files = regular_files(corpus)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(files, max(1, len(files) * percent // 100)))
    os.makedirs(save)
    edited_bytes = 0
    for i, rel in enumerate(chosen):
        src = os.path.join(corpus, rel)
        # Flat numbered copies: the relative paths live in the list below.
        shutil.copy2(src, os.path.join(save, str(i)))
        with open(src, "rb") as f:
            data = f.read()
        mid = len(data) // 2
        st = os.stat(src)
        with open(src, "wb") as f:
            f.write(data[:mid] + rng.randbytes(INSERT_LEN) + data[mid:])
        # A later mtime, as a real edit gives, so mtime-based change
        # detection (every tool here uses it) sees the file as changed.
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        edited_bytes += len(data) + INSERT_LEN
    with open(os.path.join(save, "files.json"), "w") as f:
        json.dump(chosen, f)
    print(json.dumps({"edited_files": len(chosen), "of": len(files), "edited_bytes": edited_bytes}))


def revert(corpus, save):
    with open(os.path.join(save, "files.json")) as f:
        chosen = json.load(f)
    for i, rel in enumerate(chosen):
        shutil.copy2(os.path.join(save, str(i)), os.path.join(corpus, rel))
    shutil.rmtree(save)
    print(json.dumps({"reverted_files": len(chosen)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("corpus")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--apply", metavar="SAVE")
    group.add_argument("--revert", metavar="SAVE")
    ap.add_argument("--percent", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.apply:
        apply(args.corpus, args.apply, args.percent, args.seed)
    else:
        revert(args.corpus, args.revert)


if __name__ == "__main__":
    main()
