"""Study script (not part of the library): generate the self-distillation text once (800
held-out instructions x 64 tokens) for scripts/experiments/shallow_layer_study.py."""
import torch, time
from earlyexit.engine import LayerEngine
from earlyexit.models import load_model
from earlyexit.readouts.self_distill import self_generated_chunks
from earlyexit.tasks.generation import render_prompt, self_distill_instructions
torch.set_num_threads(2)
e = LayerEngine(load_model("smollm2-135m"))
ps = [render_prompt(e.tokenizer, t) for t in self_distill_instructions(800)]
t=time.time()
held = self_generated_chunks(e, ps[:80], 64, 256)
torch.save(held, "/tmp/exp/sd_held.pt"); print("held", held.shape, time.time()-t, flush=True)
tr = self_generated_chunks(e, ps[80:], 64, 256)
torch.save(tr, "/tmp/exp/sd_train.pt"); print("train", tr.shape, time.time()-t, flush=True)
