"""Decoding loops for generation: FREE's shallow-deep module, CALM, and lossless
draft-and-verify decoding with n-gram or shallow-exit drafters."""
