# Sourced by the GPU launch scripts (slurm.sbatch, gpu_nodes.sh) and before GPU benchmarks:
#   source launch/gpu_env.sh && python -m jaxdyn.bench --suite train --preset qwen2.5-0.5b
# XLA flags that help transformer training on NVIDIA GPUs; existing XLA_FLAGS are kept and
# come first, so a flag given by the caller can be overridden here only by unsetting it.
#   latency-hiding scheduler: overlaps FSDP all-gathers / reduce-scatters with compute;
#   triton gemm off: cuBLAS(Lt) matmuls, the faster path for the bf16 GEMM shapes we run;
_JAXDYN_GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_triton_gemm=false"
case " ${XLA_FLAGS:-} " in
  *" --xla_gpu_enable_latency_hiding_scheduler"*) ;;  # already set by the caller
  *) export XLA_FLAGS="${XLA_FLAGS:-} ${_JAXDYN_GPU_FLAGS}" ;;
esac
unset _JAXDYN_GPU_FLAGS
# Preallocate most of the GPU memory once (no allocator growth inside the step).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Keep PyTorch references and tokenizers from oversubscribing the host threads.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
