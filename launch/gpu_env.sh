# Sourced by the GPU launch scripts: XLA flags that help transformer training on NVIDIA GPUs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
