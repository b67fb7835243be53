"""Stage 2: QLoRA/LoRA training, model loading, merging and the memory plan."""
