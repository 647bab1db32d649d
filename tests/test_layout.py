"""The package's layout is its data flow: each stage imports only from itself and the stages before it."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

# images -> views -> store -> backbones -> extraction | heads -> finetuning -> auditing -> predict | cache -> cli
LAYERS = {"images": 0, "views": 1, "store": 2, "backbones": 3, "extraction": 4, "heads": 4, "finetuning": 5,
          "auditing": 6, "predict": 7, "cache": 7, "cli": 8}
PACKAGE = REPO / "featurekit"


def imports(path):
    """(line, imported featurekit module) of every import in ``path``, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        yield from imports_of(path, node)


def imports_of(path, node):
    """(line, module) of the import ``node`` of ``path``: for `from X import a`, X, then X.a."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        yield node.lineno, base
        for alias in node.names:  # `from .. import heads` imports a subpackage
            yield node.lineno, f"{base}.{alias.name}"
    elif isinstance(node, ast.Import):
        yield from ((node.lineno, alias.name) for alias in node.names)


def stage(module):
    """The subpackage of a featurekit module, or None for the modules at the root (errors, files, ...)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "featurekit" and len(parts) > 1 and parts[1] in LAYERS else None


def test_no_module_imports_a_later_stage_or_a_sibling_stage():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = stage(".".join(path.relative_to(REPO).with_suffix("").parts))
        for line, imported in imports(path):
            theirs = stage(imported)
            if not imported.startswith("featurekit") or theirs is None or theirs == mine:
                continue
            if mine is None and path.name not in ("__init__.py", "__main__.py"):
                wrong.append(f"{path.relative_to(REPO)}:{line}: a root module imports {imported}")
            elif mine is not None and LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {mine} imports {imported}")
    assert wrong == []


def test_the_rule_catches_an_upward_import(tmp_path):
    upward = PACKAGE / "store" / "_upward_probe.py"
    upward.write_text("from ..heads import registry\n")
    try:
        with pytest.raises(AssertionError, match="store imports featurekit.heads"):
            test_no_module_imports_a_later_stage_or_a_sibling_stage()
    finally:
        upward.unlink()


@pytest.mark.parametrize("argv", [["--help"], ["list-backbones"], ["info", "missing.h5"]])
def test_the_command_line_imports_no_torch_for_help_listing_and_info(argv):
    code = ("import sys\nfrom featurekit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


def test_every_module_is_at_most_450_lines_and_the_command_line_450_in_all():
    lengths = {path.relative_to(REPO): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > 450} == {}
    assert sum(n for path, n in lengths.items() if path.parts[1] == "cli") < 450


def test_the_library_does_not_print():
    printing = [f"{path.relative_to(REPO)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
                if "cli" not in path.parts and path.name != "demo.py"
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert printing == []


def test_no_subpackage_shadows_a_public_name_of_the_root():
    # `import featurekit.audit` would replace the function featurekit.audit by the module: stages are nouns
    public = {alias.asname or alias.name for node in ast.walk(ast.parse((PACKAGE / "__init__.pyi").read_text()))
              if isinstance(node, ast.ImportFrom) for alias in node.names}
    folders = {path.parent.name for path in PACKAGE.glob("*/__init__.py")} | {p.stem for p in PACKAGE.glob("*.py")}
    assert len(public) > 20 and not public & folders


def test_what_a_module_takes_from_another_is_in_its_all():
    # each module that others import says what it offers (__all__), and nobody takes its private names
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    offered = {}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                offered[name] = set(ast.literal_eval(node.value))
    taken = []
    for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyi")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = next(module for _, module in imports_of(path, node))
            taken += [(path.relative_to(REPO), base, alias.name) for alias in node.names
                      if base in modules and f"{base}.{alias.name}" not in modules
                      and modules[base].name != "__init__.py"]
    assert len(taken) > 200
    assert [t for t in taken if t[1] not in offered] == []
    assert [t for t in taken if t[2] not in offered[t[1]]] == []
