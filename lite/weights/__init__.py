"""Weights: the GGUF model file (validated, memory-mapped) and access to resident and expert tensors."""
