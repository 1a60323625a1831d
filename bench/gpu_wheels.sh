#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a GPU check: downloads the wheels that the lent
# GPU machine's image lacks (diffusers for the claims suite's SD-VAE baseline and the small
# packages it needs; PyYAML, which softvq_fast.training imports) into .whl/ for Python 3.12,
# x86-64. Then run the check with `carry: [".whl"]`; bench/gpu_check.sh installs whatever it
# finds there. .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata zipp regex pyyaml
ls -la .whl
