#!/usr/bin/env bash
# Reruns every benchmark behind docs/benchmarks.md (not part of CI). About 2 hours on 2 CPU cores.
# Timing runs take /tmp/vlmc-bench.lock so that two of them never share the cores; run this on a quiet machine
# (the JSON files record the load average before and after each timing run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
R=benchmarks/results
timed() { flock /tmp/vlmc-bench.lock "$@"; }

# the built-in world (#4): teachers, the sensitivity check, the quickstart
.venv/bin/vlmcompress eval shapes-clip --json > $R/eval_shapes_clip.json
.venv/bin/vlmcompress eval shapes-llava --size 2000 --json > $R/eval_shapes_llava.json
$PY benchmarks/bench_shapes_sensitivity.py --model shapes-clip --size 5000 --json $R/shapes_sensitivity.json
.venv/bin/vlmcompress apply recipes/quickstart.yaml --overwrite
timed .venv/bin/vlmcompress bench shapes-clip --against out/shapes-clip-compressed --batch-sizes 1,32 --json \
    > $R/bench_quickstart.json

# speed at realistic size: ViT-B/16 tower (ToMe, pruning) and the LLaVA-shaped model (ToMe)
timed $PY benchmarks/bench_vit_tome_prune.py --batch-sizes 1,8 --rounds 5 --json $R/vit_b16_tome_prune.json
timed $PY benchmarks/bench_llava_shaped.py --json $R/llava_shaped_tome.json

# training-free token reduction (#5): accuracy at matched FLOPs, then speed
$PY benchmarks/bench_token_reduction_accuracy.py --model shapes-clip --budgets 0.75,0.5,0.35 \
    --json $R/token_reduction_accuracy_clip.json
$PY benchmarks/plot_token_reduction.py $R/token_reduction_accuracy_clip.json --png docs/img/token_reduction_shapes_clip.png
$PY benchmarks/bench_token_reduction_accuracy.py --model shapes-llava --size 2000 \
    --json $R/token_reduction_accuracy_llava.json
$PY benchmarks/bench_llava_reduction_accuracy.py --model shapes-llava --size 2000 \
    --json $R/llava_reduction_accuracy.json
timed $PY benchmarks/bench_token_reduction_speed.py --batch-sizes 1,32 --rounds 5 \
    --json $R/token_reduction_speed.json
timed $PY benchmarks/bench_llava_reduction_speed.py --repeats 11 --json $R/llava_reduction_speed.json

# quantization (#6): every backend × scheme on the model as loaded back
timed $PY benchmarks/bench_quantize.py --part speed --json $R/quantize_vit_b16.json
timed $PY benchmarks/bench_quantize.py --part llava-speed --json $R/quantize_llava_shaped.json
$PY benchmarks/bench_quantize.py --part accuracy --llava --skip "torchao int4" --json $R/quantize_shapes.json
$PY benchmarks/bench_quantize.py --part accuracy --only "torchao int4" --size 1000 \
    --json $R/quantize_shapes_torchao_int4.json
timed $PY benchmarks/bench_onnx.py --rounds 5 --threads 1 --json $R/onnx_runtime_1thread.json
timed $PY benchmarks/bench_onnx.py --rounds 5 --threads 2 --accuracy --json $R/onnx_runtime_2threads.json

# int8 layout by CPU (ONNX Runtime under an emulated AVX2 CPU: needs apt-get install qemu-user) and CLI cold start
$PY benchmarks/bench_onnx_int8_layout.py --size 1000 --json $R/onnx_int8_layout.json
timed $PY benchmarks/bench_cli_import.py --json $R/cli_import.json

# training (#14, #15): finetune, precision, the distilled students and what was tried for the half + half row.
# About 4 more hours; the minutes these rows report are only meaningful on a quiet machine.
export OMP_WAIT_POLICY=PASSIVE
D=benchmarks/bench_distill.py
timed $PY benchmarks/bench_train_precision.py --json $R/train_precision.json
timed $PY $D --model shapes-clip --steps 500 --json $R/distill_shapes_clip.json
timed $PY $D --model shapes-clip --steps 2000 --lr 1e-3 --students "half vision" --json $R/distill_shapes_clip_2000.json
timed $PY $D --model shapes-clip --steps 1050 --lr 2e-3 --students "half vision + half text" \
    --train '{"batch_size":128,"weight_decay":0.05}' --loss '{"logits":0,"hidden":0}' \
    --json $R/distill_shapes_clip_1050_vt_taskonly.json
timed $PY $D --model shapes-clip --steps 3800 --finetune-steps 0 --lr 2e-3 --students "half vision + half text" \
    --train '{"batch_size":128,"weight_decay":0.05}' --loss '{"logits":0,"hidden":0}' \
    --json $R/distill_shapes_clip_3800_vt_taskonly.json
# the same student on 2 processes (one thread each): the row is in out/shapes-clip-v2t1-2proc/report.json
OMP_NUM_THREADS=1 timed $PY -m torch.distributed.run --nproc_per_node 2 -m vlmcompress apply \
    $R/distill_shapes_clip_1600_vt_2proc.yaml --overwrite
timed $PY $D --model shapes-llava --steps 150 --json $R/distill_shapes_llava.json
timed $PY $D --throughput --json $R/distill_throughput.json
$PY benchmarks/bench_depth_ceiling.py --text-layers 1 --vision-layers 2 --steps 1000 --json $R/depth_ceiling_v2t1_1000.json
$PY benchmarks/bench_text_mimic.py --steps 1500 --json $R/text_mimic_1500.json
$PY benchmarks/bench_distill_variants.py --steps 300 --json $R/distill_variants_300.json
$PY benchmarks/bench_distill_variants.py --steps 600 --variants text-reinit,abrupt --eval-every 100 \
    --json $R/distill_variants_600_text_reinit.json
$PY benchmarks/bench_distill_variants.py --steps 600 --variants mimic-init --eval-every 100 \
    --json $R/distill_variants_600_mimic_init.json
$PY benchmarks/bench_distill_variants.py --steps 600 --lr 4e-3 --variants abrupt --eval-every 100 \
    --json $R/distill_variants_600_lr4e-3.json
timed $PY benchmarks/bench_patch_dropout.py --json $R/patch_dropout_speed.json
for P in 0.5 0.75; do
    $PY $D --model shapes-clip --steps 300 --finetune-steps 0 --lr 2e-3 --students "half vision + half text" \
        --train "{\"batch_size\":128,\"weight_decay\":0.05,\"patch_dropout\":$P}" --loss '{"logits":0,"hidden":0}' \
        --json $R/distill_patch_dropout_${P}_300.json
done
