#!/usr/bin/python3
"""PyTorch peer of the training-step benchmark: the same model as the C++ engine
(tests/reference/torch_model.py, the class the golden test checks against), timed
over full training steps: forward, masked loss (all-ones mask), backward, gradient
clipping at norm 1.0 and an AdamW step, with zero_grad. Prints exactly one JSON line:

  {"peer": "pytorch", "torch_version": ..., "threads": n, "times_s": [...],
   "median_s": ..., "tokens_per_step": B*T, ...config}

Run with Debian's interpreter: /usr/bin/python3 bench/torch_train_step.py --threads 2
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))

import torch  # noqa: E402

from torch_model import GPT, make_optimizer, masked_loss  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer: time full training steps of the dsrsq model")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--d_ff", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("need --repeats >= 1, --warmup >= 0, --threads >= 1")

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(args.seed)
    cfg = dict(vocab=args.vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, d_ff=args.d_ff,
               max_pos=max(args.seq, 1), tied_embedding=True, rope_theta=10000.0, ln_eps=1e-5)
    model = GPT(cfg)
    # The engine's init: N(0, 0.02) matrices (residual projections / sqrt(2 L)),
    # zero biases, unit LayerNorm weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                resid = name.endswith("attn.wo") or name.endswith("mlp.wproj")
                p.normal_(0.0, 0.02 / (2 * args.n_layers) ** 0.5 if resid else 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    opt = make_optimizer(model, args.lr, (0.9, 0.999), 1e-8, 0.1)
    params = list(model.parameters())

    B, T = args.batch, args.seq
    tokens = torch.randint(0, args.vocab, (B, T), dtype=torch.int32)
    targets = torch.randint(0, args.vocab, (B, T), dtype=torch.int32)
    pos = torch.arange(T, dtype=torch.int32).expand(B, T).contiguous()
    mask = torch.ones(B, T)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = masked_loss(model(tokens, pos), targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)

    print(json.dumps({
        "peer": "pytorch",
        "torch_version": str(torch.__version__),
        "threads": args.threads,
        "times_s": times,
        "median_s": statistics.median(times),
        "tokens_per_step": B * T,
        "config": {k: getattr(args, k) for k in ("vocab", "d_model", "n_heads", "n_layers", "d_ff", "batch", "seq",
                                                 "repeats", "warmup", "lr")},
        "attention": "masked softmax (torch 1.13 has no scaled_dot_product_attention)",
        "final_loss": losses[-1],
    }))


if __name__ == "__main__":
    main()
