"""Early-exit decoding loops for generation (FREE's shallow-deep module, lossless mode)."""
