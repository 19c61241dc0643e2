"""The CLI commands that show and share an output: `vlmcompress report` (plots and an HTML page) and
`vlmcompress push` (publish to the Hugging Face Hub). Registered on the app by `cli.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_output import console


def push(
    folder: Path = typer.Argument(..., help="a folder written by `vlmcompress apply`"),
    repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME (or NAME in your own namespace)"),
    private: bool = typer.Option(False, help="create the repository private"),
    revision: Optional[str] = typer.Option(None, help="branch to commit to (created when missing)"),
    create_pr: bool = typer.Option(False, "--create-pr", help="open a pull request instead of committing"),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="commit message"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id of the source model, for an output "
                                                                        "compressed from a local copy of it (the "
                                                                        "uploaded card names it)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list every file, its size and the commit message; "
                                                          "send nothing"),
):
    """Publish an output folder to the Hugging Face Hub in one commit (token: HF_TOKEN or `hf auth login`)."""
    from .publish import format_result
    from .publish import push as run_push

    result = run_push(folder, repo_id, private=private, revision=revision, create_pr=create_pr, dry_run=dry_run,
                      commit_message=message, base_model=base_model)
    for line in format_result(result):
        console.print(line, highlight=False, markup=False)


def report(
    folders: list[Path] = typer.Argument(..., help="output folders of `vlmcompress apply`"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="folder for the pictures and index.html"),
    base: Optional[str] = typer.Option(None, "--base", help="the uncompressed model (a built-in name or folder), "
                                                           "drawn as its own point"),
    measure: bool = typer.Option(False, "--measure", help="measure throughput in this run (interleaved) instead of "
                                                          "reading report.json"),
    images: int = typer.Option(4, "--images", help="eval images for the token-reduction pictures"),
):
    """Pareto plots, per-layer charts, token-reduction pictures and one self-contained index.html."""
    from .report import build_report

    result = build_report([str(f) for f in folders], out, base=base, eval_images=images, measure=measure)
    console.print(f"[green]wrote[/green] {out / 'index.html'} ({len(result['files'])} files, "
                  f"{len(result['points'])} points)", highlight=False)
