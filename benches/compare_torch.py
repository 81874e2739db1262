#!/usr/bin/env python3
"""nnlin against PyTorch's torch.func.jacrev on the same machine, in one run.

    cargo build --release
    python3 benches/compare_torch.py [--threads 2] [--lenet-n 1000] [--resnet-n 8] [--onet-n 16] [--resnet50]
                                     [--repeat R]
(needs torch, numpy, onnx; torch runs on the CPU)
nnlin runs in float64 and in float32 (--precision f32: reverse accumulation in float32).

1. LeNet-5 (fixtures/cnn/lenet5.onnx, its weights loaded into the PyTorch
   module of fixtures/generate_cnn.py) on the first N MNIST test digits:
   PyTorch `jacrev` one instance at a time and `vmap(jacrev)` over the batch;
   nnlin `explain` (all 10 rows, W is 10 x 784) over the same batch. The same
   for the perceptron LeNet-300-100 (fixtures/cnn/lenet300.onnx), where nnlin
   stacks instances into one reverse pass (`--batch auto`; the table says the
   width the planner chose).
2. A CIFAR-shaped ResNet-18 (3x32x32, 10 classes, BasicBlocks [2,2,2,2],
   batch-norm, random weights, seed 0) exported here to ONNX (unfused),
   on N random inputs: PyTorch `jacrev` per instance and nnlin `explain`.
3. MTCNN's ONet with its real weights (facenet-pytorch==2.6.0, fixtures/mtcnn/onet.onnx), the
   10 landmark outputs (W 10x6912), on N random 48x48 inputs.
4. With --resnet50: torchvision's ResNet-50 (random weights, batch-norm statistics measured
   on random batches) at 224x224, the top-1 row: PyTorch's forward pass and one vjp against
   nnlin's linearize time and its whole process.
Both sides use the same thread count; with --repeat R every time on both sides is the best of R
runs, taken in rounds: each round measures every side of a workload once, in turn (PyTorch,
nnlin f64, nnlin f32), so that a change in the machine's speed during the run (this machine's
run-to-run noise is about +-30 %) touches every side of a ratio alike. PyTorch computes in float32 (its
default and fastest); nnlin in float64 (the exactness mode) and float32. Times are per instance; nnlin's is `timing.linearize_seconds`
(compile + accumulate, no loading or writing). Prints a markdown table and
writes bench_torch.json.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
from generate_cnn import LeNet5, LeNet300  # noqa: E402

NNLIN = os.path.join(ROOT, "target", "release", "nnlin")


def mnist(n):
    raw = gzip.open(os.path.join(ROOT, "fixtures/data/mnist/t10k-images-idx3-ubyte.gz")).read()
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n].astype(np.float64) / 255.0


REPEAT = 1  # --repeat: every time is the best of this many rounds


def rounds(*measures):
    """Each measure (a function taking no argument, returning a tuple whose first entry is
    seconds) called REPEAT times, in rounds: one call of every measure per round, in turn.
    Returns, per measure, the tuple of its fastest call."""
    best = [None] * len(measures)
    for _ in range(REPEAT):
        for i, m in enumerate(measures):
            v = m()
            if best[i] is None or v[0] < best[i][0]:
                best[i] = v
    return best


def explain(model, xp, threads, tmp, precision, extra):
    """One `nnlin explain` process over the inputs saved at `xp`: its wall seconds and its
    summary.json."""
    out = os.path.join(tmp, "out")
    t = time.perf_counter()
    subprocess.run([NNLIN, "explain", model, "--input", xp, "--threads", str(threads), "--out", out,
                    "--precision", precision, *extra], check=True, capture_output=True)
    whole = time.perf_counter() - t
    return whole, json.load(open(os.path.join(out, "summary.json")))


def nnlin_run(model, xp, n, threads, tmp, precision, extra=()):
    """A measure: one `nnlin explain` over the `n` inputs saved at `xp`; (seconds per instance
    of `timing.linearize_seconds`, the largest residual, the widest batch used)."""
    def run():
        _, s = explain(model, xp, threads, tmp, precision, extra)
        return (s["timing"]["linearize_seconds"] / n, max(i["residual"] for i in s["instances"]),
                max(i.get("batch", 1) for i in s["instances"]))
    return run


def whole_process(model, xp, threads, tmp, precision, extra=()):
    """A measure: one whole `nnlin explain` process over the inputs saved at `xp`; (its
    seconds, its linearize_seconds)."""
    def run():
        whole, s = explain(model, xp, threads, tmp, precision, extra)
        return (whole, s["timing"]["linearize_seconds"])
    return run


def torch_top1_vjp(model, x):
    """A measure: PyTorch's forward pass and one vjp (the top-1 row of W); (seconds,)."""
    xt = torch.tensor(x, dtype=torch.float32)
    model(xt[:1])  # warm up

    def run():
        t = time.perf_counter()
        v = xt[:1].clone().requires_grad_(True)
        y = model(v)[0]
        y[y.argmax()].backward()
        return (time.perf_counter() - t,)
    return run


def torch_jacrev(model, x, batched, head=None):
    """A measure: PyTorch's `jacrev` one instance at a time or, with `batched`,
    `vmap(jacrev)` over the batch; (seconds per instance,)."""
    xt = torch.tensor(x, dtype=torch.float32)
    f = (lambda v: model(v[None])[0]) if head is None else (lambda v: model(v[None])[head][0])
    jac = torch.func.jacrev(f)
    if batched:
        vj = torch.func.vmap(jac)
        vj(xt[:2])  # warm up

        def run():
            t = time.perf_counter()
            vj(xt)
            return ((time.perf_counter() - t) / len(xt),)
        return run
    jac(xt[0])  # warm up

    def run():
        t = time.perf_counter()
        for i in range(len(xt)):
            jac(xt[i])
        return ((time.perf_counter() - t) / len(xt),)
    return run


def workload(model, x, threads, tmp, torch_model, batched, head=None, extra=()):
    """PyTorch's jacrev (and vmap(jacrev) where `batched`), nnlin f64 and nnlin f32 on one
    workload, in rounds: (jacrev s, vmap s or None, nnlin f64 s, nnlin f32 s, f64 residual,
    f32 batch width)."""
    measures = [torch_jacrev(torch_model, x, False, head)]
    if batched:
        measures.append(torch_jacrev(torch_model, x, True, head))
    xp = os.path.join(tmp, "x.npy")
    np.save(xp, x)
    measures += [nnlin_run(model, xp, len(x), threads, tmp, prec, extra) for prec in ("f64", "f32")]
    got = rounds(*measures)
    single, rest = got[0][0], got[1:]
    vmapped = rest.pop(0)[0] if batched else None
    (t64, res, _), (t32, _, width) = rest
    return single, vmapped, t64, t32, res, width


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.s = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.s(x))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lenet-n", type=int, default=1000)
    ap.add_argument("--resnet-n", type=int, default=8)
    ap.add_argument("--onet-n", type=int, default=16)
    ap.add_argument("--resnet50", action="store_true", help="also ResNet-50 at 224x224, top-1 row")
    ap.add_argument("--repeat", type=int, default=1, help="every time (both sides) the best of R runs")
    a = ap.parse_args()
    global REPEAT
    REPEAT = max(1, a.repeat)
    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp()
    rows = []
    # LeNet-5 with the fixture's weights
    path = os.path.join(ROOT, "fixtures/cnn/lenet5.onnx")
    lenet = LeNet5()
    inits = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in onnx.load(path).graph.initializer}
    lenet.load_state_dict({k: inits[k] for k in lenet.state_dict()})
    lenet.eval()
    x = mnist(a.lenet_n)
    t_single, t_batch, t_nnlin, t32, res, width = workload(path, x, a.threads, tmp, lenet, True)
    rows.append(("LeNet-5 (MNIST, W 10x784)", len(x), t_single, t_batch, t_nnlin, t32, res, width))
    # LeNet-300-100 with the fixture's weights: a perceptron, batched by nnlin
    path = os.path.join(ROOT, "fixtures/cnn/lenet300.onnx")
    mlp = LeNet300()
    inits = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in onnx.load(path).graph.initializer}
    mlp.load_state_dict({k: inits[k] for k in mlp.state_dict()})
    mlp.eval()
    t_single, t_batch, t_nnlin, t32, res, width = workload(path, x, a.threads, tmp, mlp, True)
    rows.append(("LeNet-300-100 (MNIST, W 10x784)", len(x), t_single, t_batch, t_nnlin, t32, res, width))
    # CIFAR ResNet-18, random weights
    torch.manual_seed(0)
    net = ResNet18().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    rpath = os.path.join(tmp, "resnet18.onnx")
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), rpath, dynamo=False, do_constant_folding=False,
                      opset_version=17, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    xr = np.random.default_rng(0).random((a.resnet_n, 3, 32, 32))
    t_single, _, t_nnlin, t32, res, width = workload(rpath, xr, a.threads, tmp, net, False)
    rows.append(("ResNet-18 (CIFAR-shaped, W 10x3072)", len(xr), t_single, None, t_nnlin, t32, res, width))
    # MTCNN ONet, real weights (facenet-pytorch==2.6.0), the 10 landmark outputs
    try:
        from facenet_pytorch.models.mtcnn import ONet
        onet = ONet(pretrained=True).eval()
        opath = os.path.join(ROOT, "fixtures/mtcnn/onet.onnx")
        xo = np.random.default_rng(1).random((a.onet_n, 3, 48, 48)) * 2 - 1
        extra = ("--output", "landmarks")
        # (vmap fails on ONet)
        t_single, t_batch, t_nnlin, t32, res, width = workload(opath, xo, a.threads, tmp, onet, False, 1, extra)
        rows.append(("MTCNN ONet landmarks (W 10x6912)", len(xo), t_single, t_batch, t_nnlin, t32, res, width))
    except ImportError:
        print("facenet-pytorch not installed: ONet skipped")
    print(f"threads: {a.threads}; torch {torch.__version__} (float32); nnlin float64 and float32; "
          f"best of {REPEAT}\n")
    print("| model | instances | torch jacrev | torch vmap(jacrev) | nnlin f64 | nnlin f32 | f32 vs jacrev | f32 vs vmap | f64 / f32 | max residual (f64) | nnlin batch (f32) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for name, n, s, b, t, t32, r, width in rows:
        bs = f"{b * 1e3:.3f} ms" if b else "—"
        vb = f"{b / t32:.2f}x" if b else "—"
        print(f"| {name} | {n} | {s * 1e3:.3f} ms | {bs} | {t * 1e3:.3f} ms | {t32 * 1e3:.3f} ms | "
              f"{s / t32:.2f}x | {vb} | {t / t32:.2f} | {r:.1e} | {width} |")
        out.append({"model": name, "instances": n, "torch_jacrev_s": s, "torch_vmap_s": b, "nnlin_s": t,
                    "nnlin_f32_s": t32, "residual": r, "batch": width})
    if a.resnet50:
        import torchvision
        torch.manual_seed(0)
        r50 = torchvision.models.resnet50().eval()
        with torch.no_grad():  # batch-norm statistics measured on random batches
            r50.train()
            for _ in range(4):
                r50(torch.randn(8, 3, 224, 224))
            r50.eval()
        p50 = os.path.join(tmp, "resnet50.onnx")
        torch.onnx.export(r50, (torch.zeros(1, 3, 224, 224),), p50, dynamo=False,
                          do_constant_folding=False, opset_version=17)
        x50 = np.random.default_rng(2).standard_normal((1, 3, 224, 224))
        extra = ("--rows", "top1")
        xp = os.path.join(tmp, "x50.npy")
        np.save(xp, x50)
        (tv,), w64, w32 = rounds(torch_top1_vjp(r50, x50), whole_process(p50, xp, a.threads, tmp, "f64", extra),
                                 whole_process(p50, xp, a.threads, tmp, "f32", extra))
        print("\nResNet-50 at 224x224, top-1 row:\n")
        print("| precision | torch forward + vjp | nnlin linearize | whole nnlin process | linearize vs torch | whole / linearize |")
        print("|---|---|---|---|---|---|")
        for prec, (whole, lin) in [("f64", w64), ("f32", w32)]:
            print(f"| {prec} | {tv:.3f} s | {lin:.3f} s | {whole:.3f} s | {tv / lin:.2f}x | {whole / lin:.2f} |")
            out.append({"model": "resnet50", "precision": prec, "torch_vjp_s": tv, "nnlin_s": lin,
                        "whole_s": whole})
    json.dump({"threads": a.threads, "repeat": REPEAT, "rows": out}, open("bench_torch.json", "w"), indent=1)


if __name__ == "__main__":
    main()
