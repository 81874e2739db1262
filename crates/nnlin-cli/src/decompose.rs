//! `nnlin decompose`: the source paper's Tables 1–4. For every instance the
//! argmax of F(x), of W·x alone and of b alone; accuracies against the
//! labels and label-flip rates against F's prediction. Only what the table
//! needs is computed: W·x and b come from two matrix–vector passes through
//! the frozen operators, W itself is never formed.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, bail};
use nnlin::Mode;
use serde_json::json;

pub struct Args {
    pub model: PathBuf,
    pub data: PathBuf,
    pub labels: PathBuf,
    pub limit: Option<usize>,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub mode: Mode,
    pub threads: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    crate::io::set_input_file(Some(&args.data));
    // the import decodes its tensors on these threads too
    let pool = crate::io::thread_pool(args.threads)?;
    let model = pool.install(|| crate::io::load_model(&args.model, nnlin::ConvKernel::Auto))?;
    let xs = crate::io::read_instances(&args.data, model.input_shape())?;
    let labels = crate::io::read_labels(&args.labels)?;
    let count = args.limit.unwrap_or(usize::MAX).min(xs.nrows());
    if labels.len() < count {
        bail!("{} labels for {count} instances", labels.len());
    }
    if count == 0 {
        bail!("no instances");
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(count as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let start = std::time::Instant::now();
    let xs = xs.slice_axis(ndarray::Axis(0), ndarray::Slice::from(..count));
    let table =
        pool.install(|| model.decompose(xs, &labels[..count], args.mode, &|| bar.inc(1)))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let j = json!({
        "n": table.n,
        "accuracy": table.accuracy,
        "wx_accuracy": table.wx_accuracy,
        "wx_lfr": table.wx_lfr,
        "b_accuracy": table.b_accuracy,
        "b_lfr": table.b_lfr,
    });
    let md = format!(
        "| model | n | accuracy | W·x accuracy | W·x LFR | b accuracy | b LFR |\n|---|---|---|---|---|---|---|\n| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
        args.model.file_name().map_or(String::new(), |f| f.to_string_lossy().into_owned()),
        table.n,
        table.accuracy,
        table.wx_accuracy,
        table.wx_lfr,
        table.b_accuracy,
        table.b_lfr
    );
    use crate::output::{Payload, Target};
    let (jp, mp) = (Payload::Json(&j), Payload::Bytes(md.clone().into_bytes()));
    let mut targets = vec![];
    if let Some(p) = &args.json {
        targets.push(Target::File(p, &jp));
    }
    if let Some(p) = &args.markdown {
        targets.push(Target::File(p, &mp));
    }
    crate::output::commit(&targets)?;
    out!("{md}");
    eprintln!("nnlin: {count} instances in {seconds:.2} s");
    Ok(())
}
