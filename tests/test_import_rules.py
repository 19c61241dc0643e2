"""The import rules of design.md §2, checked on the source with `ast`.

- `vlmcompress/modeling/` ships inside checkpoints: it imports only a few stdlib modules, torch, transformers,
  tokenizers and its siblings (one-dot relative imports), plus quantization backends lazily (inside functions);
- nothing but `vlmcompress/__main__.py` imports the CLI;
- `vlmcompress/integrations/` never imports `stages`;
- `stages/` never imports `recipe`, `orchestrator` or `cli`;
- `adapters/` never imports `stages`, `orchestrator`, `recipe` or `cli`;
- no import circle anywhere in the package (imports inside functions included), and the core layers (`LAYERS`)
  only import downwards;
- `import vlmcompress`, `vlmcompress --help`, `list-methods` and `validate --help` import neither torch nor
  transformers.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ast  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmcompress"
INTEGRATIONS = PACKAGE / "integrations"

MODELING_STDLIB = {"math", "typing", "dataclasses", "__future__", "collections", "json", "os", "re", "functools",
                   "warnings"}
MODELING_THIRD_PARTY = {"torch", "transformers", "tokenizers"}
# design.md §2: the modeling code imports a quantization backend only lazily, when the checkpoint asks for it
MODELING_LAZY_BACKENDS = {"torchao", "optimum", "neural_compressor", "onnxruntime"}


@dataclass
class Import:
    file: Path
    line: int
    level: int  # 0 for absolute imports
    targets: tuple[str, ...]  # fully resolved module names this statement may import
    top_level: bool  # at module level (not inside a function)

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def resolve(path: Path, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `path`."""
    if level == 0:
        return module or ""
    parts = package_of(path).split(".")
    if level - 1 >= len(parts):
        raise AssertionError(f"{path}: relative import beyond the top-level package")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    function_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            function_nodes.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        top = id(node) not in function_nodes
        if isinstance(node, ast.Import):
            found.append(Import(path, node.lineno, 0, tuple(a.name for a in node.names), top))
        elif isinstance(node, ast.ImportFrom):
            base = resolve(path, node.level, node.module)
            # `from pkg import name` may import the submodule pkg.name
            targets = (base, *(f"{base}.{a.name}" for a in node.names if a.name != "*"))
            found.append(Import(path, node.lineno, node.level, targets, top))
    return found


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(files, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files:
        for imp in imports_of(path):
            hits = sorted({t for t in imp.targets for f in forbidden if within(t, f)})
            if hits:
                bad.append(f"{imp.where()}: imports {', '.join(hits)}")
    return bad


# ----------------------------------------------------------------------------------------------------------------
# the resolver itself


def test_resolver_handles_relative_imports():
    stage = PACKAGE / "stages" / "structured_prune" / "stage.py"
    assert module_name(stage) == "vlmcompress.stages.structured_prune.stage"
    assert resolve(stage, 3, "adapters") == "vlmcompress.adapters"
    assert resolve(stage, 2, "base") == "vlmcompress.stages.base"
    assert resolve(stage, 1, "magnitude") == "vlmcompress.stages.structured_prune.magnitude"
    assert resolve(PACKAGE / "stages" / "__init__.py", 1, None) == "vlmcompress.stages"
    tp = INTEGRATIONS / "torch_pruning.py"
    assert module_name(tp) == "vlmcompress.integrations.torch_pruning"
    assert resolve(tp, 2, "errors") == "vlmcompress.errors"
    assert module_name(INTEGRATIONS / "__init__.py") == "vlmcompress.integrations"
    assert resolve(PACKAGE / "registry.py", 1, None) == "vlmcompress"


def test_scanner_sees_known_imports():
    # guards against a scanner that silently finds nothing
    files = source_files()
    assert PACKAGE / "modeling" / "modeling_vlmcompress.py" in files and INTEGRATIONS / "torch_pruning.py" in files
    registry_targets = {t for i in imports_of(PACKAGE / "registry.py") for t in i.targets}
    assert "vlmcompress.errors" in registry_targets
    recipe = {t for i in imports_of(PACKAGE / "recipe.py") for t in i.targets}
    assert "vlmcompress.stages" in recipe  # `from . import stages as _builtin_methods`
    prune = {t for i in imports_of(PACKAGE / "stages" / "structured_prune" / "pruning.py") for t in i.targets}
    assert {"vlmcompress.integrations", "vlmcompress.integrations.torch_pruning", "torch"} <= prune
    assert violations([PACKAGE / "stages" / "structured_prune" / "stage.py"], ("vlmcompress.adapters",))


# ----------------------------------------------------------------------------------------------------------------
# the rules


MODELING_FILES = sorted((PACKAGE / "modeling").glob("*.py"))


def modeling_violations(path: Path) -> list[str]:
    bad = []
    for imp in imports_of(path):
        if imp.level > 1:
            bad.append(f"{imp.where()}: relative import with {imp.level} dots (only `from .sibling` is allowed)")
        elif imp.level == 1:
            sibling = imp.targets[0]
            if sibling != "vlmcompress.modeling" and not (
                    PACKAGE / "modeling" / f"{sibling.rpartition('.')[2]}.py").is_file():
                bad.append(f"{imp.where()}: imports {sibling}, which is not a sibling file")
        else:
            # `from x import y` lists x and x.y; the top-level package is what matters
            for root in sorted({t.split(".")[0] for t in imp.targets}):
                if root in MODELING_STDLIB or root in MODELING_THIRD_PARTY:
                    continue
                if root in MODELING_LAZY_BACKENDS and not imp.top_level:
                    continue
                bad.append(f"{imp.where()}: imports {root}")
    return bad


def test_modeling_rule_detects_violations():
    assert any("2 dots" in v for v in modeling_violations(PACKAGE / "stages" / "structured_prune" / "stage.py"))
    recipe = modeling_violations(PACKAGE / "recipe.py")
    assert any(v.endswith("imports yaml") for v in recipe) and any(v.endswith("imports pydantic") for v in recipe)


@pytest.mark.parametrize("path", MODELING_FILES, ids=[p.name for p in MODELING_FILES])
def test_modeling_imports_only_torch_transformers_and_siblings(path):
    bad = modeling_violations(path)
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli():
    allowed = {PACKAGE / "__main__.py", PACKAGE / "cli.py"}
    files = [p for p in source_files() if p not in allowed and not p.is_relative_to(PACKAGE / "cli")]
    bad = violations(files, ("vlmcompress.cli",))
    assert not bad, "\n".join(bad)


def test_integrations_never_import_stages():
    bad = violations(sorted(INTEGRATIONS.glob("*.py")), ("vlmcompress.stages",))
    assert not bad, "\n".join(bad)


def test_stages_never_import_recipe_orchestrator_cli():
    files = sorted((PACKAGE / "stages").rglob("*.py"))
    assert files
    bad = violations(files, ("vlmcompress.recipe", "vlmcompress.orchestrator", "vlmcompress.cli"))
    assert not bad, "\n".join(bad)


def test_adapters_never_import_stages_orchestrator_recipe_cli():
    files = sorted((PACKAGE / "adapters").rglob("*.py"))
    assert files
    bad = violations(files, ("vlmcompress.stages", "vlmcompress.orchestrator", "vlmcompress.recipe",
                             "vlmcompress.cli"))
    assert not bad, "\n".join(bad)


def test_modeling_files_import_standalone(tmp_path):
    """Copied flat into a folder (as in a checkpoint), the modeling code imports without vlmcompress."""
    flat = tmp_path / "flatpkg"
    flat.mkdir()
    (flat / "__init__.py").write_text("")
    copied = []
    for path in MODELING_FILES:
        if path.name != "__init__.py":
            shutil.copy(path, flat / path.name)
            copied.append(path.stem)
    assert "modeling_vlmcompress" in copied and "configuration_vlmcompress" in copied
    script = (
        "import sys\n"
        "sys.modules['vlmcompress'] = None\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import importlib\n"
        f"for name in {copied!r}:\n"
        "    importlib.import_module('flatpkg.' + name)\n"
        "import flatpkg.modeling_vlmcompress as m\n"
        "assert m.__file__.startswith(" + repr(str(flat)) + ")\n"
        "assert not any(k == 'vlmcompress' or k.startswith('vlmcompress.') for k in sys.modules if sys.modules[k])\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------------------------
# layers: no circle, a light package face


def import_graph() -> dict[str, set[str]]:
    """`{module: modules it imports}` inside vlmcompress, counting imports inside functions too (a lazy import
    hides a circle from Python, not from a reader). `from pkg import name` points at `pkg.name` when that is a
    module, else at `pkg`; importing a submodule is not counted as importing its parent packages."""
    modules = {module_name(p): p for p in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imp in imports_of(path):
            internal = [t for t in imp.targets if within(t, "vlmcompress")]
            if not internal:
                continue
            named = [t for t in internal[1:] if t in modules] if len(internal) > 1 else []
            for target in named or [internal[0]]:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "vlmcompress.data.schema" in graph["vlmcompress.recipe"]  # the scanner sees the edges it must
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


# from the bottom up: a module may import only from its own layer or below (no arrow running back up)
LAYERS = [
    ("vlmcompress.errors", "vlmcompress.cpu", "vlmcompress.schema", "vlmcompress.selectors", "vlmcompress.versions",
     "vlmcompress.progress"),
    ("vlmcompress.modeling",),
    ("vlmcompress.adapters", "vlmcompress.data"),
    ("vlmcompress.registry",),
    ("vlmcompress.measure", "vlmcompress.integrations", "vlmcompress.train", "vlmcompress.evaluate",
     "vlmcompress.accuracy"),
    ("vlmcompress.stages",),
    ("vlmcompress.recipe",),
]


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(within(module, p) for p in prefixes):
            return i
    return None


def test_no_import_runs_back_up_the_layers():
    bad = []
    for module, targets in import_graph().items():
        here = layer_of(module)
        if here is None:
            continue  # above the layered core: orchestrator, cli, bench, ...
        for target in targets:
            there = layer_of(target)
            if there is None or there > here:
                bad.append(f"{module} (layer {here}) imports {target} (layer {there})")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("argv", [None, ["--help"], ["list-methods"], ["validate", "--help"]],
                         ids=["import", "--help", "list-methods", "validate --help"])
def test_the_package_face_imports_no_torch(argv):
    """`import vlmcompress` and the CLI's cheap commands import neither torch nor transformers (lazy attributes)."""
    run = ("import vlmcompress" if argv is None else
           f"import sys; sys.argv = ['vlmcompress', *{argv!r}]\n"
           "from vlmcompress.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code")
    code = f"{run}\nimport sys\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_backends_import_their_libraries_through_one_helper():
    """Every integration reaches its optional library through `integrations.optional_import` (one install hint),
    none catches ImportError itself; the shipped modeling code, which cannot import vlmcompress, has its own."""
    bad = []
    for path in sorted(INTEGRATIONS.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and "ImportError" in ast.unparse(node.type or ast.Name("")):
                bad.append(f"{path.name}:{node.lineno} catches ImportError")
    assert not bad, "\n".join(bad)
    users = [p.name for p in INTEGRATIONS.glob("*.py") if "optional_import(" in p.read_text()]
    assert {"torchao.py", "quanto.py", "neural_compressor.py", "torch_pruning.py", "onnx_runtime.py"} <= set(users)
