#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a circle.

Usage: module-cycles.py CRATE_SRC_DIR...

Every `crate::a::b` and `super::x` path in a file is an edge from the file's module to the deepest
module the path names. An edge counts between the two sibling modules it crosses under their common
parent (`shim::container::start` -> `shim::task` is `container` -> `task`); a module naming its own
parent or child (re-exports, `super::Item`) is not a cycle. Each set of siblings must form a DAG.
"""

import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)")
USE_GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^}]*)\}", re.S)


def module_of(src: Path, file: Path) -> tuple:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def resolve(module: tuple, is_mod_file: bool, anchor: str, rest: list, modules: set) -> tuple:
    if anchor == "crate":
        base = ()
    else:
        # `super` in a.rs (module a) and in a/mod.rs is the parent of module a
        base = module[:-1]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    target = base
    for part in rest:
        if target + (part,) in modules:
            target = target + (part,)
        else:
            break
    return target


def edges_of(src: Path, file: Path, modules: set):
    module = module_of(src, file)
    text = strip_comments(file.read_text())
    found = set()
    for m in USE_GROUP.finditer(text):
        prefix = [p for p in m.group(2).split("::") if p]
        for item in m.group(3).split(","):
            first = item.strip().split("::")[0].split(" ")[0]
            if first and first != "self":
                found.add(resolve(module, False, m.group(1), prefix + [first], modules))
            elif first == "self":
                found.add(resolve(module, False, m.group(1), prefix, modules))
    for m in PATH.finditer(text):
        rest = [p for p in m.group(2).split("::") if p and p != "{"]
        found.add(resolve(module, False, m.group(1), rest, modules))
    return module, found


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def check(src: Path) -> list:
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(src, f) for f in files}
    siblings = {}  # parent -> {child: {child}}
    for file in files:
        module, targets = edges_of(src, file, modules)
        for target in targets:
            common = 0
            while common < min(len(module), len(target)) and module[common] == target[common]:
                common += 1
            if common == len(module) or common == len(target):
                continue  # the same module, its parent or its child
            parent = module[:common]
            siblings.setdefault(parent, {}).setdefault(module[common], set()).add(target[common])
    problems = []
    for parent, graph in sorted(siblings.items()):
        cycle = find_cycle(graph)
        if cycle:
            where = "::".join(parent) or "the crate root"
            problems.append(f"{src}: modules under {where} import each other in a circle: {' -> '.join(cycle)}")
    return problems


def main() -> int:
    problems = [p for src in sys.argv[1:] for p in check(Path(src))]
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"module imports: no cycles in {', '.join(sys.argv[1:])}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
