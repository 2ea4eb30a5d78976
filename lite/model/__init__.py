"""DeepSeek-V2 model: config, rope, latent cache, MLA, MoE and the forward pass."""
