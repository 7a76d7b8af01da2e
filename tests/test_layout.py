"""The package's layout as a specification: imports point down the layers, the library never imports the Shapes
recipe, importing changes nothing in diffusers, installed code never walks up to a source checkout.

The static checks read the source with `ast` (nothing is imported); every `import` and `from ... import`
counts, at module level, inside functions and under `if TYPE_CHECKING:`, and so does
`importlib.import_module("mmdit_diffusers....")` with a literal name. A name imported from the lazy package root
(`from mmdit_diffusers import MMDiTPipeline`) counts as an import of the module that defines it (`_EXPORTS` in
`mmdit_diffusers/__init__.py`). The runtime checks run in fresh interpreters.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


PACKAGE = "mmdit_diffusers"

# The layer order, bottom first: a unit (a subpackage, or a module at the package root) imports only units of
# lower layers. Units of the same layer do not import each other, except as SAME_LAYER_ALLOWED says.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "files", "lazy", "arguments"),  # root leaves: import nothing of the package
    ("models", "conversion"),  # models imports conversion; conversion imports no other subpackage
    ("pipelines", "cpu_bf16"),  # cpu_bf16: an opt-in applied to a model from outside models/
    ("training",),
    ("hub",),
    ("cli", "train"),  # the dispatcher; `python -m mmdit_diffusers.train` is an alias of `mmdit-diffusers train`
)
SAME_LAYER_ALLOWED = {("models", "conversion"), ("train", "cli")}  # the alias runs the dispatcher
# The Shapes recipe sits beside the layers: it uses the library's public API and never imports the command line;
# nothing in the library imports it. The command line may dispatch to it.
RECIPE = "shapes"
LIBRARY = ("models", "conversion", "pipelines", "training", "hub")
TOP = LAYERS[-1]

LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}
UNITS = set(LAYER_OF) | {RECIPE}


def package_dir() -> Path:
    """The package under test (the one `import mmdit_diffusers` would load), found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.origin, f"{PACKAGE} is not importable"
    return Path(spec.origin).parent


ROOT = package_dir()


@dataclass(frozen=True)
class Edge:
    source: str  # unit that imports
    target: str  # unit imported ("<root>" for the package root itself)
    where: str  # path:line of the statement
    statement: str  # the import as written

    def __str__(self) -> str:
        return f"{self.where}: {self.source} -> {self.target} ({self.statement})"


def unit_of_file(path: Path) -> str:
    """A file's unit: its top folder under the package, or its own name for a module at the package root."""
    return path.relative_to(ROOT).with_suffix("").parts[0]


def module_name(path: Path) -> list[str]:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def root_exports() -> dict[str, str]:
    """`_EXPORTS` of the package root: public name -> module that defines it (read, not imported)."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
                exports = ast.literal_eval(node.value)  # ".models" is relative to the package
                return {name: PACKAGE + module if module.startswith(".") else module for name, module in exports.items()}
    return {}


EXPORTS = root_exports()


def unit_of_module(dotted: str, imported_name: str | None = None) -> str | None:
    """The unit a dotted module (and, for `from X import name`, the name) belongs to; None outside the package."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) > 1:
        return parts[1]
    if imported_name is None:
        return "<root>"
    if (ROOT / imported_name).is_dir() or (ROOT / f"{imported_name}.py").exists():
        return imported_name
    if imported_name in EXPORTS:
        return unit_of_module(EXPORTS[imported_name])
    return "<root>"


def import_targets(node: ast.AST, path: Path) -> list[tuple[str, str | None]]:
    """(dotted module, imported name or None) for one import-like node."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module_name(path) if path.name == "__init__.py" else module_name(path)[:-1]
            base = base[: len(base) - (node.level - 1)]
            dotted = ".".join(base + ([node.module] if node.module else []))
        else:
            dotted = node.module or ""
        return [(dotted, alias.name) for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [(node.args[0].value, None)]
    return []


def collect_edges() -> list[Edge]:
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "__init__.py":
            continue  # the lazy facade: its exports are resolved above, it runs none of them
        source = unit_of_file(path)
        text = path.read_text()
        for node in ast.walk(ast.parse(text, str(path))):
            for dotted, name in import_targets(node, path):
                target = unit_of_module(dotted, name)
                if target is None or target == source:
                    continue
                statement = ast.get_source_segment(text, node) or ast.dump(node)
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                edges.append(Edge(source, target, where, " ".join(statement.split())))
    return edges


EDGES = collect_edges()


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


def test_every_module_of_the_package_belongs_to_a_layer_or_the_recipe():
    units = {unit_of_file(p) for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py"}
    unknown = sorted(f"{u} ({'folder' if (ROOT / u).is_dir() else 'root module'})" for u in units - UNITS)
    assert not unknown, report(unknown, "units in no layer (put them in a layer of LAYERS, or under shapes/)")


def test_imports_point_down_the_layers():
    problems = []
    for edge in EDGES:
        if edge.source not in LAYER_OF or edge.target not in LAYER_OF:
            continue  # the recipe's rules are their own tests below
        up = LAYER_OF[edge.target] > LAYER_OF[edge.source]
        sideways = LAYER_OF[edge.target] == LAYER_OF[edge.source] and (edge.source, edge.target) not in SAME_LAYER_ALLOWED
        if up or sideways:
            problems.append(f"{edge}  [{'upward' if up else 'same layer'}]")
    assert not problems, report(problems, "imports that do not point down the layers " + " < ".join(
        "{" + ", ".join(layer) + "}" for layer in LAYERS))


def test_root_leaves_import_nothing_of_the_package():
    problems = [str(e) for e in EDGES if e.source in LAYERS[0]]
    assert not problems, report(problems, f"imports of the package from the root leaves {LAYERS[0]}")


def test_models_import_only_conversion_among_the_subpackages():
    problems = [str(e) for e in EDGES if e.source == "models" and e.target not in ("conversion", *LAYERS[0])]
    assert not problems, report(problems, "imports from models/ of subpackages other than conversion/")


def test_conversion_imports_no_other_subpackage():
    problems = [str(e) for e in EDGES if e.source == "conversion" and e.target not in LAYERS[0]]
    assert not problems, report(problems, "imports from conversion/ of other subpackages")


def test_the_library_never_imports_the_shapes_recipe():
    problems = [str(e) for e in EDGES if e.target == RECIPE and e.source != RECIPE and e.source not in TOP]
    assert not problems, report(problems, "imports of the Shapes recipe from the library")


def test_the_shapes_recipe_never_imports_the_command_line():
    problems = [str(e) for e in EDGES if e.source == RECIPE and e.target in TOP]
    assert not problems, report(problems, "imports of the command line from the Shapes recipe")


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    example: dict[tuple[str, str], Edge] = {}
    for edge in EDGES:
        if edge.target != "<root>":
            graph.setdefault(edge.source, set()).add(edge.target)
            example.setdefault((edge.source, edge.target), edge)

    def path_between(start: str, goal: str) -> list[str] | None:
        stack, seen = [[start]], {start}
        while stack:
            trail = stack.pop()
            for nxt in sorted(graph.get(trail[-1], ())):
                if nxt == goal:
                    return trail + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(trail + [nxt])
        return None

    problems, cycles = [], set()
    for a, b in sorted(example):
        back = path_between(b, a)
        if back and frozenset(back) not in cycles:  # each cycle once, whichever unit it is read from
            cycles.add(frozenset(back))
            links = [example[(x, y)] for x, y in zip([a, *back], back)]
            problems.append(" -> ".join([a, *back]) + ":\n      " + "\n      ".join(str(e) for e in links))
    assert not problems, report(problems, "import cycles between subpackages")


def test_no_installed_code_walks_up_to_a_source_checkout():
    walk = re.compile(r"parents\s*\[")
    problems = [
        f"{path.relative_to(ROOT.parent)}:{number}: {line.strip()}"
        for path in sorted(ROOT.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if walk.search(line)
    ]
    assert not problems, report(problems, "path walks (`parents[...]`) in the package")


def run_fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter that imports the package under test; it prints one JSON object."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"the fresh interpreter failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


DIFFUSERS_STATE = """
import copy, json, sys
from diffusers.hooks._helpers import AttentionProcessorRegistry, TransformerBlockRegistry
from diffusers.pipelines import pipeline_loading_utils as loading_utils
def diffusers_state():
    # the hook registries are keyed by classes: their names stand for them
    hooks = {f"{table.__name__}._registry": {f"{k.__module__}.{k.__qualname__}": repr(v)
                                             for k, v in table._registry.items()}
             for table in (TransformerBlockRegistry, AttentionProcessorRegistry)}
    return {**copy.deepcopy({"LOADABLE_CLASSES": loading_utils.LOADABLE_CLASSES,
                             "ALL_IMPORTABLE_CLASSES": loading_utils.ALL_IMPORTABLE_CLASSES}), **hooks}
def changes(before, after):
    out = []
    for table in before:
        for key in sorted(set(before[table]) | set(after[table])):
            if before[table].get(key) != after[table].get(key):
                out.append(f"{table}[{key!r}]: {before[table].get(key)!r} -> {after[table].get(key)!r}")
    return out
def ours():
    return sorted(m for m in sys.modules if m == "mmdit_diffusers" or m.startswith("mmdit_diffusers."))
before = diffusers_state()
"""


def test_importing_the_package_does_not_import_torch():
    result = run_fresh(
        "import json, sys\nimport mmdit_diffusers\n"
        "print(json.dumps({'heavy': sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules),"
        " 'file': mmdit_diffusers.__file__}))"
    )
    assert Path(result["file"]).parent == ROOT, f"the fresh interpreter imported {result['file']}, not {ROOT}"
    assert result["heavy"] == [], f"`import mmdit_diffusers` imported {result['heavy']}"


@functools.cache
def import_models_fresh() -> dict:
    """`import mmdit_diffusers.models` in a fresh interpreter: our modules it loaded, what it changed in diffusers."""
    return run_fresh(
        DIFFUSERS_STATE
        + "import mmdit_diffusers.models\n"
        + "print(json.dumps({'changes': changes(before, diffusers_state()), 'modules': ours()}))"
    )


def test_importing_models_imports_no_upper_layer_nor_the_recipe():
    forbidden = ("hub", "shapes", "cli", "training", "pipelines")
    upper = [m for m in import_models_fresh()["modules"] if m.split(".")[1:2] and m.split(".")[1] in forbidden]
    assert not upper, report(upper, "modules of the upper layers or the recipe imported by `import mmdit_diffusers.models`")


def test_importing_models_changes_nothing_in_diffusers():
    changes = import_models_fresh()["changes"]
    assert not changes, report(changes, "changes to diffusers' tables by `import mmdit_diffusers.models`")


def test_importing_every_module_changes_nothing_in_diffusers():
    result = run_fresh(
        DIFFUSERS_STATE
        + """
import importlib, pkgutil
import mmdit_diffusers
changed, failed, seen = {}, {}, []
for info in pkgutil.walk_packages(mmdit_diffusers.__path__, "mmdit_diffusers.", onerror=lambda name: None):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue  # runs the command line
    loaded = set(ours())
    try:
        importlib.import_module(info.name)
    except Exception as e:
        failed[info.name] = f"{type(e).__name__}: {e}"
        continue
    seen.append(info.name)
    found = changes(before, diffusers_state())
    if found and not changed:  # the first module whose import changed diffusers, and what it loaded with it
        changed[info.name] = found + ["modules this import loaded: " + ", ".join(sorted(set(ours()) - loaded))]
print(json.dumps({"changed": changed, "failed": failed, "seen": seen}))
"""
    )
    assert not result["failed"], report([f"{m}: {e}" for m, e in result["failed"].items()], "modules that fail to import")
    expected = {".".join(module_name(p)) for p in ROOT.rglob("*.py") if p.stem != "__main__"} - {PACKAGE}
    missed = sorted(expected - set(result["seen"]) - set(result["failed"]))
    assert not missed, report(missed, "modules the walk did not import")
    assert not result["changed"], "\n".join(
        f"importing {module} changed diffusers:\n  " + "\n  ".join(found) for module, found in result["changed"].items()
    )
