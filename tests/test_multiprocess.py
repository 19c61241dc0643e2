"""The same recipe on 2 CPU processes (torchrun, gloo): world_size recorded, both ranks trained on disjoint shards,
one process wrote the output, and the weights equal the 1-process run at the same global batch — for a
hidden-state loss (a mean over samples) and for the contrastive losses, which gather every process's rows.

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

import pytest
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
    loss: {loss}
    train: {{steps: {steps}, batch_size: {batch}, lr: 1.0e-3, warmup: 0}}
"""
# a mean over samples: 2 × B rows average as 1 × 2B rows do
HIDDEN = {"loss": "{task: 0.0, logits: 0.0, hidden: 1.0}", "steps": 10}
# over the global batch: every process's rows are each row's negatives, in the student's and the teacher's logits
CONTRASTIVE = {"loss": "{task: 1.0, logits: 1.0, hidden: 0.0}", "steps": 6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_both(tmp_path, fields: dict) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """The recipe at batch 8 in one process and at batch 4 in each of 2 (torchrun, gloo): both weight files and
    the 2-process run."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    (tmp_path / "one.yaml").write_text(RECIPE.format(out=one, batch=8, **fields))
    (tmp_path / "two.yaml").write_text(RECIPE.format(out=two, batch=4, **fields))
    subprocess.run([sys.executable, "-m", "vlmcompress", "apply", str(tmp_path / "one.yaml")], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "vlmcompress", "apply", str(tmp_path / "two.yaml")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors")), run


def test_a_contrastive_distillation_sees_every_process_rows_as_one_process_does(tmp_path):
    # with each process's own 4 rows as negatives the two runs would differ by far more than 1e-5
    a, b, run = run_both(tmp_path, CONTRASTIVE)
    assert run.stdout.count("wrote ") == 1
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    from vlmcompress.models import load_model

    teacher = load_model("shapes-clip-small")[0].state_dict()
    moved = max((a[k] - teacher[k]).abs().max().item() for k in a if k.startswith("text_model.encoder."))
    assert moved > 1e-3


HALVES = """\
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vlmcompress.adapters import BUILTIN_TINY

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
adapter = BUILTIN_TINY[sys.argv[1]]
model = adapter.tiny_model(0)
batch = adapter.example_inputs(model, batch_size=8, seed=1)
batch["input_ids"][5] = batch["input_ids"][1]  # one caption on both ranks: not its own negative
rows = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}
out = adapter.train_outputs(model, rows)
out.loss.backward()
grads = {}
for name, p in model.named_parameters():
    if p.grad is not None:  # what data parallelism does: the mean of the processes' gradients
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world
if rank == 0:
    save_file(grads | {"loss": out.loss.detach().reshape(1), "logits": out.logits["image_to_text"].detach().contiguous()},
              sys.argv[2])
"""


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_the_dual_encoder_losses_of_two_halves_equal_the_whole_batch(tmp_path, name):
    """Each of 2 processes holds 4 of 8 rows; the loss, the similarity logits and the averaged gradients equal one
    process's on all 8 (CLIP's softmax loss, SigLIP's sigmoid loss with its bias), equal captions masked across
    processes."""
    from vlmcompress.adapters import BUILTIN_TINY

    script, result = tmp_path / "halves.py", tmp_path / "halves.safetensors"
    script.write_text(HALVES)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), name, str(result)],
                         env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    two = load_file(str(result))
    adapter = BUILTIN_TINY[name]
    model = adapter.tiny_model(0)
    batch = adapter.example_inputs(model, batch_size=8, seed=1)
    batch["input_ids"][5] = batch["input_ids"][1]
    out = adapter.train_outputs(model, batch)
    out.loss.backward()
    assert two["logits"].shape == (8, 8)
    assert torch.allclose(two["logits"], out.logits["image_to_text"].detach(), atol=1e-5)
    assert abs(float(two["loss"]) - float(out.loss.detach())) < 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == {k for k in two if k not in ("loss", "logits")}
    assert max((two[n] - g).abs().max().item() for n, g in grads.items()) < 1e-5
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3


def test_two_processes_train_like_one_at_the_same_global_batch(tmp_path):
    a, b, run = run_both(tmp_path, HIDDEN)
    two = tmp_path / "two"
    assert run.stdout.count("wrote ") == 1  # one process wrote and reported
    report = json.loads((two / "report.json").read_text())
    details = report["stages"][0]["details"]
    assert report["world_size"] == 2 and details["world_size"] == 2
    assert details["rows_per_rank"] == [40, 40]  # both ranks trained, 10 steps × 4 rows each
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "two.vlmcompress-work").exists()

    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    from vlmcompress.models import load_model

    teacher = load_model("shapes-clip-small")[0].state_dict()
    start = {k: teacher[k.replace("encoder.layers.0.", "encoder.layers.1.")] for k in a
             if k.startswith("vision_model.encoder.layers.0.")}
    assert max((a[k] - v).abs().max().item() for k, v in start.items()) > 1e-3  # the student did move
    assert torch.equal(a["text_model.embeddings.token_embedding.weight"],
                       teacher["text_model.embeddings.token_embedding.weight"])  # not in the loss: untouched
