"""The import graph of ``app/``: no cycles, and every arrow points down the layers.

A request flows api -> dispatch -> routing -> failover -> providers and back
out through relay -> wire; each layer below may be imported by the ones above
it, never the other way. Every import counts, also those inside functions and
under ``TYPE_CHECKING``: a cycle hidden there is still a cycle to a reader.
The README's architecture section lists the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

# Bottom to top. A module may import modules of lower layers, and of its own
# layer only inside its own group (a package: providers, relay, wire, streams, api).
LAYERS: list[list[str]] = [
    ["app.errors"],
    ["app.config", "app.logs"],
    ["app.events", "app.requests", "app.circuit", "app.sharedstate"],
    ["app.metrics", "app.ratelimit"],
    ["app.capacity"],
    ["app.providers"],
    ["app.routing"],
    ["app.upstreams"],
    ["app.failover"],
    ["app.relay"],
    ["app.wire"],
    ["app.streams"],
    ["app.telemetry"],
    ["app.dispatch"],
    ["app.shutdown"],
    ["app.guard", "app.middleware"],
    ["app.api"],
    ["app.main"],
    ["app.server"],
    ["app.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(APP.rglob("*.py"))}
    found.pop("app")  # the package's docstring; it imports nothing
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The app modules ``name`` imports (``from app.x import y`` counts ``app.x.y`` when
    that is a module, else ``app.x``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        # ``from app.x import y``: y is a module, or a name in app.x (counted as app.x).
        found.update(t for t in targets if t in known)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the group the module belongs to: the longest matching prefix)."""
    best: tuple[int, str] | None = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (i, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and the README)"
    return best


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read() -> None:
    edges = graph()
    # A few arrows every version of the gateway has: the check sees imports at all.
    assert "app.events" in edges["app.relay.generation"]
    assert "app.errors" in edges["app.events"]
    assert "app.dispatch" in edges["app.api.deps"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_only_point_down() -> None:
    upward = []
    for source, targets in sorted(graph().items()):
        src_layer, src_group = layer_of(source)
        for target in sorted(targets):
            dst_layer, dst_group = layer_of(target)
            if dst_layer < src_layer:
                continue
            if dst_layer == src_layer and src_group == dst_group:
                continue  # inside one package (or one module's group): the cycle check guards
            upward.append(f"{source} -> {target}")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


def test_the_checks_catch_what_they_should() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("app.relay.watchdog") < layer_of("app.dispatch")
    assert layer_of("app.api.ws")[0] == len(LAYERS) - 4
