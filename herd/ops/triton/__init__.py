"""herd's Triton kernels outside attention (which has its own backend folder): the grouped MoE
GEMM for decode-sized batches (moe_gemm). Import only where Triton is installed; callers check
herd.ops.moe.triton_moe_gemm() first."""
