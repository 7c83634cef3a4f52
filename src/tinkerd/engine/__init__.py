"""The machine learning behind the Tinker API: base models, LoRA adapters, losses, optimizer, sampler, checkpoints."""
