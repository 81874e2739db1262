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
runs (this machine's run-to-run noise is about +-30 %). PyTorch computes in float32 (its
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


REPEAT = 1  # --repeat: every time is the best of this many runs


def nnlin_time(model, x, threads, tmp, precision="f64", extra=()):
    xp = os.path.join(tmp, "x.npy")
    np.save(xp, x)
    out = os.path.join(tmp, "out")
    best = float("inf")
    for _ in range(REPEAT):
        subprocess.run([NNLIN, "explain", model, "--input", xp, "--threads", str(threads), "--out", out,
                        "--precision", precision, *extra], check=True, capture_output=True)
        s = json.load(open(os.path.join(out, "summary.json")))
        best = min(best, s["timing"]["linearize_seconds"] / len(x))
    global LAST_BATCH
    LAST_BATCH = max(i.get("batch", 1) for i in s["instances"])
    return best, max(i["residual"] for i in s["instances"])


LAST_BATCH = 1  # the widest batch the last nnlin_time run used


def whole_process(model, x, threads, tmp, precision, extra=()):
    """Seconds of a whole `nnlin explain` process, and its linearize_seconds."""
    xp = os.path.join(tmp, "x.npy")
    np.save(xp, x)
    out = os.path.join(tmp, "out")
    whole, lin = float("inf"), float("inf")
    for _ in range(REPEAT):
        t = time.perf_counter()
        subprocess.run([NNLIN, "explain", model, "--input", xp, "--threads", str(threads), "--out", out,
                        "--precision", precision, *extra], check=True, capture_output=True)
        whole = min(whole, time.perf_counter() - t)
        lin = min(lin, json.load(open(os.path.join(out, "summary.json")))["timing"]["linearize_seconds"])
    return whole, lin


def torch_top1_vjp(model, x):
    """Seconds of PyTorch's forward pass and one vjp (the top-1 row of W)."""
    xt = torch.tensor(x, dtype=torch.float32)
    model(xt[:1])  # warm up
    best = float("inf")
    for _ in range(max(3, REPEAT)):
        t = time.perf_counter()
        v = xt[:1].clone().requires_grad_(True)
        y = model(v)[0]
        y[y.argmax()].backward()
        best = min(best, time.perf_counter() - t)
    return best


def torch_times(model, x, batch_too, head=None):
    xt = torch.tensor(x, dtype=torch.float32)
    f = (lambda v: model(v[None])[0]) if head is None else (lambda v: model(v[None])[head][0])
    jac = torch.func.jacrev(f)
    jac(xt[0])  # warm up
    single = float("inf")
    for _ in range(REPEAT):
        t = time.perf_counter()
        for i in range(len(xt)):
            jac(xt[i])
        single = min(single, (time.perf_counter() - t) / len(xt))
    batched = None
    if batch_too:
        vj = torch.func.vmap(jac)
        vj(xt[:2])
        batched = float("inf")
        for _ in range(REPEAT):
            t = time.perf_counter()
            vj(xt)
            batched = min(batched, (time.perf_counter() - t) / len(xt))
    return single, batched


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
    t_single, t_batch = torch_times(lenet, x, True)
    t_nnlin, res = nnlin_time(path, x, a.threads, tmp)
    t32, _ = nnlin_time(path, x, a.threads, tmp, "f32")
    rows.append(("LeNet-5 (MNIST, W 10x784)", len(x), t_single, t_batch, t_nnlin, t32, res, LAST_BATCH))
    # LeNet-300-100 with the fixture's weights: a perceptron, batched by nnlin
    path = os.path.join(ROOT, "fixtures/cnn/lenet300.onnx")
    mlp = LeNet300()
    inits = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in onnx.load(path).graph.initializer}
    mlp.load_state_dict({k: inits[k] for k in mlp.state_dict()})
    mlp.eval()
    t_single, t_batch = torch_times(mlp, x, True)
    t_nnlin, res = nnlin_time(path, x, a.threads, tmp)
    t32, _ = nnlin_time(path, x, a.threads, tmp, "f32")
    rows.append(("LeNet-300-100 (MNIST, W 10x784)", len(x), t_single, t_batch, t_nnlin, t32, res, LAST_BATCH))
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
    t_single, _ = torch_times(net, xr, False)
    t_nnlin, res = nnlin_time(rpath, xr, a.threads, tmp)
    t32, _ = nnlin_time(rpath, xr, a.threads, tmp, "f32")
    rows.append(("ResNet-18 (CIFAR-shaped, W 10x3072)", len(xr), t_single, None, t_nnlin, t32, res, LAST_BATCH))
    # MTCNN ONet, real weights (facenet-pytorch==2.6.0), the 10 landmark outputs
    try:
        from facenet_pytorch.models.mtcnn import ONet
        onet = ONet(pretrained=True).eval()
        opath = os.path.join(ROOT, "fixtures/mtcnn/onet.onnx")
        xo = np.random.default_rng(1).random((a.onet_n, 3, 48, 48)) * 2 - 1
        t_single, t_batch = torch_times(onet, xo, False, head=1)  # vmap fails on ONet
        extra = ("--output", "landmarks")
        t_nnlin, res = nnlin_time(opath, xo, a.threads, tmp, "f64", extra)
        t32, _ = nnlin_time(opath, xo, a.threads, tmp, "f32", extra)
        rows.append(("MTCNN ONet landmarks (W 10x6912)", len(xo), t_single, t_batch, t_nnlin, t32, res,
                     LAST_BATCH))
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
        tv = torch_top1_vjp(r50, x50)
        print("\nResNet-50 at 224x224, top-1 row:\n")
        print("| precision | torch forward + vjp | nnlin linearize | whole nnlin process | linearize vs torch | whole / linearize |")
        print("|---|---|---|---|---|---|")
        for prec in ["f64", "f32"]:
            whole, lin = whole_process(p50, x50, a.threads, tmp, prec, ("--rows", "top1"))
            print(f"| {prec} | {tv:.3f} s | {lin:.3f} s | {whole:.2f} s | {tv / lin:.2f}x | {whole / lin:.1f} |")
            out.append({"model": "resnet50", "precision": prec, "torch_vjp_s": tv, "nnlin_s": lin,
                        "whole_s": whole})
    json.dump({"threads": a.threads, "repeat": REPEAT, "rows": out}, open("bench_torch.json", "w"), indent=1)


if __name__ == "__main__":
    main()
