"""Exports torchvision classifiers with random weights by both exporters and the float64
gradient of their top-1 output (docs/SCALE.md's torchvision table).

Pinned: torch==2.15.0 torchvision==0.29.2 onnx==1.23.2 onnxscript. Writes /tmp/zoo/:
<name>.{legacy,default}.onnx, <name>.x.npy, <name>.grad.npy (the top-1 row of the
Jacobian), <name>.out.npy. Then, per file:
  nnlin explain /tmp/zoo/NAME.EXPORT.onnx --input /tmp/zoo/NAME.x.npy --rows top1 --out OUT
and compare OUT/W.npy with NAME.grad.npy. Usage: python benches/torchvision_zoo.py [NAME ...]
"""
import os, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch, torchvision.models as tvm
torch.manual_seed(0)
OUT = "/tmp/zoo"
os.makedirs(OUT, exist_ok=True)
specs = {
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(), 64),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(), 64),
    "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(), 64),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(), 64),
    "convnext_tiny": (lambda: tvm.convnext_tiny(), 64),
    "vit_b_16": (lambda: tvm.vit_b_16(image_size=32), 32),
    "swin_t": (lambda: tvm.swin_t(), 64),
}
only = sys.argv[1:] or list(specs)
for name in only:
    make, size = specs[name]
    m = make().eval()
    x = torch.rand(1, 3, size, size)
    for tag, kw in [("legacy", dict(dynamo=False, do_constant_folding=False)), ("default", dict())]:
        path = f"{OUT}/{name}.{tag}.onnx"
        try:
            t0 = time.time()
            if tag == "legacy":
                torch.onnx.export(m, (x,), path, opset_version=17, **kw)
            else:
                torch.onnx.export(m, (x,), dynamo=True).save(path, external_data=True)
            print(name, tag, "exported", round(time.time() - t0, 1), flush=True)
        except Exception as e:
            print(name, tag, "EXPORT FAILED", str(e).splitlines()[0][:200], flush=True)
    m64 = make().eval()
    m64.load_state_dict(m.state_dict())
    m64 = m64.double()
    xd = x.double().requires_grad_(True)
    y = m64(xd)[0]
    top = int(torch.argmax(y))
    t0 = time.time()
    y[top].backward()
    np.save(f"{OUT}/{name}.x.npy", x.double().numpy())
    np.save(f"{OUT}/{name}.grad.npy", xd.grad.reshape(1, -1).numpy())
    np.save(f"{OUT}/{name}.out.npy", y.detach().numpy())
    print(name, "top", top, "torch f64 fwd+vjp", round(time.time() - t0, 3), flush=True)
