"""The backends, one module (or package) each; nit_kernels/dispatch.py chooses among them.

    reference    pure PyTorch: the spec, the test oracle and the last fallback (every op, any dtype)
    cpu          csrc/cpu kernels (nit:: ops, dispatch key CPU)
    cuda         csrc/cuda kernels (nit:: ops, dispatch key CUDA)
    cuda_sim     the csrc/cuda kernels on CPU tensors in a SIMT simulator (tests only)
    triton       Triton kernels (nit_triton:: ops); on CPU tensors under the Triton interpreter
    flash_attn   FlashAttention-2's flash_attn_varlen_func (attention only)

Each provides ``OPS`` (op -> kernel-interface function), ``load_error()`` and ``refuse(call)``,
and implements every op by the raw functions of its contract (nit_kernels/_autograd.py).
Nothing is imported here: a backend loads when dispatch first asks for it.
"""
