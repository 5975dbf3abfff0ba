#!/usr/bin/env bash
# mamba-ssm and causal-conv1d on a CPU-only torch: their Python sources without the CUDA kernels. The tests run
# their reference functions (selective_scan_ref, mamba_inner_ref, causal_conv1d_ref, ...) as stand-ins for the
# kernels (tests/mamba_ssm_refs.py). Their setup.py crashes on a CPU torch (torch.version.cuda is None) and tries to
# download a prebuilt CUDA wheel unless forced to build; --no-deps keeps triton and the other GPU-only dependencies
# out. Pinned: the tests read functions from these versions' files.
set -euo pipefail
MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    pip install --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1" "causal-conv1d==1.7.0" "einops>=0.7"
