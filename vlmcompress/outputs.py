"""Where `apply` writes, and what it will never touch: the output folder's checks, the run lock, atomic folder
writes and the clean-up of what a killed run left behind.

Rules (no user file is ever deleted or replaced that vlmcompress did not write):

- `--overwrite` replaces only a folder vlmcompress wrote (its `config.json` carries the vlmcompress format version,
  as every output since the first release does) or an empty folder; never a file, the source model's folder (or a
  folder holding it), the current directory or one of its parents, the home folder or the filesystem root.
- One run at a time per output: the run holds an exclusive `fcntl.flock` on `<output>.vlmcompress-work/lock`
  (which holds its pid) from the start to the end, so a second run on the same output fails at once.
- The output appears by one rename at the end; it replaces an existing folder only with `--overwrite`, checked
  again at that moment (another process may have written it meanwhile).
- Temporary folders of runs that were killed (`.<output>.tmp-PID`, `.<output>.old-PID`, and the `*.tmp` / `*.old`
  folders inside the work folder) are removed by the next run on that output, once it holds the lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import OutputError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def work_dir_for(output: Path) -> Path:
    return output.parent / f"{output.name}.vlmcompress-work"


def written_by_vlmcompress(folder: Path) -> bool:
    """Whether `folder` is a checkpoint vlmcompress wrote: its `config.json` has a `vlmcompress.format_version`."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    block = config.get("vlmcompress") if isinstance(config, dict) else None
    return isinstance(block, dict) and isinstance(block.get("format_version"), int)


def _protected_reason(resolved: Path, source: str | None) -> str | None:
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "is the current directory"
    if resolved in cwd.parents:
        return "is a parent of the current directory"
    if resolved == Path.home().resolve():
        return "is your home folder"
    if resolved == Path(resolved.anchor):
        return "is the filesystem root"
    if source and is_local_path(source):
        src = Path(source).expanduser().resolve()
        if src == resolved:
            return "is the source model's folder"
        if resolved in src.parents:
            return "holds the source model's folder"
    return None


def check_output(output: Path, overwrite: bool, source: str | None = None) -> None:
    """Refuse an output that vlmcompress may not write, before anything runs (one line, `OutputError`)."""
    if not str(output).strip():
        raise OutputError("output is empty; give the folder to write, e.g. output: out/compressed")
    try:
        output.exists()
    except OSError as e:
        raise OutputError(f"output '{str(output)[:60]}…' is not a usable folder name ({e.strerror}); choose a shorter "
                          "one") from None
    resolved = output.expanduser().resolve()
    reason = _protected_reason(resolved, source)
    if reason is not None:
        raise OutputError(f"output '{output}' {reason}; vlmcompress writes its result as a new folder and never "
                          "replaces that one; choose a new folder, e.g. output: out/compressed")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise OutputError(f"output '{output}' is a file, not a folder; vlmcompress will not replace it; choose "
                              "a folder name, e.g. output: out/compressed")
        if not overwrite:
            raise OutputError(f"output folder '{output}' already exists; pass --overwrite to replace it "
                              "or choose another --output")
        if any(output.iterdir()) and not written_by_vlmcompress(output):
            raise OutputError(f"output folder '{output}' holds files vlmcompress did not write (no config.json with "
                              "a vlmcompress format version); --overwrite replaces only folders vlmcompress wrote; "
                              "move them away or choose another --output")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".vlmcompress-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write into '{parent}' ({e.strerror}); choose a writable --output") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on one output for the whole run: `with RunLock(output): ...`. Entering removes what killed
    runs left behind (see the module docstring); a second run fails at once with the first one's pid."""

    def __init__(self, output: Path):
        self.output = output
        self.work = work_dir_for(output)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"another vlmcompress run (pid {holder}) is writing '{self.output}'; wait for it to "
                              "finish or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        clean_stale(self.output)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        # the run is over: the lock file goes (before the unlock, so no other run holds a lock on it), and the work
        # folder too when nothing else is in it (no stage checkpoints to resume from)
        (self.work / "lock").unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        try:
            self.work.rmdir()
        except OSError:  # not empty (stage checkpoints of a failed run), or already gone
            pass


_TMP = re.compile(r"\.(tmp|old)-(\d+)$")


def clean_stale(output: Path) -> list[Path]:
    """Remove the temporary folders of killed runs on `output` (caller holds its lock); returns what it removed."""
    removed = []
    prefix = f".{output.name}."
    for entry in output.parent.glob(f"{glob_escape(prefix)}*"):
        match = _TMP.search(entry.name)
        if match and entry.name[: match.start()] == f".{output.name}" and not _pid_alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    work = work_dir_for(output)
    if work.is_dir():
        for entry in list(work.glob(".*.tmp-*")) + list(work.glob("*.tmp")) + list(work.glob("*.old")):
            match = _TMP.search(entry.name)
            if match is None or not _pid_alive(int(match.group(2))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def reset_work_dir(output: Path) -> None:
    """Empty the work folder for a fresh run, keeping the lock file the run holds."""
    work = work_dir_for(output)
    if not work.is_dir():
        return
    for entry in work.iterdir():
        if entry.name == "lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def atomic_write_dir(target: Path, write, replace: bool = True) -> None:
    """Write a folder with `write(tmp)` and rename it into place; an existing `target` is replaced only when
    `replace` (else `OutputError`: it appeared while the run was going)."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        if not replace or not target.is_dir() or (any(target.iterdir()) and not written_by_vlmcompress(target)):
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"output '{target}' appeared while this run was going (another process wrote it); "
                              "nothing was replaced; pass --overwrite to replace it, or choose another --output")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def is_local_path(name: str) -> bool:
    """Whether a recipe's `model:` / `path:` names a local file or folder (else a Hub id or a built-in name)."""
    try:
        return bool(name) and Path(name).expanduser().exists()
    except OSError:  # not a usable path (too long, ...): not a local one
        return False


def public_name(name: str) -> str:
    """What an output records of a source: a Hub id or a built-in name as it is, a local path as its last part only
    (absolute paths of the user's machine do not belong in a checkpoint that may be published)."""
    if not is_local_path(name):
        return name
    return Path(name).expanduser().resolve().name


def public_recipe(recipe):
    """The recipe as an output records it (`recipe.yaml`, the model card, `report.json`): local paths of the model,
    the output and the data reduced to their last part."""
    data = recipe.data
    if data is not None:
        sources = {}
        for split in ("train", "eval"):
            source = getattr(data, split)
            if source is not None and source.path:
                source = source.model_copy(update={"path": public_name(source.path)})
            sources[split] = source
        data = data.model_copy(update=sources)
    return recipe.model_copy(update={"model": public_name(recipe.model), "data": data,
                                     "output": Path(recipe.output).name or recipe.output})


def apply_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the permissions the user's umask gives new files (some writers
    create 0600 files through temporary files)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
