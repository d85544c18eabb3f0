#!/usr/bin/env bash
# libtorch for the container images, from the PyPI wheel exactly as deploy/setup.sh
# installs it (keep the three versions below in step with setup.sh; deploy/check-chart.py
# checks that they are).
#
#   libtorch.sh DEST cpu    the CPU libraries (the CUDA kernels removed, as setup.sh does)
#   libtorch.sh DEST cuda   also libtorch_cuda and every CUDA 13.0 library it loads
#
# DEST gets the wheel layout: DEST/torch/{include,lib} (LIBTORCH=DEST/torch) and
# DEST/nvidia/*/lib, which torch's libraries find through their own rpath.
set -euo pipefail
dest=${1:?usage: libtorch.sh DEST cpu|cuda}
flavour=${2:?usage: libtorch.sh DEST cpu|cuda}

TORCH_VERSION=2.11.0
CUDART_VERSION=13.0.96
CUPTI_VERSION=13.0.85
# What torch 2.11.0 (+cu130) requires on Linux: cuda-toolkit 13.0.2's libraries, cuDNN,
# cuSPARSELt, NCCL and NVSHMEM, at the versions pip resolves for it (Triton and the
# Python CUDA bindings are left out: only Python uses them).
CUDA_WHEELS=(
  "nvidia-cublas==13.1.0.3" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cufft==12.0.0.61"
  "nvidia-cufile==1.15.1.6" "nvidia-curand==10.4.0.35" "nvidia-cusolver==12.0.4.66"
  "nvidia-cusparse==12.6.3.3" "nvidia-nvjitlink==13.0.88" "nvidia-nvtx==13.0.85"
  "nvidia-cudnn-cu13==9.19.0.56" "nvidia-cusparselt-cu13==0.8.0"
  "nvidia-nccl-cu13==2.28.9" "nvidia-nvshmem-cu13==3.4.5"
)

pkgs=("torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION")
case "$flavour" in
  cpu) ;;
  cuda) pkgs+=("${CUDA_WHEELS[@]}") ;;
  *) echo "libtorch.sh: flavour must be cpu or cuda, not '$flavour'" >&2; exit 2 ;;
esac

python3 -m pip install --no-cache-dir --disable-pip-version-check --no-deps --target "$dest" "${pkgs[@]}"
lib=$dest/torch/lib
test -f "$lib/libtorch_cpu.so" || { echo "libtorch.sh: $lib/libtorch_cpu.so missing" >&2; exit 1; }
rm -f "$lib/libtorch_python.so"
if [ "$flavour" = cpu ]; then
  rm -f "$lib"/libtorch_cuda*.so "$lib/libc10_cuda.so" "$lib/libtorch_nvshmem.so" "$lib/libcaffe2_nvrtc.so"
else
  test -f "$lib/libtorch_cuda.so" || { echo "libtorch.sh: $lib/libtorch_cuda.so missing" >&2; exit 1; }
fi
# Python-only parts the Rust build and the images never use
rm -rf "$dest/bin" "$dest/functorch" "$dest/torchgen" "$dest"/*.dist-info
