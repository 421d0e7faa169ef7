#!/usr/bin/env bash
# CUDA checks on one GPU: AMP bf16/fp16 loss parity against fp32, timed real training steps for the
# shapes and a CLIP-sized configuration, and a short fit + resume. Needs torch, transformers and
# safetensors only; TOKENIZER is a folder with the MiniLM tokenizer files (the device has no hub).
#   TOKENIZER=.devcarry/minilm-tokenizer bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers, safetensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
python3 benchmarks/device_check.py --tokenizer "${TOKENIZER:-.devcarry/minilm-tokenizer}" "$@"
