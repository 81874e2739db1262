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

use ndarray::{Array1, Array2, ArrayView2, ShapeBuilder};
use rayon::prelude::*;

pub use faer::Par;
pub use nnlin_compile::region::RegionError;
pub use nnlin_compile::{
    Block, CompileError, Compiler, ConvKernel, Direction, Instance, Mode, NodeId, ValueId,
    accumulate, accumulate_split, adjoints, estimated_flops,
};
pub use nnlin_compile::{batch, matfree, plan};
pub use nnlin_ir as ir;
pub use nnlin_linalg as linalg;
pub use nnlin_onnx::{ExternalRef, ImportOptions, Imported, OnnxError};
/// The plan that formed one model's W at one instance.
///
/// ```
/// use nnlin::{Executed, Model, Options, Strategy};
/// let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// let lin = m.linearize(&[5.9, 3.0, 5.1, 1.8], &Options::new().with_strategy(Strategy::Forward))?;
/// assert_eq!(lin.plans, vec![Executed::Forward]);
/// assert_eq!(Executed::Split(nnlin::ValueId(7)).to_string(), "split@7");
/// # Ok::<(), nnlin::Error>(())
/// ```
pub use plan::Executed;
/// How W and b are formed (see [`Strategy`]); [`plan::Plan::execute`] runs
/// any plan on a compiled [`Instance`].
pub use plan::Plan;

/// Everything that can go wrong in the library.
///
/// ```
/// use nnlin::{Error, Model, Options, Rows};
/// let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// match m.linearize(&[1.0, 2.0, 3.0, 4.0], &Options::new().with_rows(Rows::Top(9))) {
///     Err(Error::TooManyRows { k: 9, outputs: 3 }) => {}
///     other => panic!("{other:?}"),
/// }
/// // every error is one line
/// assert!(matches!(Model::from_onnx_bytes("junk", b"not onnx"), Err(Error::Onnx { .. })));
/// # Ok::<(), nnlin::Error>(())
/// ```
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
    /// Ensemble members or pipeline stages that do not fit together, or
    /// bad weights.
    #[error("ensemble: {0}")]
    Ensemble(#[from] EnsembleError),
    /// The dense baseline's factors do not fit the memory budget.
    #[error("{model}: {source}")]
    Dense {
        /// Model name.
        model: String,
        /// The cause.
        source: plan::DenseError,
    },
    /// The model has no linear region to measure (a smooth layer, or
    /// breakpoints nnlin does not know).
    #[error("{model}: {source}")]
    Region {
        /// Model name.
        model: String,
        /// The cause.
        source: RegionError,
    },
    /// An instance's plan would hold more bytes than the memory budget.
    #[error(
        "{model}: the {plan} plan for {rows} row(s) needs about {need} bytes at its peak, above the memory budget of {budget} bytes per instance (--max-memory, shared by the threads); select fewer --rows or use fewer --threads"
    )]
    MemoryBudget {
        /// Model name.
        model: String,
        /// The plan (`reverse`, `forward`, `split(v)`, `dp`).
        plan: String,
        /// Rows asked for.
        rows: usize,
        /// Predicted peak bytes.
        need: usize,
        /// The budget per instance.
        budget: usize,
    },
    /// `Rows::Top(k)` with more rows than the model has outputs.
    #[error("--rows top{k}: the model has only {outputs} outputs")]
    TooManyRows {
        /// Rows asked for.
        k: usize,
        /// Outputs of the model.
        outputs: usize,
    },
    /// `Rows::Indices` naming an output the model does not have.
    #[error("--rows: row {row} out of range, the model has {outputs} outputs")]
    RowOutOfRange {
        /// The row.
        row: usize,
        /// Outputs of the model.
        outputs: usize,
    },
    /// Instances whose length is not the model's input length.
    #[error("instances have {got} elements, the model expects {expected}")]
    InputLength {
        /// The model's input length.
        expected: usize,
        /// The instances' length.
        got: usize,
    },
    /// A batch with no instances where one is needed.
    #[error("no instances")]
    NoInstances,
    /// Fewer labels than instances.
    #[error("{labels} labels for {instances} instances")]
    Labels {
        /// Labels given.
        labels: usize,
        /// Instances given.
        instances: usize,
    },
    /// More sampled points than a region report allows.
    #[error("--verify {samples} is above the limit of {max} samples per instance")]
    Verify {
        /// Points asked for.
        samples: usize,
        /// The limit.
        max: usize,
    },
    /// A bad input box, or an instance outside it (`index`: the element and
    /// its value).
    #[error("{}", box_message(*lo, *hi, *index))]
    Box {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
        /// The first element outside `[lo, hi]` and its value.
        index: Option<(usize, f64)>,
    },
    /// An error of the caller's, returned from a callback (for example
    /// [`Linearize::linearize_batch_with`]'s), handed back unchanged.
    #[error("{0}")]
    Caller(Box<dyn std::error::Error + Send + Sync>),
}

fn box_message(lo: f64, hi: f64, index: Option<(usize, f64)>) -> String {
    match index {
        None => format!("--box takes lo,hi with lo < hi, got [{lo}, {hi}]"),
        Some((i, v)) => format!(
            "the instance lies outside --box {lo},{hi} (element {i} is {v}); no region around it is inside the box"
        ),
    }
}

/// Models that cannot form an ensemble or a pipeline.
///
/// ```
/// use nnlin::{Ensemble, EnsembleError, Error};
/// assert!(matches!(Ensemble::new(vec![]), Err(Error::Ensemble(EnsembleError::Empty))));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EnsembleError {
    /// No members.
    #[error("no models")]
    Empty,
    /// A weight that is NaN or infinite.
    #[error("weight {weight} of `{model}` is not finite")]
    Weight {
        /// The member.
        model: String,
        /// Its weight.
        weight: f64,
    },
    /// Members with different input or output lengths.
    #[error(
        "`{model}` maps {inputs} inputs to {outputs} outputs but `{first}` maps {first_inputs} to {first_outputs}"
    )]
    Shapes {
        /// The member that differs.
        model: String,
        /// Its input length.
        inputs: usize,
        /// Its output length.
        outputs: usize,
        /// The first member.
        first: String,
        /// The first member's input length.
        first_inputs: usize,
        /// The first member's output length.
        first_outputs: usize,
    },
    /// A pipeline stage whose input length is not the previous output's.
    #[error("`{model}` takes {inputs} inputs but the previous stage gives {previous}")]
    Stage {
        /// The stage.
        model: String,
        /// Its input length.
        inputs: usize,
        /// The previous stage's output length.
        previous: usize,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Accumulation strategy.
///
/// ```
/// use nnlin::Strategy;
/// assert_eq!("dp".parse::<Strategy>(), Ok(Strategy::Dp));
/// assert_eq!(Strategy::default().to_string(), "auto");
/// ```
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

/// The floating-point precision of W and b.
///
/// ```
/// use nnlin::Precision;
/// assert_eq!("f32".parse::<Precision>(), Ok(Precision::F32));
/// assert_eq!(Precision::default().to_string(), "f64");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Float32: the instance's forward pass computes its dense layers and
    /// convolutions in float32, so the activation pattern is the one a
    /// float32 evaluation gives (a unit within float32 rounding of a kink
    /// may take the other side than in float64, as in PyTorch's float32).
    /// Reverse accumulation (what `auto` picks whenever rows are fewer
    /// than inputs) runs every product in float32; the other plans run in
    /// float64 and W and b are rounded to float32 values.
    F32,
    /// Float64 throughout: the exactness mode.
    #[default]
    F64,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    /// `f32` or `f64`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f64" => Ok(Precision::F64),
            other => Err(format!("precision: f32 or f64, got {other:?}")),
        }
    }
}

/// How many instances of a batch share one reverse pass
/// ([`nnlin_compile::batch`]): their adjoint rows stacked, every shared
/// operator applied to all of them at once (its weights read once), each
/// instance's own factors to its own rows. Batches apply to a one-model
/// ensemble (no `--then` stages) whose plan is reverse accumulation; other
/// plans run one instance at a time. W and b agree with one-at-a-time
/// results within rounding (see [`nnlin_compile::batch`]).
///
/// ```
/// use nnlin::Batch;
/// assert_eq!("auto".parse::<Batch>(), Ok(Batch::Auto));
/// assert_eq!("8".parse::<Batch>(), Ok(Batch::Width(8)));
/// assert!("0".parse::<Batch>().is_err());
/// assert_eq!(Batch::Width(4).to_string(), "4");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Batch {
    /// The planner's width ([`plan::batch_width`]).
    #[default]
    Auto,
    /// This many instances per pass (1: one at a time).
    Width(usize),
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batch::Auto => f.write_str("auto"),
            Batch::Width(w) => write!(f, "{w}"),
        }
    }
}

impl std::str::FromStr for Batch {
    type Err = String;
    /// `auto` or a width of at least 1.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Batch::Auto),
            w => match w.parse::<usize>() {
                Ok(w) if w >= 1 => Ok(Batch::Width(w)),
                _ => Err(format!("batch: auto or a width of at least 1, got {w:?}")),
            },
        }
    }
}

/// Files at least this large are read in pieces across the current rayon
/// pool (see [`read_file`]).
const PAR_READ_MIN: u64 = 1 << 24;

/// A whole file's bytes. A large regular file is read in one piece per
/// thread of the current rayon pool, each at its offset: most of the time
/// of reading a model is faulting in the new buffer's pages, and the
/// threads fault in their own pieces. A file that changed size while
/// being read is read again as a whole; anything else (small files,
/// pipes, other systems) is `std::fs::read`.
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    #[cfg(unix)]
    {
        let f = std::fs::File::open(path)?;
        let meta = f.metadata()?;
        if meta.is_file()
            && meta.len() >= PAR_READ_MIN
            && rayon::current_num_threads() > 1
            && let Ok(n) = usize::try_from(meta.len())
            && let Some(buf) = read_in_pieces(&f, n)?
        {
            return Ok(buf);
        }
    }
    std::fs::read(path)
}

/// The `n` bytes of `f`, in one piece per thread of the current rayon
/// pool; `None` if `f` turns out not to hold exactly `n` bytes (it grew or
/// shrank since its size was taken).
#[cfg(unix)]
fn read_in_pieces(f: &std::fs::File, n: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::os::unix::fs::FileExt;
    let piece = n.div_ceil(rayon::current_num_threads()).max(1);
    // an allocation the machine refuses is an error, as in
    // `std::fs::read`; the threads fault in their own pages
    let mut buf = Vec::new();
    buf.try_reserve_exact(n)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::OutOfMemory, e))?;
    buf.par_extend(rayon::iter::repeat_n(0u8, n));
    let read = buf
        .par_chunks_mut(piece)
        .enumerate()
        .try_for_each(|(k, c)| f.read_exact_at(c, (k * piece) as u64));
    match read {
        // nothing past the end: the file did not grow meanwhile
        Ok(()) if f.read_at(&mut [0u8], n as u64)? == 0 => Ok(Some(buf)),
        Ok(()) => Ok(None),
        // it ended before `n` bytes
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
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
///
/// ```
/// use nnlin::Rows;
/// assert_eq!("top3".parse::<Rows>(), Ok(Rows::Top(3)));
/// assert_eq!("4,1".parse::<Rows>(), Ok(Rows::Indices(vec![4, 1])));
/// assert_eq!(Rows::Top(3).to_string(), "top3");
/// assert_eq!(Rows::All.count(10).unwrap(), 10);
/// assert!(Rows::Indices(vec![12]).count(10).is_err());
/// ```
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

impl std::fmt::Display for Rows {
    /// `all`, `topK` or `i,j,...`: what [`Rows::from_str`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rows::All => f.write_str("all"),
            Rows::Top(k) => write!(f, "top{k}"),
            Rows::Indices(v) => {
                let s: Vec<String> = v.iter().map(ToString::to_string).collect();
                f.write_str(&s.join(","))
            }
        }
    }
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
/// nothing behind the caller's back. Instances of a batch run in parallel on
/// the caller's rayon pool (`pool.install(|| model.linearize_batch(…))`);
/// the products inside one instance run as [`Options::par`] says.
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
    /// [`plan::Rates::TYPICAL`], or see `measure_rates`. The CLI passes what
    /// `nnlin calibrate` measured.
    pub rates: Option<plan::Rates>,
    /// With no `rates`: measure this machine's (about 0.1 s, once per
    /// model) only where the plan depends on them; an `Auto` choice that is
    /// the same whatever the rates ([`plan::rate_independent`]) measures
    /// nothing. The CLI sets it when no calibration is stored.
    pub measure_rates: bool,
    /// Precision of W and b.
    pub precision: Precision,
    /// Parallelism of the products inside one instance; `None`: a batch of
    /// one instance spreads its products over the current rayon pool, a
    /// larger batch runs its instances in parallel, each sequentially, and
    /// [`Model::linearize`] alone is sequential. The result is the same bits
    /// either way (faer keeps each element's reduction order; tested).
    pub par: Option<Par>,
    /// How many instances of a batch share one reverse pass.
    pub batch: Batch,
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
    /// With `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }
    /// With `batch` instances per reverse pass.
    pub fn with_batch(mut self, batch: Batch) -> Self {
        self.batch = batch;
        self
    }
    /// With the products inside one instance run on `par`.
    pub fn with_par(mut self, par: Par) -> Self {
        self.par = Some(par);
        self
    }
    /// With the planner's kernel rates.
    pub fn with_rates(mut self, rates: plan::Rates) -> Self {
        self.rates = Some(rates);
        self
    }
    /// With the planner's rates measured on this machine where the plan
    /// depends on them (see [`Options::measure_rates`]).
    pub fn with_measured_rates(mut self) -> Self {
        self.measure_rates = true;
        self
    }
}

/// What the importer reports about a model besides its network.
///
/// ```
/// let m = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu_softmax.onnx"))?;
/// assert_eq!(m.info().skipped_softmax.as_deref(), Some("Softmax"));
/// assert!(m.info().opset >= 9);
/// # Ok::<(), nnlin::Error>(())
/// ```
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
///
/// ```
/// use nnlin::{Model, Options};
/// let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// assert_eq!((m.input_len(), m.output_len()), (4, 3));
/// let x = [5.9, 3.0, 5.1, 1.8];
/// let lin = m.linearize(&x, &Options::new())?;
/// let f = m.forward_reference(&x); // the independent interpreter
/// assert!(lin.residual(&lin.wx(&x), &f) < 1e-12);
/// # Ok::<(), nnlin::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Model {
    name: String,
    info: ModelInfo,
    compiler: Compiler,
    /// The auto strategy's choice per number of rows: the candidates' costs
    /// depend on the network's structure and on m, so it is planned once.
    auto_choice: std::sync::Arc<std::sync::Mutex<Vec<(PlanKey, plan::Choice)>>>,
    /// Per number of rows: the auto choice if no rate can change it.
    rate_free: std::sync::Arc<std::sync::Mutex<Vec<RateFree>>>,
    /// This machine's kernel rates, measured on first need.
    measured: std::sync::Arc<std::sync::OnceLock<plan::Rates>>,
}

impl Model {
    fn assemble(name: &str, info: ModelInfo, compiler: Compiler) -> Self {
        Self {
            name: name.to_string(),
            info,
            compiler,
            auto_choice: Default::default(),
            rate_free: Default::default(),
            measured: Default::default(),
        }
    }

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
        let imported = nnlin_onnx::import_with_resolver(bytes, options, resolve)
            .map_err(|source| Error::Onnx { model: name.to_string(), source })?;
        Ok(Self::from_imported(name, imported))
    }

    fn from_imported(name: &str, imported: Imported) -> Self {
        let Imported { network, opset, producer, input_name, output_name, skipped_softmax } =
            imported;
        let info = ModelInfo { opset, producer, input_name, output_name, skipped_softmax };
        let compiler = Compiler::from_shared(std::sync::Arc::new(network), ConvKernel::Auto);
        Self::assemble(name, info, compiler)
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
        Self::assemble(name, info, compiler)
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
        let bytes = read_file(path)
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let resolve = |r: &ExternalRef| read_external(&dir, r);
        let name = path.display().to_string();
        // the file's buffer is handed over: tensors decode as slices of it
        let imported = nnlin_onnx::import_owned_with_resolver(bytes, options, &resolve)
            .map_err(|source| Error::Onnx { model: name.clone(), source })?;
        Ok(Self::from_imported(&name, imported))
    }

    /// The same model with convolutions represented as `kernel` (explicit
    /// CSR Toeplitz matrices, structured operators, or chosen by size).
    pub fn with_conv_kernel(mut self, kernel: ConvKernel) -> Self {
        let csr = match kernel {
            ConvKernel::Csr => true,
            ConvKernel::Structured | ConvKernel::Auto => false,
        };
        if csr == self.compiler.csr_convolutions() {
            // the same operators: nothing to recompile
            return self;
        }
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
        self.compile_instance_with(x, mode, Par::Seq)
    }

    /// [`Model::compile_instance`] with the forward pass's structured
    /// products spread over `par`.
    pub fn compile_instance_with(&self, x: &[f64], mode: Mode, par: Par) -> Result<Instance> {
        self.compile_instance_in(x, mode, par, Precision::F64)
    }

    /// Forms what the products at `precision` read and keep (float32
    /// weights, Winograd kernels; see [`linalg::Operator::formed_bytes`]) with
    /// the operators side by side on the current rayon pool, once per
    /// model: later calls find them formed. Otherwise the first instance
    /// to reach an operator forms it while the others wait for it. The
    /// batch entry points call it before a batch of several instances;
    /// it changes no result.
    pub fn prepare(&self, precision: Precision) {
        match precision {
            Precision::F64 => self.compiler.prepare::<f64>(),
            Precision::F32 => self.compiler.prepare::<f32>(),
        }
    }

    /// [`Model::compile_instance_with`] with the dense layers' and
    /// convolutions' forward products in `precision` (see
    /// [`Precision::F32`]).
    pub fn compile_instance_in(
        &self,
        x: &[f64],
        mode: Mode,
        par: Par,
        precision: Precision,
    ) -> Result<Instance> {
        match precision {
            Precision::F64 => self.compiler.instance_in::<f64>(x, mode, par),
            Precision::F32 => {
                if par.degree() > 1 {
                    // the f32 weights rounded on every thread, not as the
                    // forward pass reaches them; the Winograd kernels
                    // (read by the reverse products only) formed beside
                    // the forward pass, on the threads it leaves idle
                    // (ResNet-50 at 224², one instance: about 85 % busy)
                    self.compiler.prepare_for::<f32>(linalg::Stage::Forward);
                    let (inst, ()) = rayon::join(
                        || self.compiler.instance_in::<f32>(x, mode, par),
                        || self.compiler.prepare_for::<f32>(linalg::Stage::Reverse),
                    );
                    inst
                } else {
                    self.compiler.instance_in::<f32>(x, mode, par)
                }
            }
        }
        .map_err(|source| Error::Compile { model: self.name.clone(), source })
    }
    /// The rates `opts` plans with: its own, else this machine's (measured
    /// once) if it asks, else the typical ones.
    fn rates(&self, opts: &Options) -> plan::Rates {
        match opts.rates {
            Some(r) => r,
            None if opts.measure_rates => *self.measured.get_or_init(plan::Rates::measure),
            None => plan::Rates::TYPICAL,
        }
    }

    /// The auto choice for `m` rows under `opts` and the rates it ran with:
    /// with `measure_rates` and no rates given, a choice no rate can change
    /// is taken without measuring.
    fn auto(&self, inst: &Instance, m: usize, opts: &Options) -> (plan::Choice, plan::Rates) {
        if opts.rates.is_none() && opts.measure_rates {
            let known =
                self.rate_free.lock().ok().and_then(|c| c.iter().find(|e| e.0 == m).map(|e| e.1));
            let free = known.unwrap_or_else(|| {
                let free = plan::rate_independent(inst, m);
                if let Ok(mut c) = self.rate_free.lock() {
                    c.push((m, free));
                }
                free
            });
            if let Some(choice) = free {
                return (choice, plan::Rates::TYPICAL);
            }
        }
        let rates = self.rates(opts);
        (self.planned(inst, m, &rates), rates)
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
        let inst = self.compile_instance_with(x, opts.mode, opts.par.unwrap_or(Par::Seq))?;
        let rows = select_rows(&opts.rows, &inst.output)?;
        matfree::LinearMap::new(inst, rows)
            .map_err(|source| Error::Compile { model: self.name.clone(), source })
    }
}

/// The source paper's decomposition figures over a labelled set (its
/// Tables 1–4): the accuracy of F's argmax, of W·x's alone and of b's alone
/// against the labels, and the label-flip rates of W·x and b against F's
/// prediction.
///
/// ```
/// use nnlin::{Mode, Model};
/// let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// let xs = ndarray::array![[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]];
/// let d = m.decompose(xs.view(), &[0, 2], Mode::Tangent, &|| {})?;
/// assert_eq!(d.n, 2);
/// assert!((0.0..=1.0).contains(&d.wx_lfr));
/// # Ok::<(), nnlin::Error>(())
/// ```
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
            return Err(Error::NoInstances);
        }
        if labels.len() < count {
            return Err(Error::Labels { labels: labels.len(), instances: count });
        }
        if xs.ncols() != self.input_len() {
            return Err(Error::InputLength { expected: self.input_len(), got: xs.ncols() });
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

/// A row count and the auto choice no rate can change, if there is one.
type RateFree = (usize, Option<plan::Choice>);

/// Per-layer activation pattern of one instance.
///
/// ```
/// let m = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// let lin = m.linearize(&[5.9, 3.0, 5.1, 1.8], &nnlin::Options::new())?;
/// for p in &lin.pattern {
///     assert_eq!(p.mask.iter().filter(|&&on| on).count(), p.active);
/// }
/// # Ok::<(), nnlin::Error>(())
/// ```
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
///
/// ```
/// use nnlin::{Model, Options, Precision, Rows};
/// let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/gelu.onnx"))?;
/// let x = [5.1, 3.5, 1.4, 0.2];
/// let lin = m.linearize(&x, &Options::new().with_rows(Rows::Top(1)).with_precision(Precision::F32))?;
/// assert_eq!(lin.w.dim(), (1, 4));
/// assert!(lin.w.iter().all(|&v| f64::from(v as f32) == v)); // float32 values
/// assert_eq!(lin.rows, vec![nnlin::argmax(&lin.output)]);
/// # Ok::<(), nnlin::Error>(())
/// ```
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
    /// `Forward` where a member ran forward accumulation, else `Reverse`
    /// (see `plans` for what each member ran).
    pub direction: Direction,
    /// The plan each member ran (ensemble members, then `--then` stages).
    pub plans: Vec<Executed>,
    /// Activation pattern of every activation layer of every member.
    pub pattern: Vec<LayerPattern>,
    /// How many instances shared the reverse pass that formed it (1: alone;
    /// see [`Batch`]).
    pub batch: usize,
}

impl Linearization {
    /// W and b rounded to float32 values (what `--precision f32` writes).
    pub fn round_to_f32(&mut self) {
        self.w.mapv_inplace(|v| f64::from(v as f32));
        self.b.mapv_inplace(|v| f64::from(v as f32));
    }

    /// `W·x` for each selected row (summed in input order).
    pub fn wx(&self, x: &[f64]) -> Vec<f64> {
        // a column at a time, every row's sum still in input order: W is
        // column-major, so this reads it once, contiguously, with one
        // independent sum per row
        let mut s = vec![0.0; self.w.nrows()];
        for (col, &xj) in self.w.columns().into_iter().zip(x) {
            // (ndarray iterates a contiguous column as a slice)
            for (si, &w) in s.iter_mut().zip(&col) {
                *si += w * xj;
            }
        }
        s
    }

    /// `max |W·x + b − F(x)|` over the selected rows, from `wx` (see
    /// [`Linearization::wx`]) and all outputs `f` of F at x.
    pub fn residual(&self, wx: &[f64], f: &[f64]) -> f64 {
        residual(wx, &self.b, &self.rows, f)
    }
}

/// `max |W·x + b − F(x)|` over rows `rows`, from `W·x` and `b` of those
/// rows and all outputs `f` of F at x (what [`Linearization::residual`]
/// computes, for callers that keep only these pieces).
pub fn residual<'a>(
    wx: &[f64],
    b: impl IntoIterator<Item = &'a f64>,
    rows: &[usize],
    f: &[f64],
) -> f64 {
    wx.iter().zip(b).zip(rows).fold(0.0, |r, ((s, b), &row)| f64::max(r, (s + b - f[row]).abs()))
}

/// A weighted sum of models `F = Σ aᵢ Fᵢ` with equal input and output shapes
/// (a single model is an ensemble of one with weight 1).
///
/// ```
/// use nnlin::{Ensemble, Model, Options};
/// let path = |f: &str| format!("{}/fixtures/iris/{f}", env!("CARGO_MANIFEST_DIR"));
/// let (a, b) = (Model::from_onnx_file(path("relu.onnx"))?, Model::from_onnx_file(path("tanh.onnx"))?);
/// let x = [5.9, 3.0, 5.1, 1.8];
/// let ens = Ensemble::new(vec![(a.clone(), 0.5), (b.clone(), 2.0)])?;
/// let w = ens.linearize(&x, &Options::new())?.w;
/// let wa = a.linearize(&x, &Options::new())?.w;
/// let wb = b.linearize(&x, &Options::new())?.w;
/// assert!((&w - &(wa * 0.5 + wb * 2.0)).iter().all(|d| d.abs() < 1e-12));
/// # Ok::<(), nnlin::Error>(())
/// ```
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
            Rows::Top(k) if *k > outputs => Err(Error::TooManyRows { k: *k, outputs }),
            Rows::Top(k) => Ok(*k),
            Rows::Indices(v) => match v.iter().find(|&&r| r >= outputs) {
                Some(&row) => Err(Error::RowOutOfRange { row, outputs }),
                None => Ok(v.len()),
            },
        }
    }
}

/// Every member of an ensemble compiled at one input.
struct Compiled {
    insts: Vec<Instance>,
    output: Vec<f64>,
    pattern: Vec<LayerPattern>,
}

/// A member's `W` as an array, times its weight `a`: the block's
/// column-major entries handed over without a copy.
fn scaled_array(w: Block, a: f64) -> Array2<f64> {
    let (r, c, data) = w.into_col_major();
    let mut w = Array2::from_shape_vec((r, c).f(), data).expect("block shape");
    if a != 1.0 {
        w.mapv_inplace(|v| a * v);
    }
    w
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
            return Err(EnsembleError::Empty.into());
        };
        for (m, a) in &members {
            if !a.is_finite() {
                return Err(EnsembleError::Weight { model: m.name.clone(), weight: *a }.into());
            }
            if m.input_len() != first.input_len() || m.output_len() != first.output_len() {
                return Err(EnsembleError::Shapes {
                    model: m.name.clone(),
                    inputs: m.input_len(),
                    outputs: m.output_len(),
                    first: first.name.clone(),
                    first_inputs: first.input_len(),
                    first_outputs: first.output_len(),
                }
                .into());
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

    /// Every member compiled at `x`: the instances, the ensemble's output
    /// and its activation pattern.
    fn compile_members(&self, x: &[f64], opts: &Options) -> Result<Compiled> {
        let par = opts.par.unwrap_or(Par::Seq);
        let mut insts = Vec::with_capacity(self.members.len());
        let mut output = vec![0.0; self.output_len()];
        let mut pattern = vec![];
        for (k, (m, a)) in self.members.iter().enumerate() {
            let inst = m.compile_instance_in(x, opts.mode, par, opts.precision)?;
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
        Ok(Compiled { insts, output, pattern })
    }

    /// The plan member `model` runs for `m` rows of `inst` under `opts`,
    /// checked against the memory `budget` of `count` instances held at
    /// once.
    fn plan_for(
        model: &Model,
        inst: &Instance,
        m: usize,
        opts: &Options,
        budget: usize,
        count: usize,
    ) -> Result<Plan> {
        let plan = match opts.strategy {
            Strategy::Dense => Plan::Dense { max_bytes: budget },
            Strategy::Reverse => Plan::Reverse,
            Strategy::Forward => Plan::Forward,
            Strategy::Dp => Plan::Dp(model.rates(opts)),
            Strategy::Auto => {
                let (choice, rates) = model.auto(inst, m, opts);
                Plan::of(choice, rates)
            }
        };
        // the dense baseline checks its own budget (its dense factors)
        if let Some(choice) = plan.choice() {
            let need = plan::peak_bytes(inst, m, choice).saturating_mul(count);
            if need > budget {
                return Err(Error::MemoryBudget {
                    model: model.name.clone(),
                    plan: format!("{choice:?}").to_lowercase(),
                    rows: m,
                    need,
                    budget,
                });
            }
        }
        Ok(plan)
    }

    /// Instances running at once share the memory budget.
    fn budget(opts: &Options) -> usize {
        opts.max_memory.unwrap_or(usize::MAX) / rayon::current_num_threads().max(1)
    }

    /// `W` and `b` at one input `x` (flattened, length `n`).
    pub fn linearize(&self, x: &[f64], opts: &Options) -> Result<Linearization> {
        let par = opts.par.unwrap_or(Par::Seq);
        let Compiled { insts, output, pattern } = self.compile_members(x, opts)?;
        let rows = select_rows(&opts.rows, &output)?;
        let (m, n) = (rows.len(), self.input_len());
        let mut w: Option<Array2<f64>> = None;
        let mut b = vec![0.0; m];
        let mut direction = Direction::Reverse;
        let mut plans = Vec::with_capacity(self.members.len());
        let budget = Self::budget(opts);
        for (inst, (model, a)) in insts.iter().zip(&self.members) {
            let plan = Self::plan_for(model, inst, m, opts, budget, 1)?;
            let ran = match opts.precision {
                Precision::F64 => plan.execute::<f64>(inst, &rows, par),
                Precision::F32 => plan.execute::<f32>(inst, &rows, par),
            };
            let (wi, bi, ran) = ran.map_err(|e| match e {
                plan::PlanError::Compile(source) => {
                    Error::Compile { model: model.name.clone(), source }
                }
                plan::PlanError::Dense(source) => {
                    Error::Dense { model: model.name.clone(), source }
                }
            })?;
            if ran == Executed::Forward {
                direction = Direction::Forward;
            }
            plans.push(ran);
            let wi = scaled_array(wi, *a);
            match &mut w {
                None => w = Some(wi),
                Some(w) => *w += &wi,
            }
            for (bo, v) in b.iter_mut().zip(bi) {
                *bo += a * v;
            }
        }
        let w = w.unwrap_or_else(|| Array2::zeros((m, n).f()));
        let mut lin = Linearization {
            w,
            b: Array1::from(b),
            rows,
            output,
            direction,
            plans,
            pattern,
            batch: 1,
        };
        if opts.precision == Precision::F32 {
            lin.round_to_f32();
        }
        Ok(lin)
    }

    /// The batch width a batch of `count` instances runs with under `opts`
    /// (priced at `x0`, one of them): 1 unless the ensemble is one model
    /// whose plan is reverse accumulation, then `opts.batch`'s width or, for
    /// [`Batch::Auto`], [`plan::batch_width`]'s under `opts.rates` (else
    /// the typical rates; `measure_rates` does not apply to it).
    fn batch_width(&self, x0: &[f64], opts: &Options, count: usize) -> Result<usize> {
        let [(model, _)] = self.members.as_slice() else { return Ok(1) };
        if count < 2 || matches!(opts.strategy, Strategy::Forward | Strategy::Dense | Strategy::Dp)
        {
            return Ok(1);
        }
        if let Batch::Width(w) = opts.batch {
            return Ok(w.clamp(1, count));
        }
        // priced under the caller's rates, else the typical ones: never
        // measured here (0.1 s, more than a whole batch of small models)
        let rates = opts.rates.unwrap_or(plan::Rates::TYPICAL);
        let m = opts.rows.count(model.output_len())?;
        if !plan::batching_may_pay(&model.compiler, m, &rates) {
            return Ok(1);
        }
        // on every thread of the pool, idle before the batch starts (its
        // bits do not matter: only its costs are read); an instance on
        // several threads also forms the weights the batch will read
        let threads = rayon::current_num_threads().max(1);
        let par = if threads > 1 { Par::rayon(threads) } else { Par::Seq };
        let inst = model.compile_instance_in(x0, opts.mode, par, opts.precision)?;
        let m = select_rows(&opts.rows, &inst.output)?.len();
        if Self::plan_for(model, &inst, m, opts, usize::MAX, 1)? != Plan::Reverse {
            return Ok(1);
        }
        Ok(plan::batch_width(&inst, m, count, threads, &rates, Self::budget(opts)))
    }

    /// Linearizes the inputs `xs` as one batch: for a one-model ensemble
    /// whose plan is reverse accumulation, one batched reverse pass
    /// ([`nnlin_compile::batch`]), else one instance at a time.
    fn linearize_group(&self, xs: &[&[f64]], opts: &Options) -> Result<Vec<Linearization>> {
        let one_at_a_time = || xs.iter().map(|x| self.linearize(x, opts)).collect();
        let [(model, a)] = self.members.as_slice() else { return one_at_a_time() };
        if xs.len() < 2 {
            return one_at_a_time();
        }
        let par = opts.par.unwrap_or(Par::Seq);
        let compiled: Vec<Compiled> =
            xs.iter().map(|x| self.compile_members(x, opts)).collect::<Result<_>>()?;
        let rows: Vec<Vec<usize>> =
            compiled.iter().map(|c| select_rows(&opts.rows, &c.output)).collect::<Result<_>>()?;
        let m = rows[0].len();
        let insts: Vec<&Instance> = compiled.iter().map(|c| &c.insts[0]).collect();
        let plan = Self::plan_for(model, insts[0], m, opts, Self::budget(opts), xs.len())?;
        if plan != Plan::Reverse || rows.iter().any(|r| r.len() != m) {
            return one_at_a_time();
        }
        let rowrefs: Vec<&[usize]> = rows.iter().map(Vec::as_slice).collect();
        let wb: Vec<(Block, Vec<f64>)> = match opts.precision {
            Precision::F64 => {
                nnlin_compile::batch::accumulate_reverse_batch::<f64>(&insts, &rowrefs, par)
            }
            Precision::F32 => nnlin_compile::batch::accumulate_reverse_batch::<f32>(
                &insts, &rowrefs, par,
            )
            .map(|v| {
                v.into_iter()
                    .map(|(w, b)| {
                        let (r, c, data) = w.into_col_major();
                        (
                            Block::from_col_major(r, c, <f32 as linalg::Real>::widen(data)),
                            <f32 as linalg::Real>::widen(b),
                        )
                    })
                    .collect()
            }),
        }
        .map_err(|source| Error::Compile { model: model.name.clone(), source })?;
        Ok(compiled
            .into_iter()
            .zip(rows)
            .zip(wb)
            .map(|((c, rows), (wi, bi))| {
                let b = bi.iter().map(|v| a * v).collect::<Vec<f64>>();
                let mut lin = Linearization {
                    w: scaled_array(wi, *a),
                    b: Array1::from(b),
                    rows,
                    output: c.output,
                    direction: Direction::Reverse,
                    plans: vec![Executed::Reverse],
                    pattern: c.pattern,
                    batch: xs.len(),
                };
                if opts.precision == Precision::F32 {
                    lin.round_to_f32();
                }
                lin
            })
            .collect())
    }

    /// Linearizes every row of `xs` (`N × n`), in parallel over instances on
    /// the current rayon pool. Results do not depend on the thread count.
    pub fn linearize_batch(
        &self,
        xs: ArrayView2<f64>,
        opts: &Options,
    ) -> Result<Vec<Linearization>> {
        batch(self, xs, opts)
    }

    /// [`Model::prepare`] for every member.
    pub fn prepare(&self, precision: Precision) {
        for (m, _) in &self.members {
            m.prepare(precision);
        }
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
    /// Forms what the products at `precision` read and keep, on the
    /// current pool (see [`Model::prepare`]); the batch entry points call
    /// it before several instances. Nothing by default.
    fn prepare(&self, precision: Precision) {
        let _ = precision;
    }
    /// Every row of `xs`, in parallel on the current rayon pool, all held.
    fn linearize_batch(&self, xs: ArrayView2<f64>, opts: &Options) -> Result<Vec<Linearization>> {
        batch(self, xs, opts)
    }
    /// How many of `count` instances, of which `x0` is one, share one
    /// reverse pass under `opts` ([`Batch`]); 1 by default.
    fn batch_width(&self, x0: &[f64], opts: &Options, count: usize) -> Result<usize> {
        let _ = (x0, opts, count);
        Ok(1)
    }
    /// The inputs `xs` as one batch of [`Linearize::batch_width`]'s width;
    /// by default one at a time.
    fn linearize_group(&self, xs: &[&[f64]], opts: &Options) -> Result<Vec<Linearization>> {
        xs.iter().map(|x| self.linearize(x, opts)).collect()
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
            return Err(Error::InputLength { expected: self.input_len(), got: xs.ncols() });
        }
        let opts = batch_options(opts, xs.nrows());
        prepare_batch(self, &opts, xs.nrows());
        let width = match xs.nrows() {
            0 | 1 => 1,
            n => self.batch_width(&xs.row(0).to_vec(), &opts, n)?.max(1),
        };
        // groups of `width` instances in parallel (of one: one at a time)
        let starts: Vec<usize> = (0..xs.nrows()).step_by(width).collect();
        starts.into_par_iter().try_for_each(|k0| {
            let rows: Vec<Vec<f64>> =
                (k0..(k0 + width).min(xs.nrows())).map(|k| xs.row(k).to_vec()).collect();
            let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
            for (k, lin) in (k0..).zip(self.linearize_group(&refs, &opts)?) {
                f(k, lin)?;
            }
            Ok(())
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
    fn prepare(&self, precision: Precision) {
        Model::prepare(self, precision)
    }
    fn batch_width(&self, x0: &[f64], opts: &Options, count: usize) -> Result<usize> {
        Ensemble::single(self.clone()).batch_width(x0, opts, count)
    }
    fn linearize_group(&self, xs: &[&[f64]], opts: &Options) -> Result<Vec<Linearization>> {
        Ensemble::single(self.clone()).linearize_group(xs, opts)
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
    fn prepare(&self, precision: Precision) {
        Ensemble::prepare(self, precision)
    }
    fn batch_width(&self, x0: &[f64], opts: &Options, count: usize) -> Result<usize> {
        Ensemble::batch_width(self, x0, opts, count)
    }
    fn linearize_group(&self, xs: &[&[f64]], opts: &Options) -> Result<Vec<Linearization>> {
        Ensemble::linearize_group(self, xs, opts)
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
    fn prepare(&self, precision: Precision) {
        Pipeline::prepare(self, precision)
    }
    fn batch_width(&self, x0: &[f64], opts: &Options, count: usize) -> Result<usize> {
        if self.then.is_empty() { self.first.batch_width(x0, opts, count) } else { Ok(1) }
    }
    fn linearize_group(&self, xs: &[&[f64]], opts: &Options) -> Result<Vec<Linearization>> {
        if self.then.is_empty() {
            self.first.linearize_group(xs, opts)
        } else {
            xs.iter().map(|x| self.linearize(x, opts)).collect()
        }
    }
}

/// `opts` for a batch of `count` instances: one instance spreads its
/// products over the current pool, unless the caller chose.
fn batch_options(opts: &Options, count: usize) -> Options {
    let mut opts = opts.clone();
    if opts.par.is_none() && count == 1 {
        opts.par = Some(match rayon::current_num_threads() {
            0 | 1 => Par::Seq,
            t => Par::rayon(t),
        });
    }
    opts
}

/// Before a batch of `count` instances that run side by side, what their
/// reverse products read formed on the whole pool ([`Model::prepare`]);
/// not for one instance (its forward pass prepares on its own threads),
/// nor for the forward and dense strategies, which read none of it.
fn prepare_batch<L: Linearize + ?Sized>(f: &L, opts: &Options, count: usize) {
    let reverse = match opts.strategy {
        Strategy::Auto | Strategy::Reverse | Strategy::Dp => true,
        Strategy::Forward | Strategy::Dense => false,
    };
    if count > 1 && reverse {
        f.prepare(opts.precision);
    }
}

/// Linearizes every row of `xs` in parallel on the current rayon pool
/// ([`Linearize::linearize_batch_with`]), holding every result in order.
fn batch<L: Linearize + ?Sized>(
    f: &L,
    xs: ArrayView2<f64>,
    opts: &Options,
) -> Result<Vec<Linearization>> {
    let slots: Vec<std::sync::Mutex<Option<Linearization>>> =
        (0..xs.nrows()).map(|_| std::sync::Mutex::new(None)).collect();
    f.linearize_batch_with(xs, opts, &|k, lin| {
        *slots[k].lock().expect("one writer per slot") = Some(lin);
        Ok(())
    })?;
    Ok(slots
        .into_iter()
        .map(|s| s.into_inner().expect("no poisoned slot").expect("every instance formed"))
        .collect())
}

/// A pipeline `F = B_k ∘ … ∘ B_1 ∘ A`: an ensemble followed by models that
/// each take the previous output as input. Linearized stage by stage:
/// `W = W_B·W_A`, `b = W_B·b_A + b_B`, each stage at the previous stage's
/// output.
///
/// ```
/// use nnlin::{Ensemble, Model, Pipeline};
/// let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// // a 4 → 3 model cannot take its own 3 outputs
/// assert!(Pipeline::new(Ensemble::single(m.clone()), vec![m]).is_err());
/// # Ok::<(), nnlin::Error>(())
/// ```
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
                return Err(EnsembleError::Stage {
                    model: m.name().to_string(),
                    inputs: m.input_len(),
                    previous: out,
                }
                .into());
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
        // every stage in float64; the product is rounded once at the end
        let exact = opts.clone().with_precision(Precision::F64);
        let all = exact.clone().with_rows(Rows::All);
        let mut lin = self.first.linearize(x, &all)?;
        let last = self.then.len() - 1;
        for (k, m) in self.then.iter().enumerate() {
            let y = lin.output.clone();
            let stage_opts = if k == last { exact.clone() } else { all.clone() };
            let next = Ensemble::single(m.clone()).linearize(&y, &stage_opts)?;
            // W = W_B·W_A, b = W_B·b_A + b_B
            let w = next.w.dot(&lin.w);
            let b = next.w.dot(&lin.b) + &next.b;
            let mut pattern = lin.pattern;
            let mut plans = lin.plans;
            plans.extend(next.plans);
            pattern.extend(
                next.pattern.into_iter().map(|p| LayerPattern { model: p.model + 1 + k, ..p }),
            );
            lin = Linearization {
                w,
                b,
                rows: next.rows,
                output: next.output,
                direction: next.direction,
                plans,
                pattern,
                batch: 1,
            };
        }
        if opts.precision == Precision::F32 {
            lin.round_to_f32();
        }
        Ok(lin)
    }

    /// Every row of `xs`, in parallel over instances.
    pub fn linearize_batch(
        &self,
        xs: ArrayView2<f64>,
        opts: &Options,
    ) -> Result<Vec<Linearization>> {
        batch(self, xs, opts)
    }

    /// [`Model::prepare`] for every stage, at the precision each runs in:
    /// with later stages, every stage runs in float64.
    pub fn prepare(&self, precision: Precision) {
        let first = if self.then.is_empty() { precision } else { Precision::F64 };
        self.first.prepare(first);
        for m in &self.then {
            m.prepare(Precision::F64);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A file large enough to be read in pieces across threads gives the
    /// bytes `std::fs::read` gives, for 1 to 3 threads and a length no
    /// thread count divides; one that grew or shrank is left to
    /// `std::fs::read`.
    #[cfg(unix)]
    #[test]
    fn large_files_read_in_pieces_are_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let n = (super::PAR_READ_MIN as usize) + 12_347;
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        for threads in 1..4 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| super::read_file(&path)).unwrap();
            assert!(got == bytes, "{threads} threads");
        }
        // a file that shrank or grew after its size was taken
        let f = std::fs::File::open(&path).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for n in [bytes.len() + 1, bytes.len() + 5_000, bytes.len() - 1] {
            assert!(pool.install(|| super::read_in_pieces(&f, n)).unwrap().is_none(), "{n}");
        }
        let whole = pool.install(|| super::read_in_pieces(&f, bytes.len())).unwrap();
        assert!(whole.is_some_and(|w| w == bytes));
        let missing = super::read_file(&dir.path().join("none"));
        assert_eq!(missing.unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
}
