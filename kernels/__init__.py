"""Per-neuron reductions: a plain PyTorch reference and the fused Triton kernels that match it."""
