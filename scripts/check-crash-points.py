#!/usr/bin/env python3
"""Check the crash points (`make check`, lib/crash.h):

  - every IB_CRASH_POINT("name") in the code is in lib/crash.c's table, and
    every name in the table is used in the code, exactly where it says;
  - every function that changes the cache's state in more than one
    operation (a file moved or removed, and a row written, in the files
    below) has at least one crash point between them, so a new commit path
    cannot go untested by tests/integration/t1200-crash-points.sh.
"""
import os
import re
import sys

FILES = ["cache/cache.c", "cache/gc.c", "cache/verify.c", "builder/python.c", "builder/gitsrc.c", "server/queue.c"]
# a change of files that a row (or another file) depends on
FILE_OPS = re.compile(r"\b(rename|renameat2?|unlink|ib_rm_rf|ib_cache__discard_dir|git_repository_init)\s*\(")
# a change of the index (or of the build records)
ROW_OPS = re.compile(r'\b(ib_cache__delete_layer_row|ib_builds_(insert|start|finish)|ib_cache_layer_remove)\s*\(|'
                     r'"(INSERT|UPDATE|DELETE)[ A-Z]|BEGIN IMMEDIATE')
CRASH = re.compile(r'IB_CRASH_POINT\((?:[^"()]*\?\s*)?"([^"]+)"(?:\s*:\s*"([^"]+)")?\)')
# functions that only remove what no row names (no row is written), or move one thing
EXEMPT = {
    "cache/verify.c": {"orphan", "sweep_store", "sweep_downloads", "sweep_git", "drop_image", "drop_layer"},
}


def functions(text):
    """(name, body) of each top-level function definition."""
    out = []
    for m in re.finditer(r"^[a-z][^\n;]*?\b(\w+)\([^;{]*?\)\s*\n\{\n(.*?)^\}", text, re.M | re.S):
        out.append((m.group(1), m.group(2)))
    return out


def main(top):
    problems = []
    with open(os.path.join(top, "lib/crash.c"), encoding="utf-8") as f:
        table = set(re.findall(r'^\t\{ "([a-z0-9:-]+)",', f.read(), re.M))
    used = set()
    for root in ["lib", "steps", "spec", "layer", "cache", "builder", "server", "cli"]:
        for name in os.listdir(os.path.join(top, root)):
            if not name.endswith(".c") or (root == "lib" and name == "crash.c"):
                continue
            with open(os.path.join(top, root, name), encoding="utf-8") as f:
                for m in CRASH.finditer(f.read()):
                    for n in m.groups():
                        if n:
                            used.add(n)
                            if n not in table:
                                problems.append(f"{root}/{name}: crash point '{n}' is not in lib/crash.c's table")
    for n in sorted(table - used):
        problems.append(f"lib/crash.c: crash point '{n}' is used nowhere")

    checked = 0
    for rel in FILES:
        with open(os.path.join(top, rel), encoding="utf-8") as f:
            text = f.read()
        for fn, body in functions(text):
            if fn in EXEMPT.get(rel, ()):
                continue
            if FILE_OPS.search(body) and ROW_OPS.search(body):
                checked += 1
                if "IB_CRASH_POINT" not in body:
                    problems.append(f"{rel}: {fn}() moves files and writes rows with no crash point between "
                                    "(add one to lib/crash.c's table and to t1200's actions)")
    for p in problems:
        print("check-crash-points: " + p)
    if not problems:
        print(f"check-crash-points: {len(table)} crash points, all used; {checked} commit functions have theirs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
