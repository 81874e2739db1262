"""The Python package against the command line and the fixtures' references.

Runs in a fresh virtualenv with numpy and pytest (.ci/run); the torch tests skip with a
message where torch is absent. The CLI comparison uses target/release/nnlin, which
`cargo test --workspace --release` builds before this suite runs.
"""
import os
import pathlib
import subprocess
import tempfile

import numpy as np
import pytest

import nnlin

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIX = ROOT / "fixtures"
CLI = ROOT / "target" / "release" / "nnlin"


def cnn(name):
    return FIX / "cnn" / f"{name}.onnx", np.load(FIX / "cnn" / f"{name}.inputs.npy")


def test_explain_matches_jacrev_and_reconstructs_f():
    path, xs = cnn("resnet_small")
    jac = np.load(FIX / "cnn" / "resnet_small.jac.npy")
    e = nnlin.Model(path).explain(xs)
    assert e.W.shape == jac.shape and e.W.dtype == np.float64
    assert np.abs(e.W - jac).max() <= 1e-9 * np.abs(jac).max()
    assert e.residual.max() <= 1e-12
    wx = np.einsum("kmn,kn->km", e.W, xs.reshape(len(xs), -1))
    assert np.allclose(wx + e.b, e.output[np.arange(len(xs))[:, None], e.rows], atol=1e-12)
    assert (e.predicted == e.output.argmax(1)).all()


@pytest.mark.skipif(not CLI.exists(), reason="target/release/nnlin not built")
@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_explain_equals_the_cli_bit_for_bit(precision):
    path, xs = cnn("lenet5")
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "out"
        subprocess.run([str(CLI), "explain", str(path), "--input", str(FIX / "cnn" / "lenet5.inputs.npy"),
                        "--out", str(out), "--rows", "top2", "--precision", precision], check=True,
                       capture_output=True)
        w, b = np.load(out / "W.npy"), np.load(out / "b.npy")
    e = nnlin.Model(str(path)).explain(xs, rows="top2", precision=precision)
    assert e.W.dtype == w.dtype and e.b.dtype == b.dtype
    assert np.array_equal(e.W, w) and np.array_equal(e.b, b)


def test_batched_instances_agree_with_one_at_a_time():
    path, xs = cnn("lenet300")
    m = nnlin.Model(path)
    for precision, tol in [("f64", 1e-12), ("f32", 1e-5)]:
        one = m.explain(xs, precision=precision, batch=1)
        for batch in [None, "auto", 3]:
            e = m.explain(xs, precision=precision, batch=batch)
            scale = np.abs(one.W).max()
            assert np.abs(e.W - one.W).max() <= tol * scale
            assert np.abs(e.b - one.b).max() <= tol * scale
            assert np.array_equal(e.rows, one.rows)
    with pytest.raises(ValueError, match="batch"):
        m.explain(xs, batch=0)
    with pytest.raises(ValueError, match="batch"):
        m.explain(xs, batch="wide")


def test_bytes_float32_one_instance_and_row_lists():
    path, xs = cnn("lenet5")
    m = nnlin.Model(path.read_bytes())
    one = m.explain(xs[0].astype(np.float32), rows=[3, 1])
    assert one.W.shape == (1, 2, 784) and list(one.rows[0]) == [3, 1]
    full = m.explain(xs[:1].astype(np.float32))
    assert np.array_equal(one.W[0], full.W[0][[3, 1]])


def test_operator_products_match_w():
    path, xs = cnn("resnet_small")
    m = nnlin.Model(path)
    x = xs[0]
    w = m.explain(x).W[0]
    op = m.operator(x)
    assert op.shape == w.shape
    rng = np.random.default_rng(0)
    v, u = rng.standard_normal(w.shape[1]), rng.standard_normal(w.shape[0])
    assert np.abs(op.matvec(v) - w @ v).max() <= 1e-12 * np.abs(w).max() * w.shape[1]
    assert np.abs(op.rmatvec(u) - w.T @ u).max() <= 1e-12 * np.abs(w).max() * w.shape[0]
    s, vt = op.svd(3)
    assert np.allclose(s, np.linalg.svd(w, compute_uv=False)[:3], rtol=1e-9)
    assert np.allclose(np.linalg.norm(vt @ w.T, axis=1), s, rtol=1e-9)


def test_operator_is_a_scipy_linear_operator():
    scipy = pytest.importorskip("scipy.sparse.linalg", reason="scipy not installed")
    path, xs = cnn("resnet_small")
    m = nnlin.Model(path)
    w = m.explain(xs[0]).W[0]
    lo = scipy.aslinearoperator(m.operator(xs[0]))
    v, u = np.ones(w.shape[1]), np.ones(w.shape[0])
    assert np.allclose(lo @ v, w @ v) and np.allclose(lo.rmatvec(u), w.T @ u)


def test_decompose_counts_agree_with_explain():
    path, xs = cnn("lenet5")
    m = nnlin.Model(path)
    y = np.load(FIX / "cnn" / "lenet5.logits.npy").argmax(1)
    d = m.decompose(xs, y)
    assert d["n"] == len(xs) and d["accuracy"] == 1.0
    assert set(d) == {"n", "accuracy", "wx_accuracy", "wx_lfr", "b_accuracy", "b_lfr"}


@pytest.mark.skipif(not CLI.exists(), reason="target/release/nnlin not built")
def test_region_equals_the_cli_report():
    path, xs = cnn("lenet5")
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "out"
        subprocess.run([str(CLI), "region", str(path), "--input", str(FIX / "cnn" / "lenet5.inputs.npy"),
                        "--out", str(out), "--verify", "20", "--limit", "2"], check=True,
                       capture_output=True)
        import json
        cli = json.loads((out / "region.json").read_text())["instances"]
    got = nnlin.Model(path).region(xs[:2], verify=20)
    assert len(got) == 2
    for a, b in zip(got, cli):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert got[0]["radius_l2_excluding_kinks"] > 0


def test_region_radii_and_sampling():
    m = nnlin.Model(FIX / "iris" / "relu.onnx")
    x = np.array([5.9, 3.0, 5.1, 1.8])
    r = m.region(x, verify=50)[0]
    assert 0 < r["radius_linf"] <= r["radius_l2"] and r["units_at_kink"] == 0
    assert r["verify"]["exact"] == r["verify"]["kept_pattern"] == 50
    assert r["verify"]["beyond_changes_pattern"]
    boxed = m.region(x, norm="l2", input_box=(0.0, 6.0))[0]
    assert "radius_linf" not in boxed and boxed["radius_l2"] <= r["radius_l2"]


def test_region_of_a_smooth_network_is_a_sweep():
    x = np.array([5.9, 3.0, 5.1, 1.8])
    r = nnlin.Model(FIX / "iris" / "gelu.onnx").region(x)[0]
    assert r["smooth"] and len(r["sweep"]) == 7
    # the tangent error shrinks quadratically with the step
    assert r["sweep"][0]["tangent_error"] < 1e-6 * r["sweep"][-1]["tangent_error"]


def test_bad_input_raises_value_error_with_one_line():
    path, xs = cnn("lenet5")
    m = nnlin.Model(path)
    for bad in [lambda: nnlin.Model(b"not an onnx file"),
                lambda: nnlin.Model(os.fspath(FIX / "missing.onnx")),
                lambda: m.explain(np.zeros(5)),
                lambda: m.explain(np.full(784, np.nan)),
                lambda: m.explain(xs, rows="top99"),
                lambda: m.explain(xs, mode="curvy"),
                lambda: m.region(xs[0], norm="l3"),
                lambda: m.region(xs[0], verify=10**6),
                lambda: m.region(xs[0], input_box=(1, 0))]:
        with pytest.raises(ValueError) as info:
            bad()
        assert "\n" not in str(info.value) and str(info.value)


def test_torch_module_matches_jacrev():
    torch = pytest.importorskip("torch", reason="torch not installed: nnlin.torch is skipped")
    import nnlin.torch as nt

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5)).eval()
    x = torch.randn(2, 1, 8, 8)
    e = nt.explain(net, x)
    net64 = net.double()
    for k in range(2):
        jac = torch.func.jacrev(lambda v: net64(v.reshape(1, 1, 8, 8)).reshape(-1))(
            x[k].double().reshape(-1)).detach().numpy()
        assert np.abs(e.W[k] - jac).max() <= 1e-9 * np.abs(jac).max()
