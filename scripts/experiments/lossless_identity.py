"""How often lossless (n-gram draft-and-verify) output differs from one-token-at-a-time
greedy decoding. A verify pass multiplies several rows at once, which rounds differently
from one row; a near-tie argmax can flip. Counts prompts whose outputs differ, and where.

    python scripts/experiments/lossless_identity.py [N] [TOKENS] [MODEL]

decodes N held-out instructions (never evaluation items; default 200) for up to TOKENS
tokens (default 48) with both and prints a JSON summary; it writes no files.
"""

from __future__ import annotations

import argparse
import json

from earlyexit.decoding.drafters import NgramDrafter
from earlyexit.decoding.shallow_deep import DecodeConfig, decode_full
from earlyexit.decoding.speculative import decode_speculative
from earlyexit.engine import LayerEngine
from earlyexit.engine.kernels import cpu_model
from earlyexit.models import load_model
from earlyexit.tasks.generation import render_prompt, self_distill_instructions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=200, help="prompts (default 200)")
    parser.add_argument("tokens", nargs="?", type=int, default=48, help="new tokens (48)")
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    args = parser.parse_args()
    engine = LayerEngine(load_model(args.model))
    config = DecodeConfig(max_new_tokens=args.tokens)
    differ, tokens, passes, first_diff = 0, 0, 0, []
    for text in self_distill_instructions(args.n):
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
        "model": args.model,
        "cpu": cpu_model(),
        "prompts": args.n,
        "max_new_tokens": args.tokens,
        "tokens": tokens,
        "verify_passes": passes,
        "prompts_differing": differ,
        "first_difference_at": first_diff,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
