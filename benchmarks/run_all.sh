#!/usr/bin/env bash
# Reruns every benchmark in docs/benchmarks.md (about 10 minutes on 2 cores; not part of CI).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/python benchmarks/bench_vit_tome_prune.py --batch-sizes 1,8 --rounds 5 --json benchmarks/results/vit_b16_tome_prune.json
.venv/bin/python benchmarks/bench_shapes_sensitivity.py --model shapes-clip --size 5000 --json benchmarks/results/shapes_sensitivity.json
.venv/bin/vlmcompress eval shapes-clip --json > benchmarks/results/eval_shapes_clip.json
.venv/bin/vlmcompress eval shapes-llava --size 2000 --json > benchmarks/results/eval_shapes_llava.json
.venv/bin/vlmcompress apply recipes/quickstart.yaml --overwrite
.venv/bin/vlmcompress bench shapes-clip --against out/shapes-clip-compressed --batch-sizes 1,32 --json > benchmarks/results/bench_quickstart.json
flock /tmp/vlmc-bench.lock .venv/bin/python benchmarks/bench_onnx.py --rounds 5 --threads 1 --json benchmarks/results/onnx_runtime_1thread.json
flock /tmp/vlmc-bench.lock .venv/bin/python benchmarks/bench_onnx.py --rounds 5 --threads 2 --accuracy --json benchmarks/results/onnx_runtime_2threads.json
