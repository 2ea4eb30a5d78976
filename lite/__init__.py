"""lite: local quantized runtime for DeepSeek-Coder-V2."""
