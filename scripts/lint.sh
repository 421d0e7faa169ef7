#!/usr/bin/env bash
# Static checks: ruff (style, pyflakes, bugbear, pyupgrade) and mypy over ssbctl, as configured in
# pyproject.toml. Needs .venv (scripts/install.sh; ruff and mypy come with the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check ssbctl tests benchmarks
.venv/bin/mypy ssbctl
