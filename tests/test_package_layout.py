"""The package's shape: no import loop, the pure subpackages import no Lightning, files stay small.

Imports are read with ``ast`` from the source (every ``import`` statement, also inside functions and
under ``TYPE_CHECKING``), so the test sees what the code says, not what one import order happened
to load.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_gsgd"
ROOT = "lightning_gsgd"

# What each subpackage may import from the package (besides itself); see its module docstring.
ALLOWED = {
    "topology": set(),
    "step": {"topology"},
    "optim": {"topology", "step"},
    "diagnostics": {"topology", "step", "optim"},
    "lightning": {"topology", "step", "optim", "diagnostics"},
}
NO_LIGHTNING = ("topology", "step", "optim", "diagnostics")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str) -> list[str]:
    """Every module name ``path`` imports (relative imports resolved against ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` as a list of modules, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_through_others():
    assert _cycle(_graph()) is None


def test_the_walk_sees_the_package():
    graph = _graph()
    assert "lightning_gsgd.optim.gsgd" in graph["lightning_gsgd"]
    assert "lightning_gsgd.step.hyper" in graph["lightning_gsgd.step.slots"]
    assert set(ALLOWED) <= {name.split(".")[1] for name in graph if name.count(".") >= 1}


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_each_subpackage_imports_only_what_its_docstring_allows(sub):
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if not name.startswith(f"{ROOT}.{sub}"):
            continue
        for target in _imports(path, name):
            parts = target.split(".")
            if parts[0] == ROOT and target != ROOT and len(parts) > 1:
                if parts[1] != sub and parts[1] not in ALLOWED[sub] and parts[1] in ALLOWED:
                    bad.append(f"{name} -> {target}")
            if sub in NO_LIGHTNING and parts[0] in ("lightning", "pytorch_lightning"):
                bad.append(f"{name} -> {target}")
    assert not bad


def test_no_subpackage_module_imports_the_top_level_package():
    # ``lightning_gsgd/__init__.py`` imports the subpackages; importing it back would be a loop.
    offenders = [
        name for name, path in _modules().items() if name != ROOT and any(t == ROOT for t in _imports(path, name))
    ]
    assert not offenders


def test_no_file_of_the_package_is_over_400_lines():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_every_public_name_imports_from_the_top_level():
    import lightning_gsgd

    for name in lightning_gsgd.__all__:
        assert getattr(lightning_gsgd, name).__name__ == name


def test_every_pointer_to_the_math_page_names_one_of_its_headings():
    docs = PACKAGE.parent / "docs" / "math.md"
    headings = {line[3:].strip() for line in docs.read_text().splitlines() if line.startswith("## ")}
    cited, outside = set(), []
    for path in PACKAGE.rglob("*.py"):
        text = " ".join(path.read_text().split())  # pointers may wrap across lines
        outside += [path.name] * text.count("gsgd-math")  # the design notes are not in the repository
        for at in re.finditer(r"docs/math\.md,? ((?:\"[^\"]+\"(?:,? (?:and|to) )?)+)", text):
            cited |= set(re.findall(r"\"([^\"]+)\"", at.group(1)))
    assert not outside
    assert cited, "no pointer found: the pattern no longer matches how the code cites the page"
    assert cited <= headings, sorted(cited - headings)


# ``obj._name`` accesses the package allows across modules, each with its reason. torch's own private
# names are not the package's and are not listed (``torch._foreach_*`` is torch's multi-tensor API).
PRIVATE_ACCESS_ALLOWED = {
    # torch.optim.lr_scheduler marks an optimizer whose step it wrapped; the optimizer swap carries
    # the mark over to the new optimizer so that the scheduler's "step before optimizer.step" check holds.
    ("lightning_gsgd.lightning.optimizer_swap", "_opt_called"),
    ("lightning_gsgd.lightning.optimizer_swap", "_wrapped_by_lr_sched"),
    # torch's SequentialLR / ChainedScheduler keep their children only here; each child must be re-pointed.
    ("lightning_gsgd.lightning.optimizer_swap", "_schedulers"),
    # Lightning's DDPStrategy keeps the post-local-SGD hook state only here (refused: it averages weights).
    ("lightning_gsgd.lightning.checks", "_ddp_comm_state"),
    # nn.Module keeps its forward hooks only in these dicts (no public accessor); a hooked layer may
    # compute something else than the plain Linear/Conv, so detection must see them.
    ("lightning_gsgd.topology.rules", "_forward_hooks"),
    ("lightning_gsgd.topology.rules", "_forward_pre_hooks"),
    ("lightning_gsgd.topology.rules", "_global_forward_hooks"),
    ("lightning_gsgd.topology.rules", "_global_forward_pre_hooks"),
}


def _private_accesses(path: Path) -> set[str]:
    """Private names read off another object: ``obj._name``, ``getattr(obj, "_name")``, ``import _name``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if not (isinstance(root, ast.Name) and root.id in ("self", "cls", "torch")):
                found.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_"):
                if name.value.startswith("__"):
                    continue
                found.add(name.value)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(ROOT):
            found |= {a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")}
    return found


def test_the_private_access_walk_sees_each_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from lightning_gsgd.step.graph import _x\n"
        "def f(opt, self):\n    opt._a\n    getattr(opt, '_b')\n    self._ok\n    torch._foreach_mul_\n"
    )
    assert _private_accesses(src) == {"_x", "_a", "_b"}


def test_no_module_reads_another_objects_private_names():
    found = {
        (name, attr)
        for name, path in _modules().items()
        for attr in _private_accesses(path)
        if (name, attr) not in PRIVATE_ACCESS_ALLOWED
    }
    assert not found
