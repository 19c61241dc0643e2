"""The same recipe on 2 CPU processes (torchrun, gloo): world_size recorded, both ranks trained on disjoint shards,
one process wrote the output, and the weights equal the 1-process run at the same global batch.

The command that really starts N processes on a machine without GPUs is `python -m torch.distributed.run
--nproc_per_node N -m vlmcompress apply recipe.yaml` (docs/training.md). `accelerate launch --num_processes 2` there
starts one process (its simple launcher), and so does an accelerate config with `distributed_type: MULTI_CPU`
without MPI; both were tried."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

RECIPE = """\
model: shapes-clip-small
output: {out}
data:
  train: {{builtin: shapes, split: train}}
stages:
  - method: distill
    student: {{vision: [1]}}
    loss: {{task: 0.0, logits: 0.0, hidden: 1.0}}   # a mean over samples: 2 × B rows average as 1 × 2B rows do
    train: {{steps: 10, batch_size: {batch}, lr: 1.0e-3, warmup: 0}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    (tmp_path / "one.yaml").write_text(RECIPE.format(out=one, batch=8))
    (tmp_path / "two.yaml").write_text(RECIPE.format(out=two, batch=4))
    subprocess.run([sys.executable, "-m", "vlmcompress", "apply", str(tmp_path / "one.yaml")], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "vlmcompress", "apply", str(tmp_path / "two.yaml")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # one process wrote and reported
    report = json.loads((two / "report.json").read_text())
    details = report["stages"][0]["details"]
    assert report["world_size"] == 2 and details["world_size"] == 2
    assert details["rows_per_rank"] == [40, 40]  # both ranks trained, 10 steps × 4 rows each
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "two.vlmcompress-work").exists()

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    from vlmcompress.models import load_model

    teacher = load_model("shapes-clip-small")[0].state_dict()
    start = {k: teacher[k.replace("encoder.layers.0.", "encoder.layers.1.")] for k in a
             if k.startswith("vision_model.encoder.layers.0.")}
    assert max((a[k] - v).abs().max().item() for k, v in start.items()) > 1e-3  # the student did move
    assert torch.equal(a["text_model.embeddings.token_embedding.weight"],
                       teacher["text_model.embeddings.token_embedding.weight"])  # not in the loss: untouched
