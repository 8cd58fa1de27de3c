#!/usr/bin/python3
"""PyTorch peer of bench_attention: causal attention materialised the way
PyTorch 1.13 does it on the CPU (no fused scaled_dot_product_attention before
2.0): S = Q K^T * scale, masked_fill of the upper triangle, softmax, P V; the
backward through autograd. Reads q, k, v, dout (float32, layout (T, NH, HS))
from --dir, writes o, lse (NH, T), dq, dk, dv there for the caller's check and
prints one JSON line: {"peer": "pytorch", "torch_version": ..., "fwd_s": [...],
"bwd_s": [...]}.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer: materialised causal attention forward/backward")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--t", type=int, required=True)
    ap.add_argument("--nh", type=int, required=True)
    ap.add_argument("--hs", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU seconds / threads, as bench_attention --clock cpu")
    a = ap.parse_args()
    if a.clock == "cpu":
        def now():
            return time.process_time() / a.threads
    else:
        now = time.perf_counter
    torch.set_num_threads(a.threads)
    shape = (a.t, a.nh, a.hs)

    def load(name):
        x = np.fromfile(os.path.join(a.dir, name), dtype=np.float32)
        if x.size != a.t * a.nh * a.hs:
            sys.exit(f"torch_attention.py: {name} has {x.size} floats, want {a.t * a.nh * a.hs}")
        return torch.from_numpy(x.reshape(shape)).permute(1, 0, 2).contiguous()  # (NH, T, HS)

    q0, k0, v0, dout = load("q.f32"), load("k.f32"), load("v.f32"), load("dout.f32")
    scale = 1.0 / math.sqrt(a.hs)
    mask = torch.triu(torch.ones(a.t, a.t, dtype=torch.bool), diagonal=1)
    fwd_s, bwd_s = [], []
    for it in range(a.warmup + a.repeats):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        t0 = now()
        s = torch.matmul(q, k.transpose(1, 2)) * scale
        s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p, v)
        t1 = now()
        o.backward(dout)
        t2 = now()
        if it >= a.warmup:
            fwd_s.append(t1 - t0)
            bwd_s.append(t2 - t1)
    with torch.no_grad():
        lse = torch.logsumexp(s, dim=-1)  # (NH, T)

    def save(name, x):
        x.detach().permute(1, 0, 2).contiguous().numpy().astype(np.float32).tofile(os.path.join(a.dir, name))

    save("o.f32", o)
    lse.detach().contiguous().numpy().astype(np.float32).tofile(os.path.join(a.dir, "lse.f32"))
    save("dq.f32", q.grad)
    save("dk.f32", k.grad)
    save("dv.f32", v.grad)
    print(json.dumps({"peer": "pytorch", "torch_version": torch.__version__, "threads": a.threads,
                      "fwd_s": fwd_s, "bwd_s": bwd_s}))


if __name__ == "__main__":
    main()
