"""`kill -9` at points a real crash hits (issue 18): while holding the lock, after the first stage's checkpoint,
during the final save (the full-size `.out.tmp-PID/` written, not yet renamed), then `--resume`: the weights are
bit-identical to an uninterrupted run and no stale folder is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import vlmcompress

RECIPE = {"stages": [{"method": "structured_prune", "ratio": 0.5}, {"method": "token_reduce", "r": 8}],
          "model": "tiny-clip"}

# the child runs apply and SIGKILLs itself at the chosen point (as `kill -9` from outside would)
CHILD = textwrap.dedent("""
    import os, signal, sys
    import vlmcompress
    from vlmcompress import orchestrator, outputs
    point, out = sys.argv[1], sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "lock":  # just after taking the lock and cleaning up
        real_clean = outputs.clean_stale
        def clean(output):
            real_clean(output)
            die()
        outputs.clean_stale = clean
    real_save = orchestrator.save_checkpoint
    def save(model, folder, **kwargs):
        final = kwargs.get("report") is not None
        result = real_save(model, folder, **kwargs)
        if (point == "final-save" and final) or (point == "after-stage-1" and not final):
            die()
        return result
    orchestrator.save_checkpoint = save
    recipe = {"model": "tiny-clip", "output": out,
              "stages": [{"method": "structured_prune", "ratio": 0.5}, {"method": "token_reduce", "r": 8}]}
    vlmcompress.apply(recipe, progress=False)
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    vlmcompress.apply(RECIPE | {"output": str(out)}, progress=False)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("point", ["lock", "after-stage-1", "final-save"])
def test_kill_9_then_resume_is_bit_identical_and_leaves_nothing_behind(point, uninterrupted, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, point, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()  # never a half-written output that looks complete
    left = sorted(p.name for p in tmp_path.iterdir())
    if point == "final-save":
        assert any(name.startswith(".out.tmp-") for name in left), left  # the full-size folder a kill leaves
    vlmcompress.apply(RECIPE | {"output": str(out)}, resume=True, progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == uninterrupted.keys()
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp-PID, no work folder, no lock
