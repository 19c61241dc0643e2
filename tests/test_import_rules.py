"""The import rules of design.md §2, checked on the source with `ast`.

- `vlmcompress/modeling/` ships inside checkpoints: it imports only a few stdlib modules, torch, transformers,
  tokenizers and its siblings (one-dot relative imports), plus quantization backends lazily (inside functions);
- nothing but `vlmcompress/__main__.py` imports the CLI;
- `vlmcompress/integrations/` never imports `stages`;
- `stages/` never imports `recipe`, `orchestrator` or `cli`;
- `adapters/` never imports `stages`, `orchestrator`, `recipe` or `cli`.
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
    return sorted(PACKAGE.rglob("*.py")) + sorted(INTEGRATIONS.glob("*.py"))


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
    assert "vlmcompress.stages" in registry_targets  # the lazy `from . import stages`
    assert "vlmcompress.errors" in registry_targets
    prune = {t for i in imports_of(PACKAGE / "stages" / "structured_prune" / "stage.py") for t in i.targets}
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
