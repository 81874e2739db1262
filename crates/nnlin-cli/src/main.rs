//! The `nnlin` command line: a thin client of the `nnlin` library.
//!
//! ```text
//! nnlin explain MODEL.onnx [MORE.onnx ... --weights a1,a2,...] --input X.npy [--out DIR]
//!               [--mode tangent|secant] [--precision f32|f64] [--rows all|top1|topK|i,j,...]
//!               [--strategy auto|reverse|forward] [--batch auto|N] [--threads N]
//! nnlin inspect MODEL.onnx [--input X.npy]
//! ```

/// `print!` to stdout through [`stdout_write`]: a reader that closed the
/// pipe (`nnlin inspect m | head`) ends the process quietly.
macro_rules! out {
    ($($t:tt)*) => { $crate::stdout_write(format_args!($($t)*), false) };
}

/// `println!` through [`stdout_write`].
macro_rules! outln {
    ($($t:tt)*) => { $crate::stdout_write(format_args!($($t)*), true) };
}

mod decompose;
mod heatmap;
mod io;
mod neurons;
mod output;
mod region;
mod svd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use ndarray::Array2;
use nnlin::region::Norm;
use nnlin::{Batch, ConvKernel, Ensemble, Linearize, Mode, Options, Precision, Rows, Strategy};
use serde_json::json;

/// The process's allocator: mimalloc keeps freed memory for reuse, where
/// glibc's malloc hands large blocks back to the kernel (`munmap`, or
/// `madvise` in a worker thread's arena) and every instance then faults in
/// and zeroes its adjoint blocks afresh (see docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "nnlin",
    version,
    about = "Exact instance-wise linearization F(x) = W·x + b of ONNX networks"
)]
struct Cli {
    /// Without a command: explain a few bundled MNIST test digits with the
    /// bundled LeNet-5 and write heat maps to nnlin-out/.
    #[command(subcommand)]
    command: Option<Command>,
    /// Memory budget (e.g. 512M, 4G): no buffer sized by an input file, and
    /// no instance's plan, may exceed it. Default: half of the least of the
    /// available memory, the cgroup limit and the address-space limit.
    #[arg(long, global = true)]
    max_memory: Option<String>,
    /// The graph output to explain, by name, for models with several
    /// outputs (a detector's heads); `--then` models use their only output.
    #[arg(long, global = true)]
    output: Option<String>,
}

/// A clap parser for a library enum: its names as the possible values (so
/// `--help` lists them), parsed with the enum's own `FromStr`.
fn named<T>(names: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}

#[derive(Subcommand)]
enum Command {
    /// Linearize a model (or a weighted ensemble) at every instance of X.npy.
    Explain {
        /// ONNX model(s); several form the ensemble Σ aᵢ Fᵢ (see --weights).
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// Ensemble weights a1,a2,... (default: all 1).
        #[arg(long, allow_hyphen_values = true)]
        weights: Option<String>,
        /// Input .npy (float32/float64): one instance or a batch (N, ...).
        #[arg(long)]
        input: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "nnlin-out")]
        out: PathBuf,
        /// How smooth activations are linearized.
        #[arg(long, default_value_t = Mode::Tangent, value_parser = named::<Mode>(&["tangent", "secant"]))]
        mode: Mode,
        /// Precision of W.npy and b.npy.
        #[arg(long, default_value_t = Precision::F64, value_parser = named::<Precision>(&["f32", "f64"]))]
        precision: Precision,
        /// Rows of W: all, top1, topK, or i,j,...
        #[arg(long, default_value = "all")]
        rows: String,
        /// Accumulation order.
        #[arg(long, default_value_t = Strategy::Auto, value_parser = named::<Strategy>(&["auto", "reverse", "forward", "dp", "dense"]))]
        strategy: Strategy,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Instances per reverse pass: their adjoint rows stacked, each shared
        /// operator applied to all at once; `auto` lets the planner pick
        /// (see `nnlin plan`).
        #[arg(long, default_value_t = Batch::Auto, value_parser = |s: &str| s.parse::<Batch>())]
        batch: Batch,
        /// Convolutions as explicit CSR Toeplitz matrices or structured
        /// (im2col + GEMM) operators; `auto` picks the measured faster.
        #[arg(long, default_value_t = ConvKernel::Auto, value_parser = named::<ConvKernel>(&["auto", "csr", "structured"]))]
        conv_kernel: ConvKernel,
        /// Also write heatmaps/instance_K.png: each selected row of W and
        /// W⊙x beside the input (red positive, blue negative).
        #[arg(long)]
        heatmap: bool,
        /// Compose: explain the pipeline THEN∘…∘F (W = W_B·W_A, b = W_B·b_A + b_B).
        #[arg(long = "then")]
        then: Vec<PathBuf>,
        /// Resize image inputs (PNG/JPEG) to the model's input size.
        #[arg(long)]
        resize: bool,
        /// Instead of W, write its top K singular values and right singular
        /// vectors (singular_values.npy, singular_vectors.npy, b.npy,
        /// summary.json; with --heatmap, svd/instance_K.png), computed
        /// matrix-free: W is never formed. One model; K ≤ 256.
        #[arg(long, value_name = "K")]
        svd: Option<usize>,
    },
    /// The linear region around each instance (Lemma 1): exact ℓ2/ℓ∞ radius,
    /// binding boundary, sampled verification. Smooth networks get a
    /// linearization-error sweep instead.
    Region {
        /// ONNX model.
        model: PathBuf,
        /// Input (.npy or IDX .gz).
        #[arg(long)]
        input: PathBuf,
        /// Which radii to report.
        #[arg(long, default_value_t = Norm::Both, value_parser = named::<Norm>(&["l2", "linf", "both"]))]
        norm: Norm,
        /// Points to sample inside each ball (and one past the boundary).
        #[arg(long, default_value_t = 0)]
        verify: usize,
        /// Input bounds lo,hi (e.g. 0,1 for pixels).
        #[arg(long, allow_hyphen_values = true)]
        r#box: Option<String>,
        /// Also write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Output directory (region.json, direction.npy, direction_linf.npy).
        #[arg(long, default_value = "nnlin-region")]
        out: PathBuf,
        /// Only the first N instances.
        #[arg(long)]
        limit: Option<usize>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The paper's decomposition table: predictions of F(x), of W·x alone
    /// and of b alone against the labels, over a data set.
    Decompose {
        /// ONNX model.
        model: PathBuf,
        /// Instances (.npy or IDX .gz).
        #[arg(long)]
        data: PathBuf,
        /// Labels (.npy or IDX .gz).
        #[arg(long)]
        labels: PathBuf,
        /// Only the first N instances.
        #[arg(long)]
        limit: Option<usize>,
        /// Write the JSON table here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the markdown table here.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Activation mode.
        #[arg(long, default_value_t = Mode::Tangent, value_parser = named::<Mode>(&["tangent", "secant"]))]
        mode: Mode,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Per-neuron maps (the paper's Fig. 7): for every layer, the neurons
    /// contributing most positively and negatively to the predicted class,
    /// each with its own input map; a PNG grid and JSON per instance.
    Neurons {
        /// ONNX model.
        model: PathBuf,
        /// Input (.npy, IDX with [A..B], PNG/JPEG, CSV).
        #[arg(long)]
        input: PathBuf,
        /// Neurons per sign and layer.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Output directory.
        #[arg(long, default_value = "nnlin-neurons")]
        out: PathBuf,
        /// Only the first N instances.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Print the candidate composition plans for the first instance and
    /// their predicted cost (multiply-adds by kernel kind, seconds).
    Plan {
        /// ONNX model.
        model: PathBuf,
        /// Input.
        #[arg(long)]
        input: PathBuf,
        /// Rows of W (as for explain).
        #[arg(long, default_value = "all")]
        rows: String,
        /// Kernel throughputs gemm,sparse (multiply-adds per second) and memory
        /// bandwidth (bytes per second); default: the calibration file, else
        /// measured now.
        #[arg(long)]
        rates: Option<String>,
        /// Threads `explain` would run the input's instances on, for the
        /// batch width (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Measure this machine's kernel throughputs for the cost model and store
    /// them (NNLIN_CALIBRATION or ~/.config/nnlin/calibration.json).
    Calibrate {
        /// Where to write (default: the calibration path).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a model's layers; with --input, every compiled operator and the
    /// activation pattern of the first instance.
    Inspect {
        /// ONNX model.
        model: PathBuf,
        /// Input .npy.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Activation mode for the compiled operators.
        #[arg(long, default_value_t = Mode::Tangent, value_parser = named::<Mode>(&["tangent", "secant"]))]
        mode: Mode,
        /// How convolutions are shown (the explicit CSR Toeplitz matrix by default).
        #[arg(long, default_value_t = ConvKernel::Csr, value_parser = named::<ConvKernel>(&["auto", "csr", "structured"]))]
        conv_kernel: ConvKernel,
        /// The input shape (e.g. 1,3,48,48) fixing dynamic dimensions when
        /// no --input is given.
        #[arg(long)]
        input_shape: Option<String>,
    },
}

/// Escapes control characters (a model's node names reach error lines).
fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes to stdout. A closed pipe ends the process with 141 (128 +
/// SIGPIPE, what a shell reports for a command cut off by `head`) and no
/// message; any other write error with one line. Every file the command
/// writes is committed before its summary is printed, so nothing is lost.
fn stdout_write(args: std::fmt::Arguments, newline: bool) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let r = o.write_fmt(args).and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = r.and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("nnlin: error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

fn main() -> ExitCode {
    // a bug must still end in one line (exit code 101 says it was a bug)
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at =
            info.location().map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!(
            "nnlin: internal error: {}{at} (a bug: please report it with the command)",
            escape_controls(&msg.replace('\n', " "))
        );
    }));
    let cli = Cli::parse();
    let budget = match cli.max_memory.as_deref().map(io::parse_bytes) {
        None => io::default_budget(),
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            eprintln!("nnlin: error: {}", escape_controls(&e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    io::set_budget(budget);
    io::set_output(cli.output.clone());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // one line: the chain of causes, skipping a cause whose text its
            // parent already shows
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    if !msg.is_empty() {
                        msg.push_str(": ");
                    }
                    msg.push_str(&text);
                }
            }
            eprintln!("nnlin: error: {}", escape_controls(&msg.replace('\n', " ")));
            ExitCode::FAILURE
        }
    }
}

/// The bundled demo: LeNet-5 on the first MNIST test digits.
fn demo() -> Result<()> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures");
    let model = root.join("cnn/lenet5.onnx");
    let data = root.join("data/mnist/t10k-images-idx3-ubyte.gz[0..4]");
    outln!("nnlin demo: LeNet-5 (fixtures/cnn/lenet5.onnx) on the first 4 MNIST test digits");
    let out = PathBuf::from("nnlin-out");
    explain(ExplainArgs {
        models: vec![model],
        weights: None,
        input: data,
        out: out.clone(),
        mode: Mode::Tangent,
        precision: Precision::F64,
        rows: "top3".into(),
        strategy: Strategy::Auto,
        threads: None,
        batch: Batch::Auto,
        conv_kernel: ConvKernel::Auto,
        heatmap: true,
        then: vec![],
        resize: false,
        svd: None,
    })?;
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    for inst in summary["instances"].as_array().into_iter().flatten() {
        outln!("\ndigit {}: predicted {}", inst["index"], inst["predicted"]);
        outln!("  {:>5} {:>10} {:>10} {:>10}", "class", "F(x)", "W·x", "b");
        for (i, r) in inst["rows"].as_array().into_iter().flatten().enumerate() {
            let (wx, b) =
                (inst["wx"][i].as_f64().unwrap_or(0.0), inst["b"][i].as_f64().unwrap_or(0.0));
            let f = inst["output"][r.as_u64().unwrap_or(0) as usize].as_f64().unwrap_or(0.0);
            outln!("  {:>5} {:>10.4} {:>10.4} {:>10.4}", r.as_u64().unwrap_or(0), f, wx, b);
        }
        outln!("  max |W·x + b − F(x)| = {:.1e}", inst["residual"].as_f64().unwrap_or(0.0));
    }
    outln!(
        "\nheat maps: {}/heatmaps/instance_*.png (W rows and W⊙x beside each digit)",
        out.display()
    );
    outln!("W, b and the summary: {}/W.npy, b.npy, summary.json", out.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else { return demo() };
    match command {
        Command::Explain {
            models,
            weights,
            input,
            out,
            mode,
            precision,
            rows,
            strategy,
            threads,
            batch,
            conv_kernel,
            heatmap,
            then,
            resize,
            svd,
        } => explain(ExplainArgs {
            models,
            weights: weights.map(|w| io::parse_numbers(&w, "--weights")).transpose()?,
            input,
            out,
            mode,
            precision,
            rows,
            strategy,
            threads,
            batch,
            conv_kernel,
            heatmap,
            then,
            resize,
            svd,
        }),
        Command::Region { model, input, norm, verify, r#box, json, out, limit, threads } => {
            region::run(region::Args {
                model,
                input,
                norm,
                verify,
                input_box: r#box.map(|b| io::parse_numbers(&b, "--box")).transpose()?,
                json,
                out,
                limit,
                threads,
            })
        }
        Command::Decompose { model, data, labels, limit, json, markdown, mode, threads } => {
            decompose::run(decompose::Args {
                model,
                data,
                labels,
                limit,
                json,
                markdown,
                mode,
                threads,
            })
        }
        Command::Neurons { model, input, top, out, limit } => {
            neurons::run(neurons::Args { model, input, top, out, limit })
        }
        Command::Plan { model, input, rows, rates, threads } => {
            let rates = rates.map(|r| io::parse_numbers(&r, "--rates")).transpose()?;
            let threads = match threads {
                Some(0) => bail!("--threads must be at least 1"),
                Some(t) => t,
                None => rayon::current_num_threads().max(1),
            };
            plan_cmd(&model, &input, &rows, rates, threads)
        }
        Command::Calibrate { out } => {
            let r = nnlin::plan::Rates::measure();
            let path = out
                .or_else(io::calibration_path)
                .ok_or_else(|| anyhow::anyhow!("no HOME; pass --out"))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let v = json!({
                "gemm_madds_per_second": r.gemm,
                "sparse_madds_per_second": r.sparse,
                "bytes_per_second": r.bandwidth,
            });
            output::write_json_atomic(&path, &v)?;
            outln!(
                "gemm {:.3e} multiply-adds/s, sparse {:.3e} multiply-adds/s, memory {:.3e} bytes/s; wrote {}",
                r.gemm,
                r.sparse,
                r.bandwidth,
                path.display()
            );
            Ok(())
        }
        Command::Inspect { model, input, mode, conv_kernel, input_shape } => {
            match input_shape {
                Some(s) => io::set_input_shape(Some(
                    io::parse_numbers(&s, "--input-shape")?
                        .iter()
                        .map(|&v| {
                            if v >= 1.0 && v.fract() == 0.0 && v < 2f64.powi(40) {
                                Ok(v as usize)
                            } else {
                                bail!("--input-shape: {v} is not a dimension")
                            }
                        })
                        .collect::<Result<Vec<_>>>()?,
                )),
                None => io::set_input_file(input.as_deref()),
            }
            inspect(&model, input.as_deref(), mode, conv_kernel)
        }
    }
}

struct ExplainArgs {
    models: Vec<PathBuf>,
    weights: Option<Vec<f64>>,
    input: PathBuf,
    out: PathBuf,
    mode: Mode,
    precision: Precision,
    rows: String,
    strategy: Strategy,
    threads: Option<usize>,
    batch: Batch,
    conv_kernel: ConvKernel,
    heatmap: bool,
    then: Vec<PathBuf>,
    resize: bool,
    svd: Option<usize>,
}

fn load_ensemble(
    models: &[PathBuf],
    weights: Option<Vec<f64>>,
    kernel: ConvKernel,
) -> Result<Ensemble> {
    let weights = match weights {
        None => vec![1.0; models.len()],
        Some(w) if w.len() == models.len() => w,
        Some(w) => bail!("--weights has {} values for {} models", w.len(), models.len()),
    };
    let mut members = Vec::with_capacity(models.len());
    for (path, a) in models.iter().zip(weights) {
        members.push((io::load_model(path, kernel)?, a));
    }
    Ok(Ensemble::new(members)?)
}

fn explain(args: ExplainArgs) -> Result<()> {
    let rows: Rows = args.rows.parse().map_err(anyhow::Error::msg)?;
    io::set_input_file(Some(&args.input));
    // the import decodes its tensors on these threads too
    let pool = crate::io::thread_pool(args.threads)?;
    let ens = pool.install(|| load_ensemble(&args.models, args.weights, args.conv_kernel))?;
    // `--then` models read the first one's output, not the input file
    io::set_input_file(None);
    let mut then = Vec::with_capacity(args.then.len());
    for p in &args.then {
        then.push(pool.install(|| io::load_model_at(p, args.conv_kernel, None))?);
    }
    let pipeline = nnlin::Pipeline::new(ens.clone(), then)?;
    let first = &ens.members()[0].0;
    let xs = io::read_instances_opts(&args.input, first.input_shape(), args.resize)?;
    let strategy = args.strategy;
    let f32_out = args.precision == Precision::F32;
    let mut opts = Options::new()
        .with_mode(args.mode)
        .with_strategy(strategy)
        .with_rows(rows)
        .with_precision(args.precision)
        .with_batch(args.batch)
        .with_max_memory(io::budget());
    if matches!(strategy, Strategy::Auto | Strategy::Dp) {
        // the rates `nnlin calibrate` stored, or this machine's, measured
        // only if the plan depends on them
        opts = match io::stored_rates() {
            Some(r) => opts.with_rates(r),
            None => opts.with_measured_rates(),
        };
    }
    let threads = pool.current_num_threads();
    if let Some(k) = args.svd {
        if !(1..=256).contains(&k) {
            bail!("--svd takes K from 1 to 256, got {k}");
        }
        if ens.members().len() > 1 || !pipeline.then().is_empty() {
            bail!("--svd takes one model (no ensemble, no --then)");
        }
        return svd::run(svd::Args {
            model: first,
            xs: &xs,
            opts: &opts,
            k,
            heatmap: args.heatmap,
            f32_out,
            threads,
            out: &args.out,
            input: &args.input,
            pool: &pool,
        });
    }
    let (n_inst, n) = xs.dim();
    let m = opts.rows.count(pipeline.output_len())?;
    let heatmap_cell = if args.heatmap {
        let (_, img_h, img_w) = heatmap::geometry(first.input_shape());
        let cell = (112 / img_h.max(img_w).max(1)).clamp(2, 32) as u64;
        heatmap::check_canvas(first.input_shape(), cell, 3, m as u64, (80, 26))?;
        true
    } else {
        false
    };

    // W goes to disk as each instance is formed: memory holds what the
    // threads work on, not N instances
    let w_spool = output::Spool::create(&args.out, "W.npy", &[n_inst, m, n], f32_out)?;
    struct Formed {
        rows: Vec<usize>,
        wx: Vec<f64>,
        b: Vec<f64>,
        direction: nnlin::Direction,
        plans: Vec<String>,
        batch: usize,
        pattern: Vec<serde_json::Value>,
        w_rows: Option<Vec<Vec<f64>>>,
    }
    let formed: Vec<std::sync::Mutex<Option<Formed>>> =
        (0..n_inst).map(|_| std::sync::Mutex::new(None)).collect();
    let start = Instant::now();
    pool.install(|| {
        pipeline.linearize_batch_with(xs.view(), &opts, &|k, lin| {
            // (in memory order: W is formed column-major)
            if lin.w.fold(false, |a, v| a | !v.is_finite()) || lin.b.iter().any(|v| !v.is_finite()) {
                return Err(nnlin::Error::Caller(
                    format!("instance {k}: W or b holds a non-finite value (an overflow: check the ensemble weights and the model's scale); nothing was written").into(),
                ));
            }
            w_spool.write(k, lin.w.view()).map_err(|e| nnlin::Error::Caller(e.into()))?;
            let x = xs.row(k);
            let wx = lin.wx(x.as_slice().expect("contiguous"));
            let w_rows = heatmap_cell.then(|| lin.w.rows().into_iter().map(|r| r.to_vec()).collect());
            let pattern = lin.pattern.iter().map(|p| json!({"model": p.model, "layer": p.layer, "active": p.active, "total": p.total})).collect();
            let plans = lin.plans.iter().map(ToString::to_string).collect();
            let f = Formed {
                rows: lin.rows,
                wx,
                b: lin.b.to_vec(),
                direction: lin.direction,
                plans,
                batch: lin.batch,
                pattern,
                w_rows,
            };
            *formed[k].lock().expect("one writer per slot") = Some(f);
            Ok(())
        })
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let formed: Vec<Formed> = formed
        .into_iter()
        .map(|f| f.into_inner().expect("no poisoned slot").expect("every instance formed"))
        .collect();
    // F(x) by the reference interpreter, independent of the compiled path
    let outputs: Vec<Vec<f64>> = pool.install(|| {
        use rayon::prelude::*;
        (0..n_inst)
            .into_par_iter()
            .map(|k| pipeline.forward_reference(&xs.row(k).to_vec()))
            .collect()
    });
    let mut b = Array2::<f64>::zeros((n_inst, m));
    let mut instances = Vec::with_capacity(n_inst);
    let mut extra = vec![];
    for (k, (fm, f)) in formed.iter().zip(&outputs).enumerate() {
        let residual = nnlin::residual(&fm.wx, &fm.b, &fm.rows, f);
        b.row_mut(k).assign(&ndarray::ArrayView1::from(&fm.b));
        let predicted = (!f.is_empty()).then(|| nnlin::argmax(f));
        instances.push(json!({
            "index": k,
            "output": f,
            "predicted": predicted,
            "rows": fm.rows,
            "wx": fm.wx,
            "b": fm.b,
            "residual": residual,
            "direction": format!("{:?}", fm.direction).to_lowercase(),
            "plan": fm.plans,
            "batch": fm.batch,
            "active_units": fm.pattern,
        }));
        if let Some(w_rows) = &fm.w_rows {
            let rows: Vec<(usize, Vec<f64>, f64, f64, f64)> = fm
                .rows
                .iter()
                .enumerate()
                .map(|(i, &r)| (r, w_rows[i].clone(), fm.wx[i] + fm.b[i], fm.wx[i], fm.b[i]))
                .collect();
            let title = format!("INSTANCE {k}  PREDICTED {}", instances[k]["predicted"]);
            let png = heatmap::render(first.input_shape(), &xs.row(k).to_vec(), &rows, &title);
            extra.push((format!("heatmaps/instance_{k}.png"), output::Payload::Bytes(png)));
        }
    }
    let skipped: Vec<_> = ens
        .members()
        .iter()
        .map(|(m, _)| m)
        .chain(pipeline.then())
        .filter_map(|m| m.info().skipped_softmax.as_ref().map(|s| (m.name(), s)))
        .map(|(name, op)| format!("{name}: trailing {op} skipped; W and b explain the logits"))
        .collect();
    let summary = json!({
        "nnlin_version": env!("CARGO_PKG_VERSION"),
        "then": pipeline.then().iter().map(|m| m.name().to_string()).collect::<Vec<_>>(),
        "models": ens.members().iter().map(|(m, a)| json!({
            "path": m.name(),
            "weight": a,
            "opset": m.info().opset,
            "producer": m.info().producer,
            "skipped_softmax": m.info().skipped_softmax,
            "output": m.info().output_name,
        })).collect::<Vec<_>>(),
        "notes": skipped,
        "input": args.input.display().to_string(),
        "input_shape": first.input_shape(),
        "n": n,
        "m": m,
        "instances_count": n_inst,
        "mode": args.mode.to_string(),
        "precision": args.precision.to_string(),
        "strategy": args.strategy.to_string(),
        "batch": args.batch.to_string(),
        "rows": args.rows,
        "threads": threads,
        "timing": { "linearize_seconds": seconds },
        "instances": instances,
    });
    output::write_outputs(&args.out, &w_spool, &b, f32_out, &summary, &extra)?;
    for s in &skipped {
        eprintln!("nnlin: note: {}", escape_controls(s));
    }
    let worst = instances.iter().map(|i| i["residual"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max);
    outln!(
        "nnlin: {n_inst} instance(s), W {m}×{n}, max |W·x + b − F(x)| = {worst:.3e}, {seconds:.4} s; wrote {}",
        args.out.display()
    );
    // the process ends next: the models' memory (weights and compiled
    // operators, 0.5 GB for ResNet-50 at 224²) goes back to the OS with it
    // instead of being freed page by page first (60 ms there); the models
    // hold no files or other state that a drop would release
    std::mem::forget((pipeline, ens));
    Ok(())
}

fn plan_cmd(
    model: &std::path::Path,
    input: &std::path::Path,
    rows: &str,
    rates: Option<Vec<f64>>,
    threads: usize,
) -> Result<()> {
    io::set_input_file(Some(input));
    let m = io::load_model(model, ConvKernel::Auto)?;
    let xs = io::read_instances(input, m.input_shape())?;
    let rows: Rows = rows.parse().map_err(anyhow::Error::msg)?;
    let count = rows.count(m.output_len())?;
    let rates = match rates.as_deref() {
        None => io::rates(),
        Some([g, s, b]) if *g > 0.0 && *s > 0.0 && *b > 0.0 => {
            nnlin::plan::Rates { gemm: *g, sparse: *s, bandwidth: *b }
        }
        Some(v) => bail!("--rates takes gemm,sparse,bandwidth (three positive numbers), got {v:?}"),
    };
    let inst = m.compile_instance(&xs.row(0).to_vec(), Mode::Tangent)?;
    let (text, best) = nnlin::plan::describe(&inst, count, &rates);
    outln!(
        "model: {}",
        model.file_name().map_or(String::new(), |f| f.to_string_lossy().into_owned())
    );
    outln!("W: {count} x {}", m.input_len());
    out!("{text}");
    outln!("chosen: {best}");
    // the batch width `explain --batch auto` takes for this input's instances
    let n = xs.nrows();
    if best == "reverse" {
        let most = n.div_ceil(threads).min(nnlin::plan::MAX_BATCH);
        let priced: Vec<String> = std::iter::successors(Some(1usize), |w| Some(w * 2))
            .take_while(|&w| w == 1 || w <= most)
            .map(|w| {
                let s = nnlin::plan::batch_seconds(&inst, count, w, &rates);
                format!("{w}: {s:.3e} s")
            })
            .collect();
        let w = nnlin::plan::batch_width(&inst, count, n, threads, &rates, io::budget());
        outln!(
            "batch width for {n} instance(s) on {threads} thread(s): {w} (per instance: {})",
            priced.join(", ")
        );
    } else {
        outln!("batch width: 1 (batches run reverse accumulation only)");
    }
    Ok(())
}

fn inspect(
    path: &std::path::Path,
    input: Option<&std::path::Path>,
    mode: Mode,
    kernel: ConvKernel,
) -> Result<()> {
    // convolutions shown as CSR are reported from their geometry (nnz and
    // storage computed exactly), never built: explicit Toeplitz matrices of a
    // 224×224 network would take tens of gigabytes
    let show_csr = kernel == ConvKernel::Csr;
    let model = io::load_model(path, if show_csr { ConvKernel::Structured } else { kernel })?;
    let net = model.network();
    let imp = model.info();
    outln!("model: {}", path.display());
    outln!("opset: {}   producer: {}", imp.opset, imp.producer);
    outln!(
        "input: `{}` {:?}   output: `{}` {:?}",
        imp.input_name,
        net.input_shape(),
        imp.output_name,
        net.output_shape()
    );
    if let Some(op) = &imp.skipped_softmax {
        outln!("note: trailing {op} skipped; the logits are explained");
    }
    outln!(
        "\n{:<4} {:<28} {:<11} {:<18} {:>10}  from / function",
        "#",
        "layer",
        "kind",
        "output shape",
        "params"
    );
    let mut total = 0;
    for (i, node) in net.nodes().iter().enumerate() {
        let detail = match &node.layer {
            nnlin::ir::Layer::Activation(a) => format!(
                "{} [{}]",
                a.expr,
                if a.is_piecewise_linear() { "piecewise linear" } else { "smooth" }
            ),
            _ => node.source.clone(),
        };
        total += node.layer.param_count();
        outln!(
            "{:<4} {:<28} {:<11} {:<18} {:>10}  {}",
            i,
            node.name,
            node.layer.kind(),
            format!("{:?}", net.shape(node.output)),
            node.layer.param_count(),
            detail
        );
    }
    outln!("total parameters: {total}");
    if let Some(input) = input {
        let xs = io::read_instances(input, model.input_shape())?;
        let x = xs.row(0).to_vec();
        let inst = model.compile_instance(&x, mode)?;
        outln!("\ncompiled operators at instance 0 ({:?} mode):", mode);
        outln!(
            "{:<4} {:<28} {:<10} {:<12} {:>10} {:>12}  active units",
            "#",
            "layer",
            "operator",
            "shape",
            "nnz",
            "bytes"
        );
        for (i, l) in inst.layers.iter().enumerate() {
            let active = l.active.as_ref().map_or(String::new(), |m| {
                format!("{}/{}", m.iter().filter(|&&b| b).count(), m.len())
            });
            for (k, (_, op)) in l.inputs.iter().enumerate() {
                let (kind, bytes) = match &**op {
                    nnlin::linalg::Operator::Conv(_) if show_csr => {
                        let (f, u) = (size_of::<f64>(), size_of::<usize>());
                        ("csr", op.nnz() * (f + u) + (op.nrows() + 1) * u)
                    }
                    _ => (op.kind(), op.bytes()),
                };
                outln!(
                    "{:<4} {:<28} {:<10} {:<12} {:>10} {:>12}  {}",
                    if k == 0 { i.to_string() } else { String::new() },
                    if k == 0 { l.name.as_str() } else { "" },
                    kind,
                    format!("{}×{}", op.nrows(), op.ncols()),
                    op.nnz(),
                    bytes,
                    if k == 0 { active.as_str() } else { "" }
                );
            }
        }
    }
    Ok(())
}
