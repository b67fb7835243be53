"""Stage 3: base vs tuned, side by side (perplexity, lm-eval benchmarks, comparison)."""
