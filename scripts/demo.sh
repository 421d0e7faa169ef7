#!/usr/bin/env bash
# Installs ssbctl into .venv and runs the whole pipeline offline on the synthetic `shapes` dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ssbctl demo "$@"
.venv/bin/ssbctl retrieve --query "a red circle moves to the left"
