"""Study script (not part of the library): pick the shallow layer k and readout kind.

Agreement with the final layer and confident-exit fractions on held-out answers, for affine
readouts at several k and an affine + MLP "exit block". Needs /tmp/exp/sd_*.pt from
self_distill_text.py."""
import copy, json, sys, time
import torch
from torch import nn
from earlyexit.engine import LayerEngine
from earlyexit.models import load_model
from earlyexit.readouts.train import TrainConfig, collect_hidden, fit_ridge, distill, HiddenStates
from earlyexit.readouts.readout import LayerAdapter
from earlyexit.tasks.generation import render_prompt, self_distill_instructions
torch.set_num_threads(2); torch.manual_seed(0)
e = LayerEngine(load_model("smollm2-135m"))
Ks = [8, 12, 16, 20, 24]
L = e.num_layers
chunks = torch.load("/tmp/exp/sd_train.pt")
print("chunks", chunks.shape, flush=True)
states = collect_hidden(e, chunks, Ks)
cfg = TrainConfig(steps=300, layers=Ks)
aff = {k: LayerAdapter(e.hidden_size) for k in Ks}
for k, a in aff.items():
    fit_ridge(a, states.by_layer[k], states.final, cfg.ridge)
t = time.time(); vocab = distill(e, aff, states, cfg); print("affine distill", time.time() - t, flush=True)

class Block(nn.Module):
    def __init__(self, affine, layer):
        super().__init__()
        self.affine = copy.deepcopy(affine)
        self.norm = copy.deepcopy(layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(layer.mlp)
        self.gate = nn.Parameter(torch.zeros(e.hidden_size))
    def forward(self, h):
        y = self.affine(h)
        return y + self.gate * self.mlp(self.norm(y))
BK = [12, 20]
blocks = {k: Block(aff[k], e.arch.layers[L - 1]).requires_grad_(True) for k in BK}
bcfg = TrainConfig(steps=400, layers=BK, lr=3e-4)
t = time.time(); distill(e, blocks, HiddenStates({k: states.by_layer[k] for k in BK}, states.final), bcfg); print("block distill", time.time() - t, flush=True)
del states
# held-out: answers of the first 40 held-out prompts, teacher forced
ps = [render_prompt(e.tokenizer, x) for x in self_distill_instructions(800)[:40]]
confs = {}; agree = {}
ids_all = []
for i in range(0, 40, 8):
    ids, pad = e.encode(ps[i:i+8])
    ans = e.greedy(ids, 48, pad)
    for r in range(ids.shape[0]):
        a = ans[r].tolist()
        if e.tokenizer.eos_token_id in a: a = a[: a.index(e.tokenizer.eos_token_id) + 1]
        ids_all.append((ids[r, int(pad[r]):].tolist(), a))
restricted = torch.tensor(sorted(set(vocab.tolist()) | {e.tokenizer.eos_token_id}))
variants = {f"affine@{k}": (k, aff[k]) for k in Ks} | {f"block@{k}": (k, blocks[k]) for k in BK}
res = {v: ([], []) for v in variants}
with torch.inference_mode():
    for p, a in ids_all:
        seq = torch.tensor([p + a])
        st = e.prefill(seq, keep_layers=True)
        sl = slice(len(p) - 1, len(p) + len(a) - 1)
        target = e.logits(st.hidden[0, sl]).argmax(-1)
        for v, (k, ad) in variants.items():
            h = st.layer_hidden[k - 1][0, sl]
            lg = e.logits(ad(h), restricted).float().softmax(-1)
            top = lg.topk(2, -1)
            res[v][0].append(top.values[:, 0] - top.values[:, 1])
            res[v][1].append(restricted[top.indices[:, 0]] == target)
out = {}
for v, (c, g) in res.items():
    c = torch.cat(c); g = torch.cat(g).float()
    k = variants[v][0]
    order = c.argsort(descending=True); prec = g[order].cumsum(0) / torch.arange(1, len(g) + 1)
    f90 = float((prec >= 0.9).nonzero().max() + 1) / len(g) if (prec >= 0.9).any() else 0.0
    f95 = float((prec >= 0.95).nonzero().max() + 1) / len(g) if (prec >= 0.95).any() else 0.0
    row = {"agree": float(g.mean()), "f@p90": f90, "f@p95": f95}
    for th in (0.3, 0.5, 0.7, 0.9):
        m = c >= th
        row[f"f@{th}"] = float(m.float().mean()); row[f"p@{th}"] = float(g[m].mean()) if m.any() else 1.0
    row["pred_speedup@p90"] = 38 / (38.6 - (L - k) * f90)
    out[v] = row
    print(v, json.dumps({a: round(b, 3) for a, b in row.items()}), flush=True)
print("tokens", len(g))
json.dump(out, open("/tmp/exp/ksel.json", "w"), indent=1)
torch.save({"aff": {k: a.state_dict() for k, a in aff.items()}, "blocks": {k: b.state_dict() for k, b in blocks.items()}, "vocab": vocab}, "/tmp/exp/ksel_weights.pt")
