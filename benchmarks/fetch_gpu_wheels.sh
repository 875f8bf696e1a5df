#!/usr/bin/env bash
# Download what benchmarks/gpu_check.py installs offline on the GPU machine (it reaches no package index)
# into benchmarks/wheels/ (git-ignored; a device call carries it with carry=["benchmarks/wheels"]).
#
#   bash benchmarks/fetch_gpu_wheels.sh [DEST]          # on a machine with PyPI, in the dev environment
#
# Target: the GPU machine's python3 (CPython 3.12 on x86-64 Linux, torch 2.11 + CUDA 13; triton and einops
# are there already). mamba-ssm and causal-conv1d come as sdists: gpu_check.py's build stage compiles them
# there, for that GPU only. About 3 MB in all.
set -euo pipefail
cd "$(dirname "$0")"
dest=${1:-wheels}
py=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$dest"
download=(python -m pip download --no-deps --disable-pip-version-check --dest "$dest")

# sdists: pip reads their metadata by running setup.py, which imports torch. Without build isolation and
# with the CUDA build skipped, the torch of this environment does (isolated, pip would install a torch).
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
  "${download[@]}" --no-binary :all: --no-build-isolation mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0

# Pure-Python wheels for the device's interpreter: fla's kernels (fla-core alone: flash-linear-attention
# adds layers and models that import transformers), and what the `prosg` CLI needs beyond the image.
"${download[@]}" --only-binary :all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  fla-core==0.6.0 omegaconf==2.4.0 jsonargparse==4.53.0 typeshed-client==2.15.0 docstring-parser==0.18.0 \
  einops==0.8.2

ls -l "$dest"
du -sh "$dest"
