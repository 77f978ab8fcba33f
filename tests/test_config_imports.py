"""The job entrypoints import one way (issue 10: ``jobs.runner`` and ``jobs.service_runner`` imported each other).

Every ``import jobs.X`` / ``from jobs import X`` / ``from jobs.X import ...`` counts, a deferred one inside a
function too: a cycle hidden in a function body still means neither module can be understood (or tested) without
the other."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def _jobs_imports(path: Path) -> set[str]:
    """Names of the ``jobs`` modules that ``path`` imports anywhere in its body."""
    modules = {p.stem for p in JOBS.glob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from jobs import infer` names the module in the alias; `from jobs.rows import x` in the module
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "jobs" and len(parts) > 1 and parts[1] in modules:
                out.add(parts[1])
    out.discard(path.stem)
    return out


def import_graph() -> dict[str, set[str]]:
    return {p.stem: _jobs_imports(p) for p in sorted(JOBS.glob("*.py")) if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None. Depth-first with three colours."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    # the walker itself: a -> b -> c -> a is reported from its first node; a DAG is not
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_walk_sees_deferred_imports():
    # jobs.runner imports service_runner only inside make_runner: the walk must still see that edge
    assert "service_runner" in import_graph()["runner"]


def test_no_import_cycle_among_jobs_modules():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("module", ["jobs.runner", "jobs.service_runner"])
def test_runner_modules_import_alone(module):
    # a fresh interpreter, neither module imported before: each loads on its own and does not pull in the other
    other = {"jobs.runner": "jobs.service_runner", "jobs.service_runner": "jobs.runner"}[module]
    code = f"import sys, importlib; importlib.import_module({module!r}); assert {other!r} not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
