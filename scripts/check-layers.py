#!/usr/bin/env python3
"""Check that the source folders are layers: `make check`.

Each folder includes only folders below it (README, "Layout"):

    lib < steps < spec < layer < cache < builder < server < cli, init

and there are no include cycles between modules.  A module is a header and
the source of the same name in one folder (cache/cache.h + cache/cache.c);
a private header named <module>-internal.h belongs to <module>.  Every
include of our own is spelt from the top ("lib/util.h") and names a file
that exists.  Tests and benchmarks may include anything.

Exit 0 when clean; otherwise one line per problem and exit 1.
"""
import os
import re
import sys

RANK = {"lib": 0, "steps": 1, "spec": 2, "layer": 3, "cache": 4, "builder": 5, "server": 6, "cli": 7, "init": 7}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def module_of(path):
    folder, name = os.path.split(path)
    base = os.path.splitext(name)[0]
    if base.endswith("-internal"):
        base = base[: -len("-internal")]
    return folder + "/" + base


def find_cycle(graph):
    """A cycle in graph (node -> set of nodes) as a list, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m, WHITE) == GREY:
                return stack[stack.index(m):] + [m]
            if color.get(m, WHITE) == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def main(top):
    problems = []
    files = {}
    for folder in RANK:
        d = os.path.join(top, folder)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if name.endswith((".c", ".h")):
                rel = folder + "/" + name
                with open(os.path.join(top, rel), encoding="utf-8") as f:
                    files[rel] = INCLUDE.findall(f.read())

    file_graph = {}
    module_graph = {}
    for rel, incs in files.items():
        folder = rel.split("/")[0]
        mod = module_of(rel)
        file_graph.setdefault(rel, set())
        module_graph.setdefault(mod, set())
        for inc in incs:
            if "/" not in inc:
                problems.append(f"{rel}: #include \"{inc}\": spell our includes from the top (\"{folder}/{inc}\")")
                continue
            target_folder = inc.split("/")[0]
            if target_folder not in RANK:
                problems.append(f"{rel}: #include \"{inc}\": not a source folder")
                continue
            if not os.path.exists(os.path.join(top, inc)):
                problems.append(f"{rel}: #include \"{inc}\": no such file")
                continue
            if target_folder != folder and RANK[target_folder] >= RANK[folder]:
                problems.append(f"{rel}: #include \"{inc}\": {folder}/ may include only folders below it "
                                f"({', '.join(f for f in RANK if RANK[f] < RANK[folder]) or 'none'})")
            file_graph[rel].add(inc)
            target_mod = module_of(inc)
            if target_mod != mod:
                module_graph[mod].add(target_mod)

    cycle = find_cycle(file_graph)
    if cycle:
        problems.append("file include cycle: " + " -> ".join(cycle))
    cycle = find_cycle(module_graph)
    if cycle:
        problems.append("module include cycle: " + " -> ".join(cycle))

    for p in problems:
        print("check-layers: " + p)
    if not problems:
        print(f"check-layers: {len(files)} files in {len(module_graph)} modules, "
              f"{sum(len(v) for v in module_graph.values())} module dependencies, all downward, no cycles")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
