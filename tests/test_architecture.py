"""The package's layout rules: floors that import only from below, no import cycle, a light `import rsae`
without side effects, and no library code that changes the environment (HF_HUB_OFFLINE above all)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rsae

from helpers import make_sae

PACKAGE = Path(rsae.__file__).resolve().parent
FLOORS = ("_io", "rational", "nn", "zoo", "integrations", "data", "eval", "train", "cli")
"""Bottom to top, the order of the data flow: a module imports only from its own floor and those below."""
HEAVY = ("lightning", "transformers", "transformer_lens", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def rsae_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """rsae modules that `path` imports anywhere (module level or inside functions): `from rsae.a import b`
    counts as rsae.a.b where that is a module, else as rsae.a."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "rsae")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rsae":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: rsae_imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 else None  # the top-level rsae/__init__ has no floor


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_sits_on_a_floor_and_imports_only_from_below() -> None:
    graph = import_graph()
    upward = []
    for module, imported in graph.items():
        floor = floor_of(module)
        if module == "rsae":
            continue
        assert floor is not None, f"{module} is on no floor; floors are {FLOORS}"
        upward += [f"{module} -> {other}" for other in imported
                   if other != "rsae" and (floor_of(other) or 0) > floor]
        assert "rsae" not in imported, f"{module} imports the top-level rsae package; import the floor it needs"
    assert not upward, "imports from a higher floor: " + "; ".join(sorted(upward))


def test_import_rsae_and_load_are_light_and_change_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    rsae.save(make_sae("topk"), folder)
    script = f"""
import json, os, sys, warnings
import numpy, safetensors, torch  # rsae's own dependencies, whose import-time settings are theirs
environ, filters = dict(os.environ), list(warnings.filters)
import rsae
model = rsae.load({str(folder)!r})
model(__import__("torch").randn(2, model.cfg.d_in))
print(json.dumps({{"heavy": sorted({{m.split(".")[0] for m in sys.modules}} & set({list(HEAVY)!r})),
                  "environ_changed": sorted(k for k in set(environ) | set(os.environ)
                                            if environ.get(k) != os.environ.get(k)),
                  "filters_changed": warnings.filters != filters}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "environ_changed": [], "filters_changed": False}, result


def test_library_code_never_writes_the_environment() -> None:
    """No `os.environ[...] = ...`, `os.environ.setdefault/update/pop`, `os.putenv` in the package: a user's
    HF_HUB_OFFLINE (or anything else) is theirs. Tests and .ci/run set what they need for themselves."""
    offenders = []
    for name, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            target = None
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t for t in targets if isinstance(t, ast.Subscript)
                               and ast.unparse(t.value).endswith("environ")), None)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if (owner.endswith("environ") and node.func.attr in ("setdefault", "update", "pop", "clear")) or \
                        node.func.attr == "putenv":
                    target = node
            if target is not None:
                offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offenders, "library code writes the environment: " + "; ".join(offenders)


@pytest.mark.real_model
def test_built_in_model_never_reaches_the_network(tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE unset and the Hub endpoint pointed at a local server that records every request,
    loading the built-in model sends nothing (the Hub is unreachable here; a user with one keeps it)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    requests: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        script = ("from rsae.data.lm import load_lm; lm = load_lm(verbose=False); "
                  "print(lm.name, lm.d_model, len(lm.hook_names()))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["smollm2-135m", "576"]
    assert requests == [], f"the built-in model sent requests to the Hub endpoint: {requests}"
