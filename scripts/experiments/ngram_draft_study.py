"""How often n-gram (prompt lookup) drafts match the model's own greedy output, by match
length and draft position: the numbers behind the n-gram drafter's draft-length rule.

For each task, decode `N` prompts greedily at full depth, then replay: at every output
position, look up the longest 3/2/1-gram suffix of prompt + output so far and count how many
of the up-to-8 looked-up tokens equal the tokens the model went on to emit.

    python scripts/experiments/ngram_draft_study.py [N]    # N = 16: ~2 min per task

prints one JSON line per task (SAMSum, XSum, SQuAD); it writes no files.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from earlyexit.decoding.drafters import NgramIndex
from earlyexit.decoding.shallow_deep import DecodeConfig, decode_full
from earlyexit.engine import LayerEngine
from earlyexit.models import load_model
from earlyexit.tasks.generation import get_generation_task, render_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=16, help="prompts per task (16)")
    args = parser.parse_args()
    engine = LayerEngine(load_model("smollm2-135m"))
    study = {}
    for name in ("samsum", "xsum", "squad"):
        task = get_generation_task(name)
        # accepted[n] = accepted-prefix lengths (of 8 looked up) when the match is n long
        accepted: dict[int, list[int]] = defaultdict(list)
        steps = 0
        for item in task.items(args.n):
            prompt = render_prompt(engine.tokenizer, item.instruction)
            ids, _ = engine.encode([prompt])
            out = decode_full(engine, prompt, DecodeConfig(max_new_tokens=64)).tokens
            index = NgramIndex(3)
            index.extend(ids[0].tolist() + out[:1])
            for pos in range(1, len(out)):
                steps += 1
                n, guess = index.lookup(8)  # the longest suffix match (n = 0: none), 8 tokens
                run = 0
                while run < len(guess) and pos + run < len(out) and guess[run] == out[pos + run]:
                    run += 1
                accepted[n].append(run)
                index.extend([out[pos]])
        rows = {}
        for n, runs in sorted(accepted.items()):
            # P(the first g looked-up tokens all match), g = 1..8
            rows[n] = {
                "steps": len(runs),
                "p_prefix": [round(sum(r >= g for r in runs) / len(runs), 3) for g in range(1, 9)],
            }
        study[name] = {"steps": steps, "by_match_length": rows}
        print(name, json.dumps(study[name]))


if __name__ == "__main__":
    main()
