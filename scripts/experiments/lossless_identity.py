"""How often lossless (n-gram draft-and-verify) output differs from one-token-at-a-time
greedy decoding. A verify pass multiplies several rows at once, which rounds differently
from one row; a near-tie argmax can flip. Counts prompts whose outputs differ, and where.

`python scripts/experiments/lossless_identity.py [N] [TOKENS]` decodes N held-out
instructions (never evaluation items) with both and prints a JSON summary.
"""

import json
import sys

from earlyexit.decoding.drafters import NgramDrafter
from earlyexit.decoding.shallow_deep import DecodeConfig, decode_full
from earlyexit.decoding.speculative import decode_speculative
from earlyexit.engine import LayerEngine
from earlyexit.engine.kernels import cpu_model
from earlyexit.models import load_model
from earlyexit.tasks.generation import render_prompt, self_distill_instructions

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 48
MODEL = sys.argv[3] if len(sys.argv) > 3 else "smollm2-135m"
engine = LayerEngine(load_model(MODEL))
config = DecodeConfig(max_new_tokens=TOKENS)
differ, tokens, passes, first_diff = 0, 0, 0, []
for text in self_distill_instructions(N):
    prompt = render_prompt(engine.tokenizer, text)
    full = decode_full(engine, prompt, config).tokens
    spec = decode_speculative(engine, NgramDrafter(max_tokens=4), prompt, config)
    tokens += len(full)
    passes += spec.passes
    if spec.tokens != full:
        differ += 1
        cut = next(
            (i for i, (a, b) in enumerate(zip(spec.tokens, full, strict=False)) if a != b),
            min(len(spec.tokens), len(full)),
        )
        first_diff.append(cut)
summary = {
    "model": MODEL,
    "cpu": cpu_model(),
    "prompts": N,
    "max_new_tokens": TOKENS,
    "tokens": tokens,
    "verify_passes": passes,
    "prompts_differing": differ,
    "first_difference_at": first_diff,
}
print(json.dumps(summary))
