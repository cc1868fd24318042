"""The package's shape, read from its source: imports go one way (no circle), the core never imports the shapes
plug-in, inference never imports training, and no module grows past its share."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ldm_pipeline"
TRAINING = {"training", "unet_stage", "vae_stage", "loop", "checkpoints", "latent_cache"}
INFERENCE = {"generation", "pipeline", "demo", "export", "evaluate"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imports(path: Path) -> set[str]:
    """The package modules `path` imports, at its top level or inside its functions."""
    package = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])  # where a relative import starts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [".".join(base + [alias.name]) for alias in node.names]
            found.update(name.strip(".") or "__init__" for name in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm_pipeline."):
            found.add(node.module.removeprefix("ldm_pipeline."))
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name if name in known else name.rsplit(".", 1)[0] for name in found} & known


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) - {module_name(path)} for path in PACKAGE.rglob("*.py")}


def test_imports_form_no_circle():
    edges, done, stack = graph(), set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(edges):
        visit(name)
    assert len(done) > 25


def test_the_core_never_imports_the_shapes_plugin():
    core = {name: targets for name, targets in graph().items() if not name.startswith("shapes")}
    offenders = {name: sorted(t for t in targets if t.startswith("shapes")) for name, targets in core.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_inference_never_imports_training():
    edges = graph()
    assert {name: sorted(edges[name] & TRAINING) for name in INFERENCE if edges[name] & TRAINING} == {}


def test_no_module_holds_more_than_its_share():
    sizes = {module_name(path): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 0.15 * sum(sizes.values()), sizes


def test_the_check_itself_sees_a_circle(tmp_path, monkeypatch):
    """The graph is read right: a planted circle and a planted plug-in import are found."""
    planted = {"__init__.py": "", "a.py": "from .b import x\n", "b.py": "from . import a\nfrom .shapes import y\n",
               "shapes/__init__.py": ""}
    for name, text in planted.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert graph()["a"] == {"b"} and graph()["b"] == {"a", "shapes"}
