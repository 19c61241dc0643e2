"""Documentation that is generated must match the code, and the README's commands must name real files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_up_to_date():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import generate_reference
    finally:
        sys.path.pop(0)
    committed = (REPO / "docs" / "recipe-reference.md").read_text()
    assert committed == generate_reference.render(), "run: python docs/generate_reference.py"


def test_readme_commands_point_at_existing_files():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:2]
    assert len(commands) == 2
    assert "vlmcompress apply recipes/" in commands[0] and "pytest" in commands[1]
    for command in commands:
        assert "-c constraints-cpu.txt" in command
    recipe = re.search(r"apply (recipes/\S+\.yaml)", commands[0]).group(1)
    assert (REPO / recipe).is_file()
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -c constraints-cpu.txt -e '.[dev]'" in ci and "python -m pytest -q" in ci


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "vlmcompress", "list-methods"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "token_reduce" in proc.stdout


def test_docs_site_builds_without_warnings(tmp_path):
    """`mkdocs build --strict` (mkdocs.yml): every page in the nav exists, every link and anchor between pages
    resolves."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "methods" / "tome" / "index.html").is_file()
