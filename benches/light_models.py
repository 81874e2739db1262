#!/usr/bin/env python3
"""Scale check on the `onnx` wheel's light model zoo (ResNet-50, VGG-19,
DenseNet-121, SqueezeNet, AlexNet, Inception v1/v2, ZFNet, ShuffleNet at
224x224). Their weights are `ConstantOfShape` fills, which make the check
trivial, so each weight gets seeded random values first (He scale for
conv/dense, near-identity batch-norm). Then `nnlin explain --rows top1` runs
on one random input under /usr/bin/time; the table of time, peak memory and
the residual |W·x + b - F(x)| (relative to |F(x)|) goes to docs/SCALE.md.

Run from the repository root after `cargo build --release`:
    python3 benches/light_models.py            (needs: onnx, numpy)
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
NNLIN = os.path.join("target", "release", "nnlin")


def randomize(model, rng):
    g = model.graph
    consumers = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep, new_inits = [], []
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            keep.append(n)
            continue
        shape = tuple(int(v) for v in inits[n.input[0]])
        value = numpy_helper.to_array(n.attribute[0].t).item() if n.attribute else 0.0
        uses = consumers.get(n.output[0], [])
        op, idx = (uses[0][0].op_type, uses[0][1]) if uses else ("", -1)
        if op == "Conv" and idx == 1:
            fan_in = int(np.prod(shape[1:]))
            arr = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif op in ("Gemm", "MatMul") and idx == 1 and len(shape) == 2:
            arr = rng.standard_normal(shape) * np.sqrt(1.0 / min(shape))
        elif op == "BatchNormalization":
            arr = {1: 1 + 0.1 * rng.standard_normal(shape), 2: 0.1 * rng.standard_normal(shape),
                   3: 0.1 * rng.standard_normal(shape), 4: 1 + 0.1 * np.abs(rng.standard_normal(shape))}[idx]
        elif op in ("Conv", "Gemm", "Add", "Sum") or idx >= 1:
            arr = 0.05 * rng.standard_normal(shape) if op in ("Conv", "Gemm") else np.full(shape, value)
        else:
            arr = np.full(shape, value)
        new_inits.append(numpy_helper.from_array(arr.astype(np.float32), n.output[0]))
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return model


def main():
    rng = np.random.default_rng(0)
    rows = []
    tmp = tempfile.mkdtemp()
    for f in sorted(os.listdir(DATA)):
        if not f.endswith(".onnx"):
            continue
        name = f[:-5]
        model = randomize(onnx.load(os.path.join(DATA, f)), rng)
        path = os.path.join(tmp, f)
        onnx.save(model, path)
        inits = {t.name for t in model.graph.initializer}
        data = [i for i in model.graph.input if i.name not in inits][0]
        dims = [d.dim_value for d in data.type.tensor_type.shape.dim]
        x = rng.random([1] + dims[1:])
        xp = os.path.join(tmp, name + ".npy")
        np.save(xp, x)
        out = os.path.join(tmp, name + "-out")
        cmd = ["/usr/bin/time", "-f", "TIME %e %M", NNLIN, "explain", path, "--input", xp, "--rows", "top1",
               "--out", out]
        p = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"TIME ([\d.]+) (\d+)", p.stderr)
        if p.returncode != 0:
            last = p.stderr.strip().splitlines()[-2] if len(p.stderr.strip().splitlines()) > 1 else p.stderr
            rows.append((name, "fails", last))
            print(name, "FAILED", last, file=sys.stderr)
            continue
        s = json.load(open(os.path.join(out, "summary.json")))
        inst = s["instances"][0]
        scale = max(abs(v) for v in inst["output"])
        rel = inst["residual"] / scale
        rows.append((name, dims, s["n"], inst["rows"][0], s["timing"]["linearize_seconds"], float(m.group(1)),
                     int(m.group(2)) / 1024, rel))
        print(rows[-1], file=sys.stderr)
    lines = [
        "# Scale: the onnx model zoo's light models at 224×224",
        "",
        "Reproduce: `cargo build --release && python3 benches/light_models.py` (needs `onnx`, `numpy`).",
        "Each `light_*` model from the `onnx` wheel gets seeded random weights in place of its",
        "`ConstantOfShape` fills (He scale; near-identity batch-norm), then",
        "`nnlin explain MODEL --input X --rows top1` runs on one random 224×224 input. W is 1 × n.",
        "No n×n matrix is formed: reverse accumulation carries one row through structured",
        "convolutions (im2col + GEMM).",
        "",
        "| model | input | n | top-1 row | linearize (s) | whole run (s) | peak memory (MiB) | max \\|W·x + b − F(x)\\| / max \\|F(x)\\| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r[1] == "fails":
            lines.append(f"| {r[0]} | fails: {r[2]} | | | | | | |")
        else:
            lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.1e} |")
    lines += [
        "",
        "*linearize* is `timing.linearize_seconds` (compile at x and accumulate W, b); *whole run* adds",
        "import, the reference interpreter's independent forward pass (plain loops, the oracle used for",
        "the residual) and writing the outputs. Measured on the 2-core development machine, one thread",
        "per instance.",
    ]
    open(os.path.join("docs", "SCALE.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
