"""Reference identify loops in PyTorch, for the throughput comparison (bench/run.sh).

    identify_ref.py export DIR            write encoder.pt, decoder.pt, classifier.pt
    identify_ref.py flops DIR             FLOPs of one perturbation (decoder + classifier)
    identify_ref.py matmul THREADS        this CPU's float32 matmul peak, FLOP/s
    identify_ref.py authors DIR MNIST THREADS Q N
    identify_ref.py batched DIR MNIST THREADS Q N PROCS CHUNK [freeze|optimize]

The models have the architecture of Defuse's built-in MNIST CNN and VAE (width 32,
hidden 256, latent 10) with a fixed random initialisation: throughput does not depend on
the weights, and both sides load the very same TorchScript files. Results are one JSON
line on stdout.

`authors` is the shape of the authors' search (`full_search` in
amazon-science/creating-and-correcting-novel-ml-model-errors): one image at a time,
encode, Q Beta(50,50) draws added to mu, decode the Q codes, classify, move the
predictions to the host and keep the failures with the smallest ||s||. `batched` is the
best loop we could write in Python: TorchScript frozen (`torch.jit.freeze`) and, with
`optimize` (the default), also `torch.jit.optimize_for_inference`, inference mode, many
images per step, decoder + classifier in chunks of CHUNK rows, optionally PROCS
processes with THREADS/PROCS intra-op threads each.
"""
import json
import multiprocessing as mp
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

W, HIDDEN, LATENT, CLASSES = 32, 256, 10, 10


class Classifier(nn.Module):
    """Defuse's built-in CNN (models.rs `Cnn`), in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, W, 3, padding=1)
        self.conv2 = nn.Conv2d(W, 2 * W, 3, padding=1)
        self.fc1 = nn.Linear(2 * W * 7 * 7, 128)
        self.fc2 = nn.Linear(128, CLASSES)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(1, W, 4, stride=2, padding=1)
        self.e2 = nn.Conv2d(W, 2 * W, 4, stride=2, padding=1)
        self.e3 = nn.Linear(2 * W * 7 * 7, HIDDEN)
        self.mu = nn.Linear(HIDDEN, LATENT)
        self.logvar = nn.Linear(HIDDEN, LATENT)

    def forward(self, x):
        h = torch.relu(self.e3(torch.flatten(torch.relu(self.e2(torch.relu(self.e1(x)))), 1)))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.d1 = nn.Linear(LATENT, HIDDEN)
        self.d2 = nn.Linear(HIDDEN, 2 * W * 7 * 7)
        self.d3 = nn.ConvTranspose2d(2 * W, W, 4, stride=2, padding=1)
        self.d4 = nn.ConvTranspose2d(W, 1, 4, stride=2, padding=1)

    def forward(self, z):
        h = torch.relu(self.d2(torch.relu(self.d1(z)))).view(-1, 64, 7, 7)  # 2 * W channels
        return torch.sigmoid(self.d4(torch.relu(self.d3(h))))


def mnist_test(path):
    raw = (Path(path) / "t10k-images-idx3-ubyte").read_bytes()
    n, h, w = struct.unpack(">III", raw[4:16])
    x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)
    return torch.from_numpy(x.astype(np.float32) / 255.0)


def load(d):
    d = Path(d)
    return [torch.jit.load(str(d / f)).eval() for f in ("encoder.pt", "decoder.pt", "classifier.pt")]


def export(d):
    torch.manual_seed(0)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for m, f in ((Encoder(), "encoder.pt"), (Decoder(), "decoder.pt"), (Classifier(), "classifier.pt")):
        torch.jit.script(m.eval()).save(str(d / f))
    print(json.dumps({"exported": str(d)}))


def flops(d):
    from torch.utils.flop_counter import FlopCounterMode

    _, dec, clf = [m for m in (Encoder(), Decoder(), Classifier())]
    z = torch.zeros(1, LATENT)
    with FlopCounterMode(display=False) as fc:
        dec(z)
    fd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        clf(torch.zeros(1, 1, 28, 28))
    fcl = fc.get_total_flops()
    print(json.dumps({"decoder_flops": fd, "classifier_flops": fcl, "per_perturbation": fd + fcl}))


def matmul(threads):
    torch.set_num_threads(threads)
    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        reps = max(3, int(2e10 / (2 * n**3)))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    print(json.dumps({"threads": threads, "flops_per_s": best}))


def authors(d, data, threads, q, n):
    torch.set_num_threads(threads)
    enc, dec, clf = load(d)
    x = mnist_test(data)[:n]
    beta = torch.distributions.Beta(torch.tensor(50.0), torch.tensor(50.0))
    kept = 0
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            mu, _ = enc(x[i : i + 1])
            y = clf(x[i : i + 1]).argmax(1).item()
            s = beta.sample((q, LATENT))
            pred = clf(dec(mu + s)).argmax(1).cpu().numpy()
            norms = s.norm(dim=1).cpu().numpy()
            wrong = np.nonzero(pred != y)[0]
            kept += len(wrong[np.argsort(norms[wrong])][:5])
    dt = time.perf_counter() - t
    print(json.dumps({"loop": "authors", "images": n, "q": q, "seconds": dt, "per_s": n * q / dt, "kept": kept}))


def _batched_worker(args):
    d, data, threads, q, lo, hi, chunk, jit = args
    torch.set_num_threads(threads)
    enc, dec, clf = load(d)
    enc, dec, clf = (torch.jit.freeze(m.eval()) for m in (enc, dec, clf))
    if jit == "optimize":
        enc, dec, clf = (torch.jit.optimize_for_inference(m) for m in (enc, dec, clf))
    x = mnist_test(data)[lo:hi]
    g = torch.Generator().manual_seed(lo)
    kept = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(x), 32):
            xb = x[s : s + 32]
            mu, _ = enc(xb)
            y = clf(xb).argmax(1)
            eps = torch.randn(len(xb), q, LATENT, generator=g) * 0.25
            z = (mu.unsqueeze(1) + eps).reshape(-1, LATENT)
            pred = torch.cat([clf(dec(z[c : c + chunk])).argmax(1) for c in range(0, len(z), chunk)])
            wrong = pred.view(len(xb), q) != y.unsqueeze(1)
            norms = eps.norm(dim=2).masked_fill(~wrong, float("inf"))
            k = torch.topk(norms, 5, dim=1, largest=False).values
            kept += int(torch.isfinite(k).sum())
    return kept, time.perf_counter() - t


def batched(d, data, threads, q, n, procs, chunk, jit="optimize"):
    per = threads // procs if procs > 1 else threads
    bounds = [(n * i // procs, n * (i + 1) // procs) for i in range(procs)]
    jobs = [(d, data, max(per, 1), q, lo, hi, chunk, jit) for lo, hi in bounds]
    # time the search loops only (after loading and freezing), the slowest process's
    if procs == 1:
        out = [_batched_worker(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            out = pool.map(_batched_worker, jobs)
    kept, dt = sum(k for k, _ in out), max(t for _, t in out)
    print(json.dumps({"loop": "batched", "jit": jit, "procs": procs, "threads": threads, "chunk": chunk,
                      "images": n, "q": q, "seconds": dt, "per_s": n * q / dt, "kept": kept}))


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "export":
        export(rest[0])
    elif cmd == "flops":
        flops(rest[0])
    elif cmd == "matmul":
        matmul(int(rest[0]))
    elif cmd == "authors":
        authors(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
    elif cmd == "batched":
        batched(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]), int(rest[5]), int(rest[6]),
                *rest[7:8])
    else:
        sys.exit(f"unknown command {cmd}")
