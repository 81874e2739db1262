"""Overhead of a Python call against a CLI process (issue 11's closing figure).

Needs the package (pip install ./crates/nnlin-py) and target/release/nnlin (cargo build
--release). Usage: python benches/python_overhead.py
"""
import pathlib
import subprocess
import time

import numpy as np

import nnlin

root = pathlib.Path(__file__).resolve().parents[1]
path = root / "fixtures/cnn/lenet5.onnx"
xs = np.load(root / "fixtures/cnn/lenet5.inputs.npy")
m = nnlin.Model(path)
m.explain(xs[:1])
n = 200
t = time.perf_counter()
for _ in range(n):
    m.explain(xs[:1], rows="top1")
py = (time.perf_counter() - t) / n
t = time.perf_counter()
for _ in range(n):
    nnlin.Model(path)
load = (time.perf_counter() - t) / n
k = 20
t = time.perf_counter()
for _ in range(k):
    subprocess.run([str(root / "target/release/nnlin"), "explain", str(path), "--input",
                    str(root / "fixtures/cnn/lenet5.inputs.npy[0]"), "--rows", "top1", "--out",
                    "/tmp/nnlin-overhead"], check=True, capture_output=True)
cli = (time.perf_counter() - t) / k
print(f"python explain (1 instance, top1): {py * 1e3:.3f} ms; Model() load: {load * 1e3:.3f} ms; "
      f"CLI process: {cli * 1e3:.1f} ms")
