#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu/wheels.txt for the GPU machine (CPython 3.12, x86-64 Linux) into a folder
# (default .whl/ at the repository root, git-ignored), for benchmarks/gpu/run.sh to install there with no network.
# Run it on a machine with network; any Python with pip will do, whatever its version.
set -euo pipefail
cd "$(dirname "$0")/../.."
destination=${1:-.whl}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$destination" -r benchmarks/gpu/wheels.txt
ls -l "$destination"/*.whl
# The device tool carries the working tree and this folder together, 64 MiB at most
wheels=$(du -cb "$destination"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "wheels: $((wheels / 1048576)) MiB, tracked files: $((tree / 1048576)) MiB, together $(((wheels + tree) / 1048576)) MiB of 64"
