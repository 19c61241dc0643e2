"""Run ONNX graphs on recorded inputs with onnxruntime and numpy only (no torch), so that it can run under an
emulated CPU: `qemu-x86_64 -cpu EPYC-Milan python benchmarks/ort_replay.py FOLDER TAG` reproduces what ONNX Runtime
computes on an AVX2-only x86 machine, whatever CPU the host has (qemu-user reports the emulated CPU's features
to the cpuid instruction, which is how ONNX Runtime picks its kernels).

FOLDER holds `jobs.json` (`[{"graph": "x.onnx", "feeds": "feeds_0.npz", "out": "0_x.npy"}, ...]`); every job runs
`graph` on the arrays of `feeds` (one session per graph, one thread) and saves the first output as `FOLDER/TAG/out`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(folder: Path, tag: str) -> None:
    (folder / tag).mkdir(exist_ok=True)
    sessions: dict[str, ort.InferenceSession] = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for job in json.loads((folder / "jobs.json").read_text()):
        graph = job["graph"]
        if graph not in sessions:
            sessions[graph] = ort.InferenceSession(str(folder / graph), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        with np.load(folder / job["feeds"]) as feeds:
            out = sessions[graph].run(None, {k: feeds[k] for k in feeds.files})[0]
        np.save(folder / tag / job["out"], out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
