//! # nnlin: one prediction of a neural network as an exact linear map
//!
//! A ReLU-family network is piecewise linear: at one input `x` it has one
//! activation pattern, so its prediction is exactly `F(x) = W·x + b`. nnlin
//! reads a trained network (ONNX), runs it once at `x`, compiles every layer
//! into an explicit operator (dense matrices, diagonals, …) and multiplies
//! them into `W` and the back-propagated bias `b`.
//!
//! For smooth activations (GELU, ELU, SiLU, tanh, …) there are two exact
//! [`Mode`]s: `Tangent` (slope σ'(z), `W` is the Jacobian) and `Secant` (the
//! source paper's rescale λ = σ(z)/z). In both, `W·x + b = F(x)`.
//!
//! ```
//! use nnlin::{Model, Options};
//!
//! let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/gelu.onnx"))?;
//! let model = Model::from_onnx_bytes("gelu", &bytes)?;
//! let x = [5.1, 3.5, 1.4, 0.2];
//! let lin = model.linearize(&x, &Options::default())?;
//! assert_eq!(lin.w.dim(), (3, 4)); // 3 logits × 4 input features
//! // W·x + b reproduces the logits
//! let wx_b = lin.w.dot(&ndarray::arr1(&x)) + &lin.b;
//! for (i, &row) in lin.rows.iter().enumerate() {
//!     assert!((wx_b[i] - lin.output[row]).abs() < 1e-9);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Crates behind the facade: `nnlin-ir` (network IR and reference
//! interpreter), `nnlin-linalg` (operators), `nnlin-compile` (instance
//! compiler and accumulation), `nnlin-onnx` (import). See
//! `docs/ARCHITECTURE.md`.

pub mod region;

use std::path::Path;

use faer::Mat;
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

pub use nnlin_compile::{
    Block, CompileError, Compiler, ConvKernel, Direction, Instance, Mode, accumulate,
    accumulate_split, adjoints, estimated_flops,
};
pub use nnlin_compile::{matfree, plan};
pub use nnlin_ir as ir;
pub use nnlin_linalg as linalg;
pub use nnlin_onnx::{ExternalRef, ImportOptions, Imported, OnnxError};

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading a model file.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Importing a model.
    #[error("{model}: {source}")]
    Onnx {
        /// Model name.
        model: String,
        /// The cause.
        source: OnnxError,
    },
    /// Compiling a model or an instance.
    #[error("{model}: {source}")]
    Compile {
        /// Model name.
        model: String,
        /// The cause.
        source: CompileError,
    },
    /// Ensemble members that do not fit together, or bad weights.
    #[error("ensemble: {0}")]
    Ensemble(String),
    /// A bad input or option.
    #[error("{0}")]
    Input(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Accumulation strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The candidate (reverse, forward, chain DP) with the least predicted
    /// time under the measured kernel throughputs.
    #[default]
    Auto,
    /// From the output side.
    Reverse,
    /// From the input side.
    Forward,
    /// Matrix-chain dynamic program over the explicit factors on chain
    /// networks; on DAGs, the cheapest of reverse, forward and a split at
    /// one cut value (forward up to it, reverse down to it).
    Dp,
    /// The paper-literal baseline: every operator a dense matrix.
    Dense,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::Reverse => "reverse",
            Strategy::Forward => "forward",
            Strategy::Dp => "dp",
            Strategy::Dense => "dense",
        })
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    /// `auto`, `reverse`, `forward`, `dp` or `dense`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Strategy::Auto),
            "reverse" => Ok(Strategy::Reverse),
            "forward" => Ok(Strategy::Forward),
            "dp" => Ok(Strategy::Dp),
            "dense" => Ok(Strategy::Dense),
            other => Err(format!("strategy: auto, reverse, forward, dp or dense, got {other:?}")),
        }
    }
}

/// Reads the bytes an external-data reference names, from a file inside
/// `dir` (the model's folder): absolute locations, `..` components and
/// symbolic links leading out of `dir` are refused, and the offset and
/// length are checked against the file's size before anything is read or
/// allocated.
pub fn read_external(dir: &Path, r: &ExternalRef) -> std::result::Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::path::Component;
    let loc = &r.location;
    let rel = Path::new(loc);
    if rel.as_os_str().is_empty()
        || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "external data location `{loc}` must be a relative path inside the model's folder"
        ));
    }
    let root = dir.canonicalize().map_err(|e| format!("cannot read the model's folder: {e}"))?;
    let file = root
        .join(rel)
        .canonicalize()
        .map_err(|e| format!("cannot open external data `{loc}`: {e}"))?;
    if !file.starts_with(&root) {
        return Err(format!("external data `{loc}` leads out of the model's folder"));
    }
    let mut f = std::fs::File::open(&file)
        .map_err(|e| format!("cannot open external data `{loc}`: {e}"))?;
    let size = f.metadata().map_err(|e| format!("external data `{loc}`: {e}"))?.len();
    let end = match r.length {
        Some(len) => r.offset.checked_add(len),
        None => Some(size),
    };
    let end = end.filter(|&e| e <= size && r.offset <= e).ok_or_else(|| {
        format!(
            "external data `{loc}`: bytes {}..{} lie past the end of the file ({size} bytes)",
            r.offset,
            r.length.map_or("end".into(), |l| r.offset.saturating_add(l).to_string())
        )
    })?;
    let len = usize::try_from(end - r.offset)
        .map_err(|_| format!("external data `{loc}` is too large"))?;
    f.seek(SeekFrom::Start(r.offset)).map_err(|e| format!("external data `{loc}`: {e}"))?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf).map_err(|e| format!("external data `{loc}`: {e}"))?;
    if buf.len() != len {
        return Err(format!("external data `{loc}`: the file shrank while being read"));
    }
    Ok(buf)
}

/// Which output rows of `W` and `b` to form.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Rows {
    /// Every output.
    #[default]
    All,
    /// The `k` largest outputs of `F(x)` (descending; ties by index).
    Top(usize),
    /// These output indices, in this order.
    Indices(Vec<usize>),
}

impl std::str::FromStr for Rows {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(Rows::All);
        }
        if let Some(k) = s.strip_prefix("top") {
            let k: usize = k.parse().map_err(|_| format!("bad --rows `{s}`: expected topK"))?;
            if k == 0 {
                return Err("--rows top0 selects nothing".into());
            }
            return Ok(Rows::Top(k));
        }
        let idx = s
            .split(',')
            .map(|t| t.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("bad --rows `{s}`: expected all, top1, topK or i,j,..."))?;
        Ok(Rows::Indices(idx))
    }
}

/// Options of a linearization: everything the library uses is here; it
/// reads no file, environment variable or `/proc` entry, and measures
/// nothing behind the caller's back. Parallelism is the caller's rayon pool
/// (`pool.install(|| model.linearize(…))`).
///
/// ```
/// use nnlin::{Mode, Options, Rows, Strategy};
/// let opts = Options::new()
///     .with_mode(Mode::Secant)
///     .with_rows(Rows::Top(1))
///     .with_strategy(Strategy::Reverse)
///     .with_max_memory(1 << 30);
/// assert_eq!(opts.mode, Mode::Secant);
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Options {
    /// Tangent (default) or secant.
    pub mode: Mode,
    /// Accumulation order.
    pub strategy: Strategy,
    /// Output rows to form.
    pub rows: Rows,
    /// The most bytes one instance's plan may hold at its peak (predicted by
    /// [`plan::peak_bytes`], or the dense baseline's factors); `None`: no
    /// cap. Instances that run in parallel share it: each gets
    /// `max_memory / threads`.
    pub max_memory: Option<usize>,
    /// Kernel throughputs the `Auto` and `Dp` strategies plan with; `None`:
    /// [`plan::Rates::TYPICAL`]. The CLI passes what `nnlin calibrate`
    /// measured.
    pub rates: Option<plan::Rates>,
}

impl Options {
    /// The defaults: tangent mode, all rows, the auto strategy, no memory
    /// cap, typical kernel rates.
    pub fn new() -> Self {
        Self::default()
    }
    /// With `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// With `strategy`.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }
    /// With `rows`.
    pub fn with_rows(mut self, rows: Rows) -> Self {
        self.rows = rows;
        self
    }
    /// With a memory cap of `bytes` per batch.
    pub fn with_max_memory(mut self, bytes: usize) -> Self {
        self.max_memory = Some(bytes);
        self
    }
    /// With the planner's kernel rates.
    pub fn with_rates(mut self, rates: plan::Rates) -> Self {
        self.rates = Some(rates);
        self
    }
    fn kernel_rates(&self) -> plan::Rates {
        self.rates.unwrap_or(plan::Rates::TYPICAL)
    }
}

/// What the importer reports about a model besides its network.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The default-domain opset.
    pub opset: i64,
    /// `producer_name producer_version`.
    pub producer: String,
    /// The graph input's name.
    pub input_name: String,
    /// The graph output's name.
    pub output_name: String,
    /// The op type of a trailing `Softmax`/`LogSoftmax` that was skipped.
    pub skipped_softmax: Option<String>,
}

/// A loaded model: the network and its input-independent operators.
#[derive(Clone, Debug)]
pub struct Model {
    name: String,
    info: ModelInfo,
    compiler: Compiler,
    /// The auto strategy's choice per number of rows: the candidates' costs
    /// depend on the network's structure and on m, so it is planned once.
    auto_choice: std::sync::Arc<std::sync::Mutex<Vec<(PlanKey, plan::Choice)>>>,
}

impl Model {
    /// Imports an ONNX model from bytes; `name` appears in errors.
    pub fn from_onnx_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        Self::from_onnx_bytes_with(name, bytes, &ImportOptions::default())
    }

    /// [`Model::from_onnx_bytes`] with import options (the memory budget
    /// every buffer sized by the file is checked against).
    pub fn from_onnx_bytes_with(name: &str, bytes: &[u8], options: &ImportOptions) -> Result<Self> {
        Self::from_onnx_bytes_with_resolver(name, bytes, options, &|r: &ExternalRef| {
            Err(format!(
                "its data lie in the external file `{}`: load the model with Model::from_onnx_file (or pass a resolver)",
                r.location
            ))
        })
    }

    /// [`Model::from_onnx_bytes_with`] for a model whose tensors may be
    /// stored as external data: `resolve` returns the bytes each reference
    /// names.
    pub fn from_onnx_bytes_with_resolver(
        name: &str,
        bytes: &[u8],
        options: &ImportOptions,
        resolve: &dyn Fn(&ExternalRef) -> std::result::Result<Vec<u8>, String>,
    ) -> Result<Self> {
        let Imported { network, opset, producer, input_name, output_name, skipped_softmax } =
            nnlin_onnx::import_with_resolver(bytes, options, resolve)
                .map_err(|source| Error::Onnx { model: name.to_string(), source })?;
        let info = ModelInfo { opset, producer, input_name, output_name, skipped_softmax };
        let compiler = Compiler::from_shared(std::sync::Arc::new(network), ConvKernel::Auto);
        Ok(Self { name: name.to_string(), info, compiler, auto_choice: Default::default() })
    }

    /// A model from a network built in code (no ONNX file).
    pub fn from_network(name: &str, network: ir::Network) -> Self {
        let info = ModelInfo {
            opset: 0,
            producer: "nnlin API".into(),
            input_name: "input".into(),
            output_name: "output".into(),
            skipped_softmax: None,
        };
        let compiler = Compiler::from_shared(std::sync::Arc::new(network), ConvKernel::Auto);
        Self { name: name.to_string(), info, compiler, auto_choice: Default::default() }
    }

    /// Reads and imports an ONNX file.
    pub fn from_onnx_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_onnx_file_with(path, &ImportOptions::default())
    }

    /// [`Model::from_onnx_file`] with import options. Tensors stored as
    /// external data are read from files inside the model's own folder only
    /// (see [`read_external`]).
    pub fn from_onnx_file_with(path: impl AsRef<Path>, options: &ImportOptions) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let resolve = |r: &ExternalRef| read_external(&dir, r);
        Self::from_onnx_bytes_with_resolver(&path.display().to_string(), &bytes, options, &resolve)
    }

    /// The same model with convolutions represented as `kernel` (explicit
    /// CSR Toeplitz matrices, structured operators, or chosen by size).
    pub fn with_conv_kernel(mut self, kernel: ConvKernel) -> Self {
        self.compiler =
            Compiler::from_shared(std::sync::Arc::clone(self.compiler.shared_network()), kernel);
        self
    }

    /// The model's name (its path when read from a file).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The network IR.
    pub fn network(&self) -> &ir::Network {
        self.compiler.network()
    }
    /// Import details (opset, producer, skipped softmax).
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// Input shape (batch dimension 1).
    pub fn input_shape(&self) -> &[usize] {
        self.network().input_shape()
    }
    /// Flattened input length `n`.
    pub fn input_len(&self) -> usize {
        self.network().input_len()
    }
    /// Number of outputs.
    pub fn output_len(&self) -> usize {
        self.network().output_len()
    }
    /// `F(x)` by the reference interpreter (independent of the compiled path).
    pub fn forward_reference(&self, x: &[f64]) -> Vec<f64> {
        ir::reference::forward(self.network(), x)
    }
    /// Compiles every layer at `x` (for inspection).
    pub fn compile_instance(&self, x: &[f64], mode: Mode) -> Result<Instance> {
        self.compiler
            .instance(x, mode)
            .map_err(|source| Error::Compile { model: self.name.clone(), source })
    }
    /// The auto strategy's plan for `m` rows, computed once per model and
    /// row count (the candidates' costs depend on the structure, not on x).
    fn planned(&self, inst: &Instance, m: usize, rates: &plan::Rates) -> plan::Choice {
        let key = (m, [rates.gemm.to_bits(), rates.sparse.to_bits(), rates.bandwidth.to_bits()]);
        let cached =
            self.auto_choice.lock().ok().and_then(|c| c.iter().find(|e| e.0 == key).map(|e| e.1));
        cached.unwrap_or_else(|| {
            let (_, _, best) = plan::candidates(inst, m, rates);
            if let Ok(mut c) = self.auto_choice.lock() {
                c.push((key, best));
            }
            best
        })
    }

    /// Runs one plan; also says which accumulation direction it used when it
    /// is one of the two fixed orders.
    fn run_plan(
        &self,
        inst: &Instance,
        rows: &[usize],
        choice: plan::Choice,
        rates: &plan::Rates,
        par: faer::Par,
    ) -> Result<(WAndB, Option<Direction>), CompileError> {
        Ok(match choice {
            plan::Choice::Reverse => {
                (accumulate(inst, rows, Direction::Reverse, par)?, Some(Direction::Reverse))
            }
            plan::Choice::Forward => {
                (accumulate(inst, rows, Direction::Forward, par)?, Some(Direction::Forward))
            }
            plan::Choice::Split(v) => (nnlin_compile::accumulate_split(inst, rows, v, par)?, None),
            plan::Choice::Dp => match plan::chain_accumulate(inst, rows, rates, par)? {
                Some(wb) => (wb, None),
                // a DAG: the planner's cheapest of reverse, forward and a cut
                // split (it proposes dp only for chains)
                None => match self.planned(inst, rows.len(), rates) {
                    plan::Choice::Dp => (accumulate(inst, rows, Direction::Reverse, par)?, None),
                    other => (self.run_plan(inst, rows, other, rates, par)?.0, None),
                },
            },
        })
    }

    /// Linearizes this model alone at `x`.
    pub fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        Ensemble::single(self.clone()).linearize(x, opts)
    }

    /// W at `x` (the rows `opts.rows` selects, in `opts.mode`) as a
    /// matrix-free operator: `W·v` and `Wᵀ·u` through the compiled
    /// operators, one network pass each, without forming W. It implements
    /// faer's `LinOp`/`BiLinOp`; [`matfree::top_singular`] gives W's top
    /// singular directions.
    ///
    /// ```
    /// # let model = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx")).unwrap();
    /// let x = [5.9, 3.0, 5.1, 1.8];
    /// let op = model.operator(&x, &nnlin::Options::default()).unwrap();
    /// let wx = op.matvec(&x); // W·x without forming W
    /// assert_eq!(wx.len(), op.nrows());
    /// ```
    pub fn operator(&self, x: &[f64], opts: &Options) -> Result<matfree::LinearMap> {
        let inst = self.compile_instance(x, opts.mode)?;
        let rows = select_rows(&opts.rows, &inst.output)?;
        matfree::LinearMap::new(inst, rows)
            .map_err(|source| Error::Compile { model: self.name.clone(), source })
    }
}

/// The source paper's decomposition figures over a labelled set (its
/// Tables 1–4): the accuracy of F's argmax, of W·x's alone and of b's alone
/// against the labels, and the label-flip rates of W·x and b against F's
/// prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Decomposition {
    /// Instances.
    pub n: usize,
    /// Accuracy of argmax F(x).
    pub accuracy: f64,
    /// Accuracy of argmax W·x.
    pub wx_accuracy: f64,
    /// How often argmax W·x differs from argmax F(x).
    pub wx_lfr: f64,
    /// Accuracy of argmax b.
    pub b_accuracy: f64,
    /// How often argmax b differs from argmax F(x).
    pub b_lfr: f64,
}

/// The index of the largest value, the first one at ties (0 if empty).
pub fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i)
}

impl Model {
    /// [`Decomposition`] of the rows of `xs` against `labels`, in parallel on
    /// the current rayon pool; `progress` is called once per instance. W is
    /// never formed: W·x and b come from two passes through the frozen
    /// operators.
    ///
    /// # Errors
    /// If there are no instances, fewer labels than instances, or an
    /// instance fails to compile.
    pub fn decompose(
        &self,
        xs: ArrayView2<f64>,
        labels: &[usize],
        mode: Mode,
        progress: &(dyn Fn() + Sync),
    ) -> Result<Decomposition> {
        let count = xs.nrows();
        if count == 0 {
            return Err(Error::Input("no instances".into()));
        }
        if labels.len() < count {
            return Err(Error::Input(format!("{} labels for {count} instances", labels.len())));
        }
        if xs.ncols() != self.input_len() {
            return Err(Error::Input(format!(
                "instances of {} values for a model input of {}",
                xs.ncols(),
                self.input_len()
            )));
        }
        let preds: Vec<Result<(usize, usize, usize)>> = (0..count)
            .into_par_iter()
            .map(|k| {
                let x = xs.row(k).to_vec();
                let inst = self.compile_instance(&x, mode)?;
                let (wx, b) = inst.wx_and_b(&x);
                progress();
                Ok((argmax(&inst.output), argmax(&wx), argmax(&b)))
            })
            .collect();
        let mut t = [0usize; 5];
        for (k, p) in preds.into_iter().enumerate() {
            let (f, wx, b) = p?;
            let y = labels[k];
            t[0] += usize::from(f == y);
            t[1] += usize::from(wx == y);
            t[2] += usize::from(wx != f);
            t[3] += usize::from(b == y);
            t[4] += usize::from(b != f);
        }
        let r = |c: usize| c as f64 / count as f64;
        Ok(Decomposition {
            n: count,
            accuracy: r(t[0]),
            wx_accuracy: r(t[1]),
            wx_lfr: r(t[2]),
            b_accuracy: r(t[3]),
            b_lfr: r(t[4]),
        })
    }
}

/// The auto plan's cache key: row count and the rates' bits.
type PlanKey = (usize, [u64; 3]);

/// `W` and `b` of one instance, as the compiler forms them.
type WAndB = (Block, Vec<f64>);

/// Per-layer activation pattern of one instance.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPattern {
    /// Ensemble member index.
    pub model: usize,
    /// Layer (node) name.
    pub layer: String,
    /// Active units: on the positive piece (z > 0) for functions with one
    /// kink at 0 (ReLU, LeakyReLU, PReLU, Abs), else with a nonzero slope.
    pub active: usize,
    /// All units.
    pub total: usize,
    /// Per-unit mask (as `active`).
    pub mask: Vec<bool>,
}

/// `W` and `b` of one instance.
#[derive(Clone, Debug)]
pub struct Linearization {
    /// `m × n`: the selected rows of `W`.
    pub w: Array2<f64>,
    /// Length `m`.
    pub b: Array1<f64>,
    /// The selected output indices.
    pub rows: Vec<usize>,
    /// `F(x)` (all outputs) as propagated through the compiled operators.
    pub output: Vec<f64>,
    /// The direction used (per member, they all agree).
    pub direction: Direction,
    /// Activation pattern of every activation layer of every member.
    pub pattern: Vec<LayerPattern>,
}

impl Linearization {
    /// W and b rounded to float32 values (what `--precision f32` writes).
    pub fn round_to_f32(&mut self) {
        self.w.mapv_inplace(|v| f64::from(v as f32));
        self.b.mapv_inplace(|v| f64::from(v as f32));
    }

    /// `W·x` for each selected row (summed in input order).
    pub fn wx(&self, x: &[f64]) -> Vec<f64> {
        self.w
            .rows()
            .into_iter()
            .map(|row| {
                let mut s = 0.0;
                for (w, xj) in row.iter().zip(x) {
                    s += w * xj;
                }
                s
            })
            .collect()
    }

    /// `max |W·x + b − F(x)|` over the selected rows, from `wx` (see
    /// [`Linearization::wx`]) and all outputs `f` of F at x.
    pub fn residual(&self, wx: &[f64], f: &[f64]) -> f64 {
        wx.iter()
            .zip(&self.b)
            .zip(&self.rows)
            .fold(0.0, |r, ((s, b), &row)| f64::max(r, (s + b - f[row]).abs()))
    }
}

/// A weighted sum of models `F = Σ aᵢ Fᵢ` with equal input and output shapes
/// (a single model is an ensemble of one with weight 1).
#[derive(Clone, Debug)]
pub struct Ensemble {
    members: Vec<(Model, f64)>,
}

impl Rows {
    /// How many rows this selects of a model with `outputs` outputs; an
    /// error where it names more outputs than there are.
    pub fn count(&self, outputs: usize) -> Result<usize> {
        match self {
            Rows::All => Ok(outputs),
            Rows::Top(k) if *k > outputs => {
                Err(Error::Input(format!("--rows top{k}: the model has only {outputs} outputs")))
            }
            Rows::Top(k) => Ok(*k),
            Rows::Indices(v) => match v.iter().find(|&&r| r >= outputs) {
                Some(r) => Err(Error::Input(format!(
                    "--rows: row {r} out of range, the model has {outputs} outputs"
                ))),
                None => Ok(v.len()),
            },
        }
    }
}

fn select_rows(rows: &Rows, output: &[f64]) -> Result<Vec<usize>> {
    rows.count(output.len())?;
    Ok(match rows {
        Rows::All => (0..output.len()).collect(),
        Rows::Top(k) => {
            let mut idx: Vec<usize> = (0..output.len()).collect();
            idx.sort_by(|&a, &b| output[b].total_cmp(&output[a]).then(a.cmp(&b)));
            idx.truncate(*k);
            idx
        }
        Rows::Indices(v) => v.clone(),
    })
}

impl Ensemble {
    /// One model, weight 1.
    pub fn single(model: Model) -> Self {
        Self { members: vec![(model, 1.0)] }
    }

    /// Models with weights; shapes must agree and weights be finite.
    pub fn new(members: Vec<(Model, f64)>) -> Result<Self> {
        let Some((first, _)) = members.first() else {
            return Err(Error::Ensemble("no models".into()));
        };
        for (m, a) in &members {
            if !a.is_finite() {
                return Err(Error::Ensemble(format!("weight {a} of `{}` is not finite", m.name)));
            }
            if m.input_len() != first.input_len() || m.output_len() != first.output_len() {
                return Err(Error::Ensemble(format!(
                    "`{}` maps {} inputs to {} outputs but `{}` maps {} to {}",
                    m.name,
                    m.input_len(),
                    m.output_len(),
                    first.name,
                    first.input_len(),
                    first.output_len()
                )));
            }
        }
        Ok(Self { members })
    }

    /// The members.
    pub fn members(&self) -> &[(Model, f64)] {
        &self.members
    }
    /// Input length.
    pub fn input_len(&self) -> usize {
        self.members[0].0.input_len()
    }
    /// Output length.
    pub fn output_len(&self) -> usize {
        self.members[0].0.output_len()
    }

    /// `Σ aᵢ Fᵢ(x)` by the reference interpreter.
    pub fn forward_reference(&self, x: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.output_len()];
        for (m, a) in &self.members {
            for (o, v) in out.iter_mut().zip(m.forward_reference(x)) {
                *o += a * v;
            }
        }
        out
    }

    /// `W` and `b` at one input `x` (flattened, length `n`).
    pub fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        let par = faer_par();
        let mut insts = Vec::with_capacity(self.members.len());
        let mut output = vec![0.0; self.output_len()];
        let mut pattern = vec![];
        for (k, (m, a)) in self.members.iter().enumerate() {
            let inst = m.compile_instance(x, opts.mode)?;
            for (o, v) in output.iter_mut().zip(&inst.output) {
                *o += a * v;
            }
            for l in &inst.layers {
                if let Some(mask) = &l.active {
                    pattern.push(LayerPattern {
                        model: k,
                        layer: l.name.clone(),
                        active: mask.iter().filter(|&&b| b).count(),
                        total: mask.len(),
                        mask: mask.clone(),
                    });
                }
            }
            insts.push(inst);
        }
        let rows = select_rows(&opts.rows, &output)?;
        let (m, n) = (rows.len(), self.input_len());
        let mut w = Mat::<f64>::zeros(m, n);
        let mut b = vec![0.0; m];
        let mut direction = Direction::Reverse;
        // instances running at once share the budget
        let budget = opts.max_memory.unwrap_or(usize::MAX) / rayon::current_num_threads().max(1);
        for (inst, (model, a)) in insts.iter().zip(&self.members) {
            let compile_err = |source| Error::Compile { model: model.name.clone(), source };
            let (wi, bi) = match opts.strategy {
                Strategy::Dense => plan::dense_accumulate(inst, &rows, budget, par)
                    .map_err(|e| Error::Input(format!("{}: {e}", model.name)))?,
                s => {
                    let choice = match s {
                        Strategy::Reverse => plan::Choice::Reverse,
                        Strategy::Forward => plan::Choice::Forward,
                        Strategy::Dp => plan::Choice::Dp,
                        _ => model.planned(inst, m, &opts.kernel_rates()),
                    };
                    let need = plan::peak_bytes(inst, m, choice);
                    if need > budget {
                        return Err(Error::Input(format!(
                            "{}: the {} plan for {m} row(s) needs about {need} bytes at its peak, above the memory budget of {budget} bytes per instance (--max-memory, shared by the threads); select fewer --rows or use fewer --threads",
                            model.name,
                            format!("{choice:?}").to_lowercase()
                        )));
                    }
                    let (wb, dir) = model
                        .run_plan(inst, &rows, choice, &opts.kernel_rates(), par)
                        .map_err(compile_err)?;
                    if let Some(d) = dir {
                        direction = d;
                    }
                    wb
                }
            };
            for j in 0..n {
                for i in 0..m {
                    w[(i, j)] += a * wi[(i, j)];
                }
            }
            for (bo, v) in b.iter_mut().zip(bi) {
                *bo += a * v;
            }
        }
        let w = Array2::from_shape_fn((m, n), |(i, j)| w[(i, j)]);
        Ok(Linearization { w, b: Array1::from(b), rows, output, direction, pattern })
    }

    /// Linearizes every row of `xs` (`N × n`), in parallel over instances on
    /// the current rayon pool. Results do not depend on the thread count.
    pub fn linearize_batch(
        &self,
        xs: ArrayView2<f64>,
        opts: &Options,
    ) -> Result<Vec<Linearization>> {
        batch(xs, self.input_len(), |x| self.linearize(x, opts))
    }
}

/// What can be linearized: a [`Model`], an [`Ensemble`] or a [`Pipeline`].
/// Generic code (and the CLI) takes `&impl Linearize`.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use nnlin::{Linearize, Model, Options};
///
/// fn count_rows(f: &impl Linearize, xs: ndarray::ArrayView2<f64>) -> usize {
///     let rows = AtomicUsize::new(0);
///     f.linearize_batch_with(xs, &Options::new(), &|_k, lin| {
///         // each instance's W arrives as soon as it is formed
///         rows.fetch_add(lin.rows.len(), Ordering::Relaxed);
///         Ok(())
///     })
///     .unwrap();
///     rows.into_inner()
/// }
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx");
/// let m = Model::from_onnx_file(path).unwrap();
/// let xs = ndarray::Array2::<f64>::from_elem((2, 4), 0.5);
/// assert_eq!(count_rows(&m, xs.view()), 2 * m.output_len());
/// ```
pub trait Linearize: Sync {
    /// Flattened input length `n`.
    fn input_len(&self) -> usize;
    /// Number of outputs.
    fn output_len(&self) -> usize;
    /// `F(x)` by the reference interpreter.
    fn forward_reference(&self, x: &[f64]) -> Vec<f64>;
    /// W, b and the pattern at `x`.
    fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization>;
    /// Every row of `xs`, in parallel on the current rayon pool, all held.
    fn linearize_batch(&self, xs: ArrayView2<f64>, opts: &Options) -> Result<Vec<Linearization>> {
        batch(xs, self.input_len(), |x| self.linearize(x, opts))
    }
    /// Every row of `xs`, handing each linearization to `f(index, lin)` as
    /// it is formed (in parallel, in no fixed order) instead of holding them
    /// all: memory stays at what the pool's threads hold at once. The
    /// first error (of nnlin or of `f`) stops the batch.
    fn linearize_batch_with(
        &self,
        xs: ArrayView2<f64>,
        opts: &Options,
        f: &(dyn Fn(usize, Linearization) -> Result<()> + Sync),
    ) -> Result<()> {
        if xs.ncols() != self.input_len() {
            return Err(Error::Input(format!(
                "instances have {} elements, the model expects {}",
                xs.ncols(),
                self.input_len()
            )));
        }
        (0..xs.nrows()).into_par_iter().try_for_each(|k| {
            let x = xs.row(k).to_vec();
            f(k, self.linearize(&x, opts)?)
        })
    }
}

impl Linearize for Model {
    fn input_len(&self) -> usize {
        Model::input_len(self)
    }
    fn output_len(&self) -> usize {
        Model::output_len(self)
    }
    fn forward_reference(&self, x: &[f64]) -> Vec<f64> {
        Model::forward_reference(self, x)
    }
    fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        Model::linearize(self, x, opts)
    }
}

impl Linearize for Ensemble {
    fn input_len(&self) -> usize {
        Ensemble::input_len(self)
    }
    fn output_len(&self) -> usize {
        Ensemble::output_len(self)
    }
    fn forward_reference(&self, x: &[f64]) -> Vec<f64> {
        Ensemble::forward_reference(self, x)
    }
    fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        Ensemble::linearize(self, x, opts)
    }
}

impl Linearize for Pipeline {
    fn input_len(&self) -> usize {
        Pipeline::input_len(self)
    }
    fn output_len(&self) -> usize {
        Pipeline::output_len(self)
    }
    fn forward_reference(&self, x: &[f64]) -> Vec<f64> {
        Pipeline::forward_reference(self, x)
    }
    fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        Pipeline::linearize(self, x, opts)
    }
}

/// Runs `f` on every row of `xs` in parallel on the current rayon pool.
fn batch(
    xs: ArrayView2<f64>,
    n: usize,
    f: impl Fn(&[f64]) -> Result<Linearization> + Sync,
) -> Result<Vec<Linearization>> {
    if xs.ncols() != n {
        return Err(Error::Input(format!(
            "instances have {} elements, the model expects {n}",
            xs.ncols()
        )));
    }
    let rows: Vec<Vec<f64>> = xs.rows().into_iter().map(|r| r.to_vec()).collect();
    if rows.len() == 1 {
        // one instance: parallelism inside its products
        return with_inner_par(rayon::current_num_threads(), || {
            rows.iter().map(|x| f(x)).collect()
        });
    }
    rows.par_iter().map(|x| f(x)).collect()
}

thread_local! {
    static INNER_PAR: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

fn faer_par() -> faer::Par {
    // A batch runs its instances in parallel with sequential products; a
    // single instance runs its large GEMMs on the pool instead. faer splits
    // a GEMM's output into tiles and keeps each element's reduction order,
    // so the result is the same bits either way (tested).
    match INNER_PAR.with(std::cell::Cell::get) {
        0 | 1 => faer::Par::Seq,
        t => faer::Par::rayon(t),
    }
}

/// Runs `f` with products inside one instance spread over `threads`.
fn with_inner_par<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    let old = INNER_PAR.with(|c| c.replace(threads));
    let out = f();
    INNER_PAR.with(|c| c.set(old));
    out
}

/// A pipeline `F = B_k ∘ … ∘ B_1 ∘ A`: an ensemble followed by models that
/// each take the previous output as input. Linearized stage by stage:
/// `W = W_B·W_A`, `b = W_B·b_A + b_B`, each stage at the previous stage's
/// output.
#[derive(Clone, Debug)]
pub struct Pipeline {
    first: Ensemble,
    then: Vec<Model>,
}

impl Pipeline {
    /// `first` followed by `then` in order; each stage's input size must be
    /// the previous stage's output size.
    pub fn new(first: Ensemble, then: Vec<Model>) -> Result<Self> {
        let mut out = first.output_len();
        for m in &then {
            if m.input_len() != out {
                return Err(Error::Ensemble(format!(
                    "`{}` takes {} inputs but the previous stage gives {out}",
                    m.name(),
                    m.input_len()
                )));
            }
            out = m.output_len();
        }
        Ok(Self { first, then })
    }
    /// The first stage.
    pub fn first(&self) -> &Ensemble {
        &self.first
    }
    /// The following stages.
    pub fn then(&self) -> &[Model] {
        &self.then
    }
    /// Input length.
    pub fn input_len(&self) -> usize {
        self.first.input_len()
    }
    /// Output length of the last stage.
    pub fn output_len(&self) -> usize {
        self.then.last().map_or(self.first.output_len(), Model::output_len)
    }
    /// `F(x)` by the reference interpreter, stage by stage.
    pub fn forward_reference(&self, x: &[f64]) -> Vec<f64> {
        let mut y = self.first.forward_reference(x);
        for m in &self.then {
            y = m.forward_reference(&y);
        }
        y
    }

    /// `W` and `b` of the pipeline at `x`.
    pub fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        if self.then.is_empty() {
            return self.first.linearize(x, opts);
        }
        let all = opts.clone().with_rows(Rows::All);
        let mut lin = self.first.linearize(x, &all)?;
        let last = self.then.len() - 1;
        for (k, m) in self.then.iter().enumerate() {
            let y = lin.output.clone();
            let stage_opts = if k == last { opts.clone() } else { all.clone() };
            let next = Ensemble::single(m.clone()).linearize(&y, &stage_opts)?;
            // W = W_B·W_A, b = W_B·b_A + b_B
            let w = next.w.dot(&lin.w);
            let b = next.w.dot(&lin.b) + &next.b;
            let mut pattern = lin.pattern;
            pattern.extend(
                next.pattern.into_iter().map(|p| LayerPattern { model: p.model + 1 + k, ..p }),
            );
            lin = Linearization {
                w,
                b,
                rows: next.rows,
                output: next.output,
                direction: next.direction,
                pattern,
            };
        }
        Ok(lin)
    }

    /// Every row of `xs`, in parallel over instances.
    pub fn linearize_batch(
        &self,
        xs: ArrayView2<f64>,
        opts: &Options,
    ) -> Result<Vec<Linearization>> {
        batch(xs, self.input_len(), |x| self.linearize(x, opts))
    }
}
