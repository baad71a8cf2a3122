"""The dependency rule of docs/ARCHITECTURE.md, checked on the source (every import statement,
including the ones inside functions):

* ``keyface/`` imports nothing else of the repository and nothing of ComfyUI;
* ``nodes/`` imports only ``keyface/`` (and ComfyUI's modules);
* nothing outside ``tests/`` imports a module of ``tests/`` (nor puts ``tests/`` on ``sys.path``);
* the modules of ``keyface/`` import each other without cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "execution",
                 "node_helpers", "latent_preview", "app", "nodes"}
# top-level names of the repository's own code outside keyface/ (import targets keyface must not use)
REPO_TOP = {"nodes", "bench", "scripts", "tests", "js", "workflows"}
SKIP_DIRS = {".venv", ".comfyui", ".git", "node_modules", ".cache", "__pycache__"}


def python_files(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path):
    """(absolute module name or None, level, raw) for each import; relative ones resolved against the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module, 0
                continue
            base = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else None
            if base is None or (node.level - 1 > len(package)):
                yield None, node.level  # above the repository root
                continue
            if node.module:
                yield ".".join(base + [node.module]), node.level
            else:
                for alias in node.names:
                    yield ".".join(base + [alias.name]), node.level


def test_keyface_imports_only_itself_and_third_party():
    bad = []
    for path in python_files(ROOT / "keyface"):
        for name, level in imports(path):
            top = (name or "").split(".")[0]
            if name is None or (level and top != "keyface"):
                bad.append(f"{path.relative_to(ROOT)}: relative import leaves keyface/")
            elif level == 0 and top in COMFY_MODULES | REPO_TOP:
                bad.append(f"{path.relative_to(ROOT)}: imports {name}")
            elif level == 0 and top == "keyface":
                bad.append(f"{path.relative_to(ROOT)}: 'import {name}' (keyface uses relative imports: the pack is "
                           "imported under a mangled name inside ComfyUI)")
    assert not bad, "\n".join(bad)


def test_nodes_import_only_keyface_and_comfyui():
    bad = []
    for path in python_files(ROOT / "nodes"):
        for name, level in imports(path):
            top = (name or "").split(".")[0]
            if level == 0:
                if top in REPO_TOP - {"nodes"} or top == "keyface":
                    bad.append(f"{path.relative_to(ROOT)}: imports {name} (use relative imports of ..keyface)")
            elif top not in ("nodes", "keyface"):
                bad.append(f"{path.relative_to(ROOT)}: relative import of {name or '(above the repository)'}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_tests():
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")} | {
        p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    bad = []
    for path in python_files(ROOT):
        if path.relative_to(ROOT).parts[0] == "tests":
            continue
        for name, level in imports(path):
            top = (name or "").split(".")[0]
            if level == 0 and (top in test_modules or top == "tests"):
                bad.append(f"{path.relative_to(ROOT)}: imports {name} from tests/")
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("insert", "append", "extend")
                    and "sys.path" in ast.unparse(node.func.value) and "tests" in ast.unparse(node)):
                bad.append(f"{path.relative_to(ROOT)}: puts tests/ on sys.path: {ast.unparse(node)}")
            if isinstance(node, ast.Assign) and any("sys.path" in ast.unparse(t) for t in node.targets) \
                    and "tests" in ast.unparse(node.value):
                bad.append(f"{path.relative_to(ROOT)}: puts tests/ on sys.path: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def keyface_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in python_files(ROOT / "keyface")}
    graph = {}
    for mod, path in modules.items():
        deps = set()
        for name, level in imports(path):
            if not name or not name.startswith("keyface"):
                continue
            # "from . import x" resolves to keyface.x; "from .a import b" to keyface.a (b may be a name)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != mod and not (path.name == "__init__.py" and name.startswith(mod + ".")):
                deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_keyface_has_no_import_cycles():
    cycle = find_cycle(keyface_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
])
def test_cycle_finder(graph, cycle):
    assert (find_cycle(graph) is not None) == cycle


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    """The checks are not vacuous: a keyface module importing tests/ or ComfyUI, and a cycle, are caught."""
    fake = tmp_path / "keyface"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from . import b\nimport folder_paths\n")
    (fake / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helper.py").write_text("")
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "x.py").write_text("import helper\nfrom ..bench import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert find_cycle(keyface_graph()) is not None
    with pytest.raises(AssertionError, match="folder_paths"):
        test_keyface_imports_only_itself_and_third_party()
    with pytest.raises(AssertionError, match="imports helper from tests"):
        test_nothing_imports_tests()
    with pytest.raises(AssertionError, match="relative import"):
        test_nodes_import_only_keyface_and_comfyui()
