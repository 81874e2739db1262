"""torchvision classifiers with random weights, exported by both exporters, linearized by
nnlin and compared with the float64 gradient of their top-1 output (docs/SCALE.md's
torchvision tables).

Pinned: torch==2.15.0 torchvision==0.29.2 onnx==1.23.2 onnxscript. Batch-norm statistics
are measured on random batches (as fixtures/generate_zoo.py does) so activations stay O(1).
For each model and exporter it writes /tmp/zoo/<size>/<name>.{legacy,default}.onnx (the
default exporter's weights as external data), <name>.x.npy and <name>.grad.npy, runs
  target/release/nnlin explain MODEL --input X --rows top1 --out OUT
under /usr/bin/time, and prints one markdown row: the top-1 row's max abs error relative to
max |grad| (for the default export, the gradient of a copy with batch-norm folded into the
convolutions in float32 and the attention scale rounded as that exporter writes them; see
fixtures/generate_zoo.py), W·x + b − F(x) as nnlin reports it, the linearize time nnlin reports, the whole
process's wall time and peak RSS.

Usage: python benches/torchvision_zoo.py [--size S] [NAME ...]   (build nnlin first:
cargo build --release)
"""
import copy, os, re, subprocess, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch, torchvision.models as tvm

args = sys.argv[1:]
size = 64
if args[:1] == ["--size"]:
    size, args = int(args[1]), args[2:]
torch.manual_seed(0)
OUT = f"/tmp/zoo/{size}"
os.makedirs(OUT, exist_ok=True)
BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "nnlin")
specs = {
    "mobilenet_v3_small": lambda s: tvm.mobilenet_v3_small(),
    "efficientnet_b0": lambda s: tvm.efficientnet_b0(),
    "regnet_y_400mf": lambda s: tvm.regnet_y_400mf(),
    "shufflenet_v2_x0_5": lambda s: tvm.shufflenet_v2_x0_5(),
    "convnext_tiny": lambda s: tvm.convnext_tiny(),
    "vit_b_16": lambda s: tvm.vit_b_16(image_size=s),
    "swin_t": lambda s: tvm.swin_t(),
}


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from generate_zoo import (  # noqa: E402
    Float32AttentionScale, batchnorm_layers, calibrate, exact, fold_bn, random_heads)


print("| model | export | top-1 row: max abs err / max \\|grad\\| | max \\|W·x + b − F(x)\\| "
      "| linearize (s) | whole run (s) | peak RSS (MiB) |")
print("|---|---|---|---|---|---|---|")
for name in args or list(specs):
    m = specs[name](size).eval()
    random_heads(m)
    if batchnorm_layers(m):
        calibrate(m, size, batch=4)
    x = torch.rand(1, 3, size, size)
    m64 = specs[name](size).eval()
    m64.load_state_dict(m.state_dict())
    m_folded = copy.deepcopy(m64)
    m64 = exact(m64).double()
    xd = x.double().requires_grad_(True)
    y = m64(xd)[0]
    top = int(torch.argmax(y))
    y[top].backward()
    grads = {"legacy": xd.grad.reshape(-1).numpy()}
    # the default exporter folds batch-norm in float32 and rounds the attention scale:
    # its reference does the same
    xd = x.double().requires_grad_(True)
    with Float32AttentionScale():
        exact(fold_bn(m_folded)).double()(xd)[0][top].backward()
    grads["default"] = xd.grad.reshape(-1).numpy()
    np.save(f"{OUT}/{name}.x.npy", x.double().numpy())
    np.save(f"{OUT}/{name}.grad.npy", grads["legacy"].reshape(1, -1))
    for tag in ["legacy", "default"]:
        path = f"{OUT}/{name}.{tag}.onnx"
        try:
            if tag == "legacy":
                torch.onnx.export(m, (x,), path, opset_version=17, dynamo=False,
                                  do_constant_folding=False)
            else:
                torch.onnx.export(m, (x,), dynamo=True).save(path, external_data=True)
        except Exception as e:  # report, keep going
            print(f"| {name} | {tag} | export failed: {str(e).splitlines()[0][:120]} | | | | |")
            continue
        out = f"{OUT}/{name}.{tag}.out"
        t0 = time.time()
        p = subprocess.run(["/usr/bin/time", "-f", "RSS %M", BIN, "explain", path, "--input",
                            f"{OUT}/{name}.x.npy", "--rows", "top1", "--out", out],
                           capture_output=True, text=True)
        wall = time.time() - t0
        rss = int(re.search(r"RSS (\d+)", p.stderr).group(1)) / 1024
        if p.returncode != 0:
            line = [l for l in p.stderr.splitlines() if l.startswith("nnlin")][0]
            print(f"| {name} | {tag} | {line[:200]} | | | {wall:.1f} | {rss:.0f} |", flush=True)
            continue
        fit = re.search(r"= ([0-9.e+-]+), ([0-9.]+) s", p.stdout + p.stderr)
        w = np.load(f"{out}/W.npy").reshape(-1)
        grad = grads[tag]
        err = np.abs(w - grad).max() / np.abs(grad).max()
        print(f"| {name} | {tag} | {err:.1e} | {float(fit.group(1)):.1e} | {float(fit.group(2)):.2f} "
              f"| {wall:.1f} | {rss:.0f} |", flush=True)
