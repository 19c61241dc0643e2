"""Measuring, one file per concern: `workloads` (what is timed per family), `flops` (FLOPs and tokens per layer of
a call), `memory` (peak memory of a call), `machine` (what it ran on). `vlmcompress.bench` times them."""
