"""The package itself: `import diffusers_pdmd` is light (lazy public names) and its modules import without cycles."""

import ast
import os
import pathlib
import subprocess
import sys

import diffusers_pdmd


SRC = pathlib.Path(diffusers_pdmd.__file__).resolve().parent


def _fresh_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout


def test_import_is_light_and_public_names_load_on_first_use():
    out = _fresh_python(
        "import sys, diffusers_pdmd, diffusers_pdmd.pipelines, diffusers_pdmd.schedulers\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))\n"
        "from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline\n"
        "assert all(hasattr(diffusers_pdmd, name) for name in diffusers_pdmd.__all__)\n"
        "assert set(diffusers_pdmd.__all__) <= set(dir(diffusers_pdmd))\n"
        "print(PhasedDMDScheduler.__module__, PhasedMoEPipeline.__module__, 'diffusers' in sys.modules)"
    )
    assert out.split("\n")[0] == "[]"  # neither torch nor diffusers until a class is used
    assert out.split("\n")[1].split() == [
        "diffusers_pdmd.schedulers.scheduling_phased_dmd",
        "diffusers_pdmd.pipelines.pipeline_phased_moe",
        "True",
    ]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in paths and t != name)
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    assert "diffusers_pdmd.metrics" in graph["diffusers_pdmd.digits"]  # the graph sees imports
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_trainer_functions_fit_on_a_screen():
    """Each step of the trainer reads on one screen (issue 21): no function in training/ over 80 lines."""
    long = []
    for path in sorted((SRC / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
