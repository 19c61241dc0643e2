#!/usr/bin/env bash
# The tests marked `slow` (minutes each: ONNX exports of every variant, resume with ONNX, retraining on another
# instruction set), which CI's `pytest -q` leaves out. Run before changing quantize, ONNX or the teachers:
#   bash benchmarks/run_slow.sh            # all slow tests
#   bash benchmarks/run_slow.sh -k onnx    # extra pytest arguments are passed on
# The last line names the CPU: some of these results differ by instruction set (AVX2 vs AVX-512 VNNI).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q -m slow "$@"
# the bad-input fuzzer at ten times CI's size (tests/test_bad_input_corpus.py)
VLMCOMPRESS_FUZZ_CASES=3000 .venv/bin/python -m pytest -q -s tests/test_bad_input_corpus.py -k fuzzed "$@"
.venv/bin/python -c "from vlmcompress import cpu; print('cpu:', cpu.detect().label())"
