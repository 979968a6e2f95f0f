#!/usr/bin/env bash
# Ahead-of-time check behind docs/scaling.md: ViT-B/16 at 224x224, global batch 4096, bf16
# compute, compiled on simulated CPU devices standing in for a v5p-256 (128 chips) and 64 H100s.
# Prints the --compile_only JSON per layout. Per-device state bytes are exact for any backend;
# FLOPs are the program's; the temporary peak is the CPU compiler's (TPU/GPU fuse differently).
set -euo pipefail
cd "$(dirname "$0")/.."
for devices in 128 64; do
  for mesh in "--config.mesh.data=-1" "--config.mesh.data=1 --config.mesh.fsdp=-1"; do
    echo "== $devices devices, $mesh"
    XLA_FLAGS=--xla_force_host_platform_device_count=$devices JAX_PLATFORMS=cpu \
      python -m bigtrain.main --config configs/vit.py:size=B,patch=16,image=224 --compile_only \
      --config.batch_size=4096 --config.eval_batch_size=$devices \
      --config.data.synthetic_size=4096 --config.data.synthetic_classes=1000 \
      --config.model.dtype=bfloat16 --config.optim.name=adamw $mesh 2>/dev/null
  done
done
