#!/usr/bin/python3
"""PyTorch reference of the dsrsq transformer, and the golden-fixture writer.

The module below is the same model as src/model/transformer.cpp, with every
parameter named and shaped exactly as Transformer::build_params lays it out:

  wte (V, C)
  h.{l}.ln1.weight/bias (C)
  h.{l}.attn.wq/wk/wv/wo (C, C), h.{l}.attn.bq/bk/bv/bo (C)
  h.{l}.ln2.weight/bias (C)
  h.{l}.mlp.wfc (F, C), h.{l}.mlp.bfc (F), h.{l}.mlp.wproj (C, F), h.{l}.mlp.bproj (C)
  lnf.weight/bias (C)
  lm_head (V, C)             only when tied_embedding is false

Architecture (pre-LN decoder): x = wte[tokens]; per layer
  h = LN1(x); q, k, v = h Wq^T + bq, ...; RoPE(q), RoPE(k) per head
  (rotate-half layout, angles in float64 then cast to float32);
  causal attention by explicit positions (key visible iff k_pos <= q_pos),
  scale 1/sqrt(HS); x += att Wo^T + bo; x += Wproj GELU_tanh(Wfc LN2(x) + bfc) + bproj
logits = LNf(x) @ wte^T (tied) or @ lm_head^T. LayerNorm eps 1e-5.
Loss = sum_n mask[n] * CE(logits[n], target[n]) / sum_n mask[n].

Run as a script it writes the golden fixture (format in tests/reference/README.md):
  /usr/bin/python3 tests/reference/torch_model.py --out golden_fixture.h5
bench/torch_train_step.py imports GPT and masked_loss from here.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT = "dsrsq-golden"
FORMAT_VERSION = 1


def rope_tables(pos, head_size, theta):
    """cos, sin of shape (B, T, 1, HS/2) in float32, computed in float64."""
    half = head_size // 2
    i = torch.arange(half, dtype=torch.float64, device=pos.device)
    inv_freq = theta ** (-2.0 * i / head_size)
    ang = pos.to(torch.float64)[..., None] * inv_freq  # (B, T, half)
    return torch.cos(ang).float()[:, :, None, :], torch.sin(ang).float()[:, :, None, :]


def apply_rope(x, cos, sin):
    """x (B, T, NH, HS): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)


class LayerNorm(nn.Module):
    def __init__(self, c, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, c, n_heads):
        super().__init__()
        self.n_heads = n_heads
        for w in ("q", "k", "v", "o"):
            setattr(self, "w" + w, nn.Parameter(torch.zeros(c, c)))
            setattr(self, "b" + w, nn.Parameter(torch.zeros(c)))

    def forward(self, x, cos, sin, visible):
        B, T, C = x.shape
        NH = self.n_heads
        HS = C // NH
        q = apply_rope(F.linear(x, self.wq, self.bq).view(B, T, NH, HS), cos, sin)
        k = apply_rope(F.linear(x, self.wk, self.bk).view(B, T, NH, HS), cos, sin)
        v = F.linear(x, self.wv, self.bv).view(B, T, NH, HS)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, NH, T, HS)
        # torch 1.13 has no scaled_dot_product_attention: plain masked softmax.
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HS))
        att = att.masked_fill(~visible[:, None, :, :], float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return F.linear(y, self.wo, self.bo)


class MLP(nn.Module):
    def __init__(self, c, f):
        super().__init__()
        self.wfc = nn.Parameter(torch.zeros(f, c))
        self.bfc = nn.Parameter(torch.zeros(f))
        self.wproj = nn.Parameter(torch.zeros(c, f))
        self.bproj = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.linear(F.gelu(F.linear(x, self.wfc, self.bfc), approximate="tanh"), self.wproj, self.bproj)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = LayerNorm(cfg["d_model"], cfg["ln_eps"])
        self.attn = Attention(cfg["d_model"], cfg["n_heads"])
        self.ln2 = LayerNorm(cfg["d_model"], cfg["ln_eps"])
        self.mlp = MLP(cfg["d_model"], cfg["d_ff"])

    def forward(self, x, cos, sin, visible):
        x = x + self.attn(self.ln1(x), cos, sin, visible)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Parameters registered in Transformer::build_params order."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        V, C = cfg["vocab"], cfg["d_model"]
        self.wte = nn.Parameter(torch.zeros(V, C))
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg["n_layers"])])
        self.lnf = LayerNorm(C, cfg["ln_eps"])
        if not cfg.get("tied_embedding", True):
            self.lm_head = nn.Parameter(torch.zeros(V, C))

    def forward(self, tokens, pos):
        """tokens, pos: int (B, T). Returns logits (B, T, V)."""
        assert int(pos.min()) >= 0 and int(pos.max()) < self.cfg["max_pos"], "position outside [0, max_pos)"
        HS = self.cfg["d_model"] // self.cfg["n_heads"]
        cos, sin = rope_tables(pos, HS, self.cfg["rope_theta"])
        visible = pos[:, None, :] <= pos[:, :, None]  # (B, Tq, Tk): key position <= query position
        x = self.wte[tokens.long()]
        for block in self.h:
            x = block(x, cos, sin, visible)
        head = self.wte if self.cfg.get("tied_embedding", True) else self.lm_head
        return F.linear(self.lnf(x), head)

    def decay_flags(self):
        """name -> weight decay applies (matrices and embeddings: the 2-D tensors)."""
        return {n: p.dim() == 2 for n, p in self.named_parameters()}


def masked_loss(logits, targets, mask):
    """sum(mask * CE) / sum(mask)."""
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1).long(), reduction="none")
    m = mask.reshape(-1)
    return (ce * m).sum() / m.sum()


def clip_grads(params, clip_norm):
    """dsrsq::AdamW clipping: global L2 norm in double; scale = clip/(norm+1e-6) when norm > clip.
    Returns the pre-clip norm and whether it clipped."""
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    clipped = clip_norm > 0 and norm > clip_norm
    if clipped:
        scale = clip_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm, clipped


def make_optimizer(model, lr, betas, eps, weight_decay):
    flags = model.decay_flags()
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if flags[n]], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not flags[n]], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# ---- golden fixture -----------------------------------------------------------

GOLDEN_CFG = dict(vocab=61, d_model=48, n_heads=4, n_layers=2, d_ff=96, max_pos=128, tied_embedding=True,
                  rope_theta=10000.0, ln_eps=1e-5)
B, T = 2, 23
STEPS = 10
ADAMW = dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def init_golden(model, gen):
    """Deterministic, deliberately non-default init: matrices N(0, 1/sqrt(fan_in)) so attention
    is far from uniform, wte N(0, 0.1), LayerNorm weights 1 + N(0, 0.1), all biases N(0, 0.05)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name == "wte" or name == "lm_head":
                p.copy_(0.1 * r)
            elif p.dim() == 2:
                p.copy_(r / math.sqrt(p.shape[1]))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.05 * r)


def golden_batch(gen, cfg):
    tokens = torch.randint(0, cfg["vocab"], (B, T), generator=gen, dtype=torch.int32)
    targets = torch.randint(0, cfg["vocab"], (B, T), generator=gen, dtype=torch.int32)
    pos = torch.empty(B, T, dtype=torch.int32)
    pos[0] = torch.arange(T, dtype=torch.int32)  # contiguous
    # Row 1: a sorted subset of a longer context (gaps), like tokens retrieved from a long document.
    pos[1] = torch.sort(torch.randperm(cfg["max_pos"] - 8, generator=gen)[:T])[0].to(torch.int32) + 5
    mask = torch.ones(B, T, dtype=torch.float32)
    mask[0, :7] = 0.0  # answer-only loss: zero on a prompt prefix
    mask[1, :12] = 0.0
    return tokens, pos, targets, mask


def write_fixture(path, seed):
    import h5py
    import numpy as np

    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    cfg = GOLDEN_CFG
    model = GPT(cfg)
    init_golden(model, gen)
    tokens, pos, targets, mask = golden_batch(gen, cfg)
    names = [n for n, _ in model.named_parameters()]
    init_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    logits = model(tokens, pos)
    loss = masked_loss(logits, targets, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    # Ten AdamW steps on the same batch, starting again from the initial weights.
    model.zero_grad(set_to_none=True)
    opt = make_optimizer(model, ADAMW["lr"], (ADAMW["beta1"], ADAMW["beta2"]), ADAMW["eps"], ADAMW["weight_decay"])
    params = list(model.parameters())
    losses, norms, clipped = [], [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        step_loss = masked_loss(model(tokens, pos), targets, mask)
        step_loss.backward()
        n, c = clip_grads(params, ADAMW["clip_norm"])
        opt.step()
        losses.append(float(step_loss))
        norms.append(n)
        clipped.append(int(c))
    if not any(clipped):
        sys.exit("golden fixture: gradient clipping never triggered; adjust the config")
    moved = max(float((p.detach() - init_params[n]).norm() / init_params[n].norm()) for n, p in model.named_parameters())

    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        f.attrs["torch_version"] = str(torch.__version__)
        f.attrs["seed"] = np.int64(seed)
        cg = f.create_group("config")
        for k, v in cfg.items():
            if isinstance(v, bool):
                cg.attrs[k] = np.int64(int(v))
            elif isinstance(v, int):
                cg.attrs[k] = np.int64(v)
            else:
                cg.attrs[k] = np.float64(v)
        cg.attrs["batch"] = np.int64(B)
        cg.attrs["seq"] = np.int64(T)
        f.create_dataset("param_names", data=np.array(names, dtype=h5py.string_dtype()))
        for n in names:
            f.create_dataset("params/" + n, data=init_params[n].numpy())
            f.create_dataset("grad/" + n, data=grads[n].numpy())
            f.create_dataset("final/" + n, data=dict(model.named_parameters())[n].detach().numpy())
        f.create_dataset("tokens", data=tokens.numpy())
        f.create_dataset("pos", data=pos.numpy())
        f.create_dataset("targets", data=targets.numpy())
        f.create_dataset("mask", data=mask.numpy())
        f.create_dataset("logits", data=logits.detach().reshape(B * T, -1).numpy())
        f.create_dataset("loss", data=np.array([float(loss)], dtype=np.float64))
        ag = f.create_group("adamw")
        for k, v in ADAMW.items():
            ag.attrs[k] = np.float64(v)
        ag.attrs["steps"] = np.int64(STEPS)
        ag.create_dataset("losses", data=np.array(losses, dtype=np.float64))
        ag.create_dataset("grad_norms", data=np.array(norms, dtype=np.float64))
        ag.create_dataset("clipped", data=np.array(clipped, dtype=np.int32))
    os.replace(tmp, path)
    print(f"wrote {path}: torch {torch.__version__}, {len(names)} parameters, loss {float(loss):.6f}, "
          f"step losses {losses[0]:.4f} -> {losses[-1]:.4f}, grad norms {min(norms):.3f}..{max(norms):.3f}, "
          f"clipped {sum(clipped)}/{STEPS} steps, largest relative parameter change {moved:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="fixture path (HDF5)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(1)
    write_fixture(args.out, args.seed)


if __name__ == "__main__":
    main()
