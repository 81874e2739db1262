//! `nnlin._nnlin`: the Python bindings (pyo3 + numpy). The Python package
//! `nnlin` (python/nnlin) re-exports these classes. Arrays go to numpy
//! without a copy (`PyArray::from_owned_array` takes the buffer), the GIL is
//! released while nnlin computes, and every nnlin error is a `ValueError`
//! carrying the CLI's one-line message.

use ndarray::{Array1, Array2, Array3, Axis};
use numpy::{PyArray1, PyArray2, PyArray3, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

fn err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// An ONNX model, read from a path or from bytes.
#[pyclass(module = "nnlin", name = "Model", frozen)]
struct Model {
    inner: nnlin::Model,
}

/// The linearization of a batch: numpy arrays W (N, m, n), b (N, m), output
/// (N, outputs), rows (N, m), residual (N,), predicted (N,).
#[pyclass(module = "nnlin", name = "Explanation", frozen, get_all)]
struct Explanation {
    #[pyo3(name = "W")]
    w: Py<PyAny>,
    b: Py<PyAny>,
    output: Py<PyAny>,
    rows: Py<PyAny>,
    residual: Py<PyAny>,
    predicted: Py<PyAny>,
}

#[pymethods]
impl Explanation {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let shape = self.w.bind(py).getattr("shape")?.repr()?.to_string();
        Ok(format!("Explanation(W.shape={shape})"))
    }
}

/// W at one instance as a matrix-free operator: `matvec(v)` = W·v,
/// `rmatvec(u)` = Wᵀ·u, each one pass through the compiled network; usable
/// as a `scipy.sparse.linalg.LinearOperator` (`aslinearoperator(op)`).
#[pyclass(module = "nnlin", name = "Operator", frozen)]
struct Operator {
    map: nnlin::matfree::LinearMap,
}

#[pymethods]
impl Operator {
    /// `(m, n)`.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.map.nrows(), self.map.ncols())
    }

    /// Always float64.
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("numpy")?.getattr("float64")
    }

    /// The output rows W's rows stand for.
    #[getter]
    fn rows(&self) -> Vec<usize> {
        self.map.rows().to_vec()
    }

    /// W·v.
    fn matvec<'py>(
        &self,
        py: Python<'py>,
        v: PyReadonlyArrayDyn<'py, f64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let v = flat(&v, self.map.ncols(), "v")?;
        let y = py.detach(|| self.map.matvec(&v));
        Ok(PyArray1::from_owned_array(py, Array1::from(y)))
    }

    /// Wᵀ·u.
    fn rmatvec<'py>(
        &self,
        py: Python<'py>,
        u: PyReadonlyArrayDyn<'py, f64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let u = flat(&u, self.map.nrows(), "u")?;
        let y = py.detach(|| self.map.rmatvec(&u));
        Ok(PyArray1::from_owned_array(py, Array1::from(y)))
    }

    /// The `k` largest singular values and right singular vectors
    /// (`(k,)`, `(k, n)`), matrix-free.
    fn svd<'py>(&self, py: Python<'py>, k: usize) -> PyResult<Singular<'py>> {
        let (s, v) = py.detach(|| nnlin::matfree::top_singular(&self.map, k, faer_seq()));
        let n = self.map.ncols();
        let vt = Array2::from_shape_fn((s.len(), n), |(j, i)| v[(i, j)]);
        Ok((PyArray1::from_owned_array(py, Array1::from(s)), PyArray2::from_owned_array(py, vt)))
    }

    fn __repr__(&self) -> String {
        format!("Operator(shape=({}, {}))", self.map.nrows(), self.map.ncols())
    }
}

/// Singular values `(k,)` and right singular vectors `(k, n)`.
type Singular<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray2<f64>>);

fn faer_seq() -> nnlin::matfree::Par {
    nnlin::matfree::Par::Seq
}

/// A vector of exactly `len` values.
fn flat(a: &PyReadonlyArrayDyn<'_, f64>, len: usize, what: &str) -> PyResult<Vec<f64>> {
    let v: Vec<f64> = a.as_array().iter().copied().collect();
    if v.len() != len {
        return Err(err(format!("{what} has {} values, the operator takes {len}", v.len())));
    }
    Ok(v)
}

/// The instances of `x` as rows: the model's input shape (with or without
/// its batch axis of 1) is one instance, `(N, …)` a batch, as the CLI reads.
fn instances(model: &nnlin::Model, x: &PyReadonlyArrayDyn<'_, f64>) -> PyResult<Array2<f64>> {
    let shape = model.input_shape();
    let n = model.input_len();
    let a = x.as_array();
    let dims = a.shape();
    let one = dims == shape || dims == &shape[1..];
    let batch =
        dims.len() == shape.len() && dims[1..] == shape[1..] || dims.len() == 2 && dims[1] == n;
    let rows = if one {
        1
    } else if batch {
        dims[0]
    } else {
        return Err(err(format!(
            "input of shape {dims:?}: the model takes {shape:?} (one instance) or (N, {})",
            shape[1..].iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
        )));
    };
    let data: Vec<f64> = a.iter().copied().collect();
    if data.iter().any(|v| !v.is_finite()) {
        return Err(err("the input holds NaN or Inf"));
    }
    Array2::from_shape_vec((rows, n), data).map_err(err)
}

fn parse_rows(rows: Option<&Bound<'_, PyAny>>) -> PyResult<nnlin::Rows> {
    let Some(r) = rows.filter(|r| !r.is_none()) else { return Ok(nnlin::Rows::All) };
    if let Ok(s) = r.extract::<String>() {
        return s.parse().map_err(err);
    }
    let v: Vec<usize> = r
        .extract()
        .map_err(|_| err("rows: None, \"all\", \"top1\", \"topK\" or a list of output indices"))?;
    Ok(nnlin::Rows::Indices(v))
}

/// `None` or `"auto"`: the planner's width; an integer of at least 1.
fn parse_batch(batch: Option<&Bound<'_, PyAny>>) -> PyResult<nnlin::Batch> {
    let Some(b) = batch else { return Ok(nnlin::Batch::Auto) };
    if let Ok(s) = b.extract::<String>() {
        return s.parse().map_err(err);
    }
    match b.extract::<i64>() {
        Ok(w) if w >= 1 => Ok(nnlin::Batch::Width(w as usize)),
        _ => Err(err("batch: None, \"auto\" or an integer of at least 1")),
    }
}

fn options(
    rows: Option<&Bound<'_, PyAny>>,
    mode: &str,
    strategy: &str,
) -> PyResult<nnlin::Options> {
    Ok(nnlin::Options::new()
        .with_mode(mode.parse().map_err(err)?)
        .with_strategy(strategy.parse().map_err(err)?)
        .with_rows(parse_rows(rows)?))
}

/// A pool of `threads` workers, or `None` for rayon's global pool (every
/// core; built once, so a call costs no thread start).
fn pool(threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    match threads {
        None => Ok(None),
        Some(0) => Err(err("threads must be at least 1")),
        Some(t) if t > 1024 => Err(err(format!("threads {t} is more than 1024"))),
        Some(t) => rayon::ThreadPoolBuilder::new().num_threads(t).build().map(Some).map_err(err),
    }
}

/// Runs `f` on `pool`, or on the global pool.
fn on<T: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

#[pymethods]
impl Model {
    /// `Model(path)` or `Model(onnx_bytes)`.
    #[new]
    fn new(source: &Bound<'_, PyAny>) -> PyResult<Self> {
        let inner = if let Ok(b) = source.cast::<PyBytes>() {
            nnlin::Model::from_onnx_bytes("<bytes>", b.as_bytes())
        } else {
            let path: std::path::PathBuf = source
                .extract()
                .map_err(|_| err("Model takes a path (str or os.PathLike) or ONNX bytes"))?;
            nnlin::Model::from_onnx_file(&path)
        };
        inner.map(|inner| Model { inner }).map_err(err)
    }

    /// The input shape (batch axis first, 1).
    #[getter]
    fn input_shape(&self) -> Vec<usize> {
        self.inner.input_shape().to_vec()
    }

    /// Number of outputs.
    #[getter]
    fn output_len(&self) -> usize {
        self.inner.output_len()
    }

    /// W, b and F at every instance of `x`; see the package docstring.
    #[pyo3(signature = (x, rows=None, mode="tangent", precision="f64", strategy="auto", threads=None, batch=None))]
    #[allow(clippy::too_many_arguments)]
    fn explain<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        rows: Option<&Bound<'py, PyAny>>,
        mode: &str,
        precision: &str,
        strategy: &str,
        threads: Option<usize>,
        batch: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Explanation> {
        let precision: nnlin::Precision = precision.parse().map_err(err)?;
        let opts = options(rows, mode, strategy)?
            .with_precision(precision)
            .with_batch(parse_batch(batch)?);
        let xs = instances(&self.inner, &x)?;
        let pool = pool(threads)?;
        let model = &self.inner;
        let result = py.detach(|| explain_batch(model, &xs, &opts, &pool));
        let (w, b, out, row_idx, residual, predicted) = result.map_err(err)?;
        let (w, b): (Py<PyAny>, Py<PyAny>) = match w {
            Formed::F64(w) => (
                PyArray3::from_owned_array(py, w).into_any().unbind(),
                PyArray2::from_owned_array(py, b).into_any().unbind(),
            ),
            Formed::F32(w) => (
                PyArray3::from_owned_array(py, w).into_any().unbind(),
                PyArray2::from_owned_array(py, b.mapv(|v| v as f32)).into_any().unbind(),
            ),
        };
        Ok(Explanation {
            w,
            b,
            output: PyArray2::from_owned_array(py, out).into_any().unbind(),
            rows: PyArray2::from_owned_array(py, row_idx).into_any().unbind(),
            residual: PyArray1::from_owned_array(py, residual).into_any().unbind(),
            predicted: PyArray1::from_owned_array(py, predicted).into_any().unbind(),
        })
    }

    /// The linear region around every instance of `x`, as `nnlin region
    /// --json` reports it: a list of dicts (radii, binding boundaries,
    /// pattern, sampled verification; a sweep for smooth networks).
    #[pyo3(signature = (x, norm="both", verify=0, input_box=None, threads=None))]
    fn region<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        norm: &str,
        verify: usize,
        input_box: Option<(f64, f64)>,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut opts = nnlin::region::ReportOptions::new()
            .with_norm(norm.parse().map_err(err)?)
            .with_verify(verify);
        if let Some((lo, hi)) = input_box {
            opts = opts.with_box(lo, hi);
        }
        let xs = instances(&self.inner, &x)?;
        let pool = pool(threads)?;
        let model = &self.inner;
        let reports = py
            .detach(|| {
                on(&pool, || {
                    use rayon::prelude::*;
                    (0..xs.nrows())
                        .into_par_iter()
                        .map(|k| model.region_report(&xs.row(k).to_vec(), k, &opts).map(|r| r.json))
                        .collect::<nnlin::Result<Vec<_>>>()
                })
            })
            .map_err(err)?;
        let text = serde_json::Value::Array(reports).to_string();
        py.import("json")?.call_method1("loads", (text,))
    }

    /// The decomposition table of the source paper over `X` with labels `y`.
    #[pyo3(signature = (x, y, mode="tangent", threads=None))]
    fn decompose<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        y: Vec<usize>,
        mode: &str,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mode: nnlin::Mode = mode.parse().map_err(err)?;
        let xs = instances(&self.inner, &x)?;
        let pool = pool(threads)?;
        let model = &self.inner;
        let t = py
            .detach(|| on(&pool, || model.decompose(xs.view(), &y, mode, &|| {})))
            .map_err(err)?;
        let d = PyDict::new(py);
        d.set_item("n", t.n)?;
        d.set_item("accuracy", t.accuracy)?;
        d.set_item("wx_accuracy", t.wx_accuracy)?;
        d.set_item("wx_lfr", t.wx_lfr)?;
        d.set_item("b_accuracy", t.b_accuracy)?;
        d.set_item("b_lfr", t.b_lfr)?;
        Ok(d)
    }

    /// W at one instance as a matrix-free operator (all rows unless `rows`).
    #[pyo3(signature = (x, rows=None, mode="tangent"))]
    fn operator(
        &self,
        py: Python<'_>,
        x: PyReadonlyArrayDyn<'_, f64>,
        rows: Option<&Bound<'_, PyAny>>,
        mode: &str,
    ) -> PyResult<Operator> {
        let opts = options(rows, mode, "auto")?;
        let xs = instances(&self.inner, &x)?;
        if xs.nrows() != 1 {
            return Err(err(format!("operator takes one instance, got {}", xs.nrows())));
        }
        let x = xs.row(0).to_vec();
        let model = &self.inner;
        let map = py.detach(|| model.operator(&x, &opts)).map_err(err)?;
        Ok(Operator { map })
    }

    fn __repr__(&self) -> String {
        format!("Model({:?}, input_shape={:?})", self.inner.name(), self.inner.input_shape())
    }
}

/// W of a batch, in the precision asked for.
enum Formed {
    F64(Array3<f64>),
    F32(Array3<f32>),
}

type Batch = (Formed, Array2<f64>, Array2<f64>, Array2<i64>, Array1<f64>, Array1<i64>);

/// Linearizes every row of `xs`, each W copied once, into its slot of the
/// batch array as it is formed (a single instance's W is handed over
/// without a copy in float64).
fn explain_batch(
    model: &nnlin::Model,
    xs: &Array2<f64>,
    opts: &nnlin::Options,
    pool: &Option<rayon::ThreadPool>,
) -> nnlin::Result<Batch> {
    use nnlin::Linearize;
    use std::sync::Mutex;
    let (count, n) = xs.dim();
    let m = opts.rows.count(model.output_len())?;
    let f32_out = opts.precision == nnlin::Precision::F32;
    let mut b = Array2::<f64>::zeros((count, m));
    let mut out = Array2::<f64>::zeros((count, model.output_len()));
    let mut row_idx = Array2::<i64>::zeros((count, m));
    let mut residual = Array1::<f64>::zeros(count);
    let mut predicted = Array1::<i64>::zeros(count);
    let mut w64 = Array3::<f64>::zeros((if f32_out || count == 1 { 0 } else { count }, m, n));
    let mut w32 = Array3::<f32>::zeros((if f32_out { count } else { 0 }, m, n));
    let mut single: Option<Array3<f64>> = None;
    {
        let slots64: Vec<_> = w64.outer_iter_mut().map(Mutex::new).collect();
        let slots32: Vec<_> = w32.outer_iter_mut().map(Mutex::new).collect();
        let rest: Vec<_> = b
            .outer_iter_mut()
            .zip(out.outer_iter_mut())
            .zip(row_idx.outer_iter_mut())
            .zip(residual.iter_mut().zip(predicted.iter_mut()))
            .map(Mutex::new)
            .collect();
        let single = Mutex::new(&mut single);
        on(pool, || {
            model.linearize_batch_with(xs.view(), opts, &|k, lin| {
                let x = xs.row(k);
                let x = x.as_slice().expect("contiguous");
                let f = model.forward_reference(x);
                {
                    let mut r = rest[k].lock().expect("one writer per slot");
                    let (((b, out), rows), (res, pred)) = &mut *r;
                    b.assign(&lin.b);
                    out.assign(&ndarray::ArrayView1::from(&f));
                    for (i, &row) in lin.rows.iter().enumerate() {
                        rows[i] = row as i64;
                    }
                    **res = lin.residual(&lin.wx(x), &f);
                    **pred = nnlin::argmax(&f) as i64;
                }
                if f32_out {
                    let mut slot = slots32[k].lock().expect("one writer per slot");
                    ndarray::Zip::from(&mut *slot).and(&lin.w).for_each(|a, &v| *a = v as f32);
                } else if count == 1 {
                    **single.lock().expect("one instance") = Some(lin.w.insert_axis(Axis(0)));
                } else {
                    slots64[k].lock().expect("one writer per slot").assign(&lin.w);
                }
                Ok(())
            })
        })?;
    }
    let w = match (f32_out, single) {
        (true, _) => Formed::F32(w32),
        (false, Some(w)) => Formed::F64(w),
        (false, None) => Formed::F64(w64),
    };
    Ok((w, b, out, row_idx, residual, predicted))
}

/// The extension module.
#[pymodule]
fn _nnlin(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Explanation>()?;
    m.add_class::<Operator>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
