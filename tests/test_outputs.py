"""Never lose a user's files (issue 18, points 1-2): what `--overwrite` may replace, one run per output, the
re-check at the final rename, and the clean-up of what killed runs left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vlmcompress
from vlmcompress.errors import OutputError
from vlmcompress.outputs import RunLock, work_dir_for

STAGES = [{"method": "token_reduce", "r": 4}]


def run(output, overwrite=False, model="tiny-clip", **kwargs):
    return vlmcompress.apply({"model": model, "output": str(output), "stages": STAGES}, overwrite=overwrite,
                             progress=False, **kwargs)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_a_vlmcompress_output_and_an_empty_folder(tmp_path):
    out = tmp_path / "out"
    run(out)
    first = (out / "model.safetensors").stat().st_mtime_ns
    run(out, overwrite=True)
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    empty = tmp_path / "empty"
    empty.mkdir()
    run(empty, overwrite=True)
    assert (empty / "config.json").is_file()
    assert not work_dir_for(out).exists() and not work_dir_for(empty).exists()


def test_overwrite_never_replaces_a_folder_of_user_files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "config.json").write_text('{"mine": true}')  # a config.json that vlmcompress did not write
    before = files(folder)
    with pytest.raises(OutputError, match="holds files vlmcompress did not write"):
        run(folder, overwrite=True)
    assert files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_overwrite_never_replaces_the_source_model_or_a_folder_holding_it(tmp_path):
    from vlmcompress.adapters import BUILTIN_TINY

    source = tmp_path / "models" / "clip"
    BUILTIN_TINY["tiny-clip"].tiny_model(0).save_pretrained(source)
    before = files(source)
    for output in (source, source.parent):
        with pytest.raises(OutputError, match="source model's folder"):
            run(output, overwrite=True, model=str(source))
    assert files(source) == before


@pytest.mark.parametrize("where", [".", "..", "~", ""])
def test_overwrite_never_targets_the_current_directory_its_parents_or_home(tmp_path, monkeypatch, where):
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        run(Path(where).expanduser() if where else "", overwrite=True)
    assert "\n" not in str(e.value) and "--overwrite" not in str(e.value).replace("pass --overwrite", "")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]  # no .tmp-PID, no work folder


def test_a_file_is_never_replaced(tmp_path):
    target = tmp_path / "result"
    target.write_text("a file the user wrote")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        run(target, overwrite=True)
    assert target.read_text() == "a file the user wrote"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_a_second_run_on_a_locked_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        with pytest.raises(OutputError, match=rf"another vlmcompress run \(pid {os.getpid()}\) is writing"):
            run(out)
    run(out)  # the lock is released
    assert (out / "config.json").is_file()


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path, monkeypatch):
    from vlmcompress import orchestrator

    out = tmp_path / "out"
    real = orchestrator.save_checkpoint

    def someone_else_writes_first(model, folder, **kwargs):
        if kwargs.get("report") is not None and not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("written by another process")
        return real(model, folder, **kwargs)

    monkeypatch.setattr(orchestrator, "save_checkpoint", someone_else_writes_first)
    with pytest.raises(OutputError, match="appeared while this run was going"):
        run(out)
    assert files(out) == {"theirs.txt": b"written by another process"}
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / f".out.tmp-{dead}", tmp_path / f".out.old-{dead}", work_dir_for(out) / "stage-01.tmp",
             work_dir_for(out) / "stage-01-training.tmp"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"0" * 1024)
    other = tmp_path / f".other.tmp-{dead}"  # another output's: not ours to remove
    other.mkdir()
    run(out, resume=True)
    assert not any(folder.exists() for folder in stale)
    assert other.exists() and not work_dir_for(out).exists()


CONCURRENT = textwrap.dedent("""
    import sys, vlmcompress
    from vlmcompress.errors import VlmCompressError
    try:
        vlmcompress.apply({"model": "tiny-clip", "output": sys.argv[1],
                           "stages": [{"method": "token_reduce", "r": 4}]}, progress=False)
    except VlmCompressError as e:
        print(e)
        sys.exit(1)
""")


def test_two_processes_on_one_output_one_wins_and_nothing_is_lost(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(text for code, text in results if code == 1)
    assert "another vlmcompress run" in loser or "already exists" in loser, loser
    assert vlmcompress.load(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_records_local_paths_by_their_name_and_files_follow_the_umask(tmp_path):
    from vlmcompress.adapters import BUILTIN_TINY

    source = tmp_path / "private" / "my-clip"
    BUILTIN_TINY["tiny-clip"].tiny_model(0).save_pretrained(source)
    out = tmp_path / "outputs" / "small-clip"
    old = os.umask(0o022)
    try:
        run(out, model=str(source))
    finally:
        os.umask(old)
    for name in ("config.json", "report.json", "recipe.yaml", "README.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text, name
        assert "my-clip" in text, name
    assert "a local folder, recorded by its name only" in (out / "README.md").read_text()
    assert "base_model:" not in (out / "README.md").read_text().split("---")[1]  # not a Hub id
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    builtin = tmp_path / "builtin"
    vlmcompress.apply({"model": "tiny-clip", "output": str(builtin), "stages": STAGES}, progress=False)
    card = (builtin / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "# tiny-clip" in card  # not a Hub id: named in the body
