//! The CLI's input files: `.npy`, IDX (optionally gzip), images, CSV.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{Array2, ArrayD, Ix2};
use ndarray_npy::ReadNpyExt;

fn squeeze(s: &[usize]) -> Vec<usize> {
    s.iter().copied().filter(|&d| d != 1).collect()
}

/// The memory budget of this process (`--max-memory`), set once by `main`.
static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Sets the memory budget every input buffer is checked against.
pub fn set_budget(bytes: usize) {
    let _ = BUDGET.set(bytes);
}

/// The memory budget in bytes.
pub fn budget() -> usize {
    BUDGET.get().copied().unwrap_or(usize::MAX)
}

/// Checks that `count` values, held as `f64`, fit the budget; returns
/// `count`.
pub fn check_budget(what: &str, count: Option<usize>) -> Result<usize> {
    match count.and_then(|c| c.checked_mul(8)) {
        Some(b) if b <= budget() => Ok(count.unwrap_or(0)),
        Some(b) => bail!(
            "{what} needs {b} bytes, above the memory budget of {} bytes (--max-memory)",
            budget()
        ),
        None => bail!("{what} has more elements than memory can hold"),
    }
}

/// Reads exactly `len` bytes from `r`, or says how many there were.
fn read_exactly(r: &mut dyn std::io::Read, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    // `take` bounds the read: a gzip bomb stops at what the header states
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut *r, len as u64), &mut buf)
        .with_context(|| format!("bad gzip data in {what}"))?;
    if buf.len() < len {
        bail!("truncated {what}: the header states {len} bytes, the file holds {}", buf.len());
    }
    Ok(buf)
}

/// A reader of the file's bytes, decompressed where they are gzip.
fn maybe_gunzip(bytes: &[u8]) -> Box<dyn std::io::Read + '_> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    }
}

/// The IDX header: element type, dimensions, and the data's byte count
/// (checked against overflow and the memory budget).
fn idx_header(r: &mut dyn std::io::Read) -> Result<(u8, Vec<usize>, usize)> {
    let head = read_exactly(r, 4, "IDX header")?;
    if head[0] != 0 || head[1] != 0 {
        bail!("not an IDX file (bad magic number)");
    }
    let (ty, ndim) = (head[2], usize::from(head[3]));
    let dims_raw = read_exactly(r, 4 * ndim, "IDX header")?;
    let dims: Vec<usize> = dims_raw
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let width = match ty {
        0x08 => 1,
        0x0D => 4,
        0x0E => 8,
        other => bail!("unsupported IDX element type 0x{other:02x}"),
    };
    let count =
        check_budget(&format!("IDX data of shape {dims:?}"), nnlin::ir::checked_numel(&dims))?;
    Ok((ty, dims, count * width))
}

/// Reads an IDX file (optionally gzip-compressed); unsigned-byte data is
/// scaled to [0, 1] (pixels / 255), as MNIST models are trained. Only the
/// bytes the header states are decompressed.
pub fn read_idx(bytes: &[u8]) -> Result<ArrayD<f64>> {
    let mut r = maybe_gunzip(bytes);
    let (ty, dims, len) = idx_header(&mut *r)?;
    let data = read_exactly(&mut *r, len, "IDX data")?;
    let values: Vec<f64> = match ty {
        0x08 => data.iter().map(|&v| f64::from(v) / 255.0).collect(),
        0x0D => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => data
            .chunks_exact(8)
            .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    };
    Ok(ArrayD::from_shape_vec(dims, values)?)
}

/// What a `.npy` header states: the dtype and the shape.
struct NpyHeader {
    descr: String,
    shape: Vec<usize>,
}

/// Parses and checks a `.npy` header against the bytes present, so that no
/// reader allocates what the file does not hold.
fn npy_header(bytes: &[u8], path: &Path) -> Result<NpyHeader> {
    let p = path.display();
    if !bytes.starts_with(b"\x93NUMPY") {
        bail!("`{p}` is not a .npy file (bad magic string)");
    }
    let (len, start): (Option<usize>, usize) = match bytes.get(6) {
        Some(1) => (bytes.get(8..10).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))), 10),
        Some(2 | 3) => {
            (bytes.get(8..12).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize), 12)
        }
        _ => bail!("`{p}`: unsupported .npy format version"),
    };
    let header = len
        .and_then(|l| bytes.get(start..start.checked_add(l)?))
        .with_context(|| format!("`{p}`: truncated .npy header"))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr")
        .and_then(|r| {
            let q = r.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            let body = r.strip_prefix(q)?;
            Some(body.split_once(q)?.0.to_string())
        })
        .with_context(|| format!("`{p}`: the .npy header has no 'descr'"))?;
    let shape_text = field("shape")
        .and_then(|r| Some(r.strip_prefix('(')?.split_once(')')?.0.to_string()))
        .with_context(|| format!("`{p}`: the .npy header has no 'shape'"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow::anyhow!("`{p}`: bad .npy shape ({shape_text})"))?;
    let width = match descr.get(1..) {
        Some("f8" | "i8" | "u8") => 8,
        Some("f4" | "i4" | "u4") => 4,
        Some("i2" | "u2" | "f2") => 2,
        Some("i1" | "u1" | "b1") => 1,
        _ if descr.contains('O') => {
            bail!("`{p}` holds Python objects (dtype '{descr}'); nnlin never unpickles")
        }
        _ => bail!("`{p}`: unsupported .npy dtype '{descr}'"),
    };
    let data_start = start + len.unwrap_or(0);
    let count = nnlin::ir::checked_numel(&shape);
    let need = count.and_then(|c| c.checked_mul(width));
    let have = bytes.len().saturating_sub(data_start);
    match need {
        Some(n) if n <= have => {}
        Some(n) => bail!(
            "`{p}` is truncated: its header states shape {shape:?} of '{descr}' ({n} bytes), the file holds {have}"
        ),
        None => bail!("`{p}`: the .npy shape {shape:?} has more elements than memory can hold"),
    }
    check_budget(&format!("`{p}`"), count)?;
    Ok(NpyHeader { descr, shape })
}

/// Reads labels: an IDX unsigned-byte vector (optionally `.gz`) or an
/// integer/float `.npy` vector.
pub fn read_labels(path: &Path) -> Result<Vec<usize>> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read labels `{}`", path.display()))?;
    parse_labels(&bytes, path)
}

/// [`read_labels`] of bytes already read; `path` names the format (IDX or
/// `.npy`) and appears in errors.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<usize>> {
    let p = path.display();
    if is_idx(path) {
        let mut r = maybe_gunzip(bytes);
        let (ty, dims, len) = idx_header(&mut *r).with_context(|| format!("`{p}`"))?;
        if ty != 0x08 || dims.len() != 1 {
            bail!("`{p}` is not a 1-D unsigned-byte IDX label file");
        }
        let labels = read_exactly(&mut *r, len, "IDX labels").with_context(|| format!("`{p}`"))?;
        return Ok(labels.iter().map(|&v| usize::from(v)).collect());
    }
    let header = npy_header(bytes, path)?;
    if header.shape.len() != 1 {
        bail!("`{p}`: labels must be a 1-D array, got shape {:?}", header.shape);
    }
    if header.descr.contains('i') || header.descr.contains('u') {
        let a = ndarray::Array1::<i64>::read_npy(bytes)
            .with_context(|| format!("`{p}`: labels must be int64 or float"))?;
        return a
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                usize::try_from(v)
                    .map_err(|_| anyhow::anyhow!("`{p}`: label {v} at index {i} is negative"))
            })
            .collect();
    }
    let a = read_npy_any(bytes, path)?;
    a.iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX) {
                Ok(v as usize)
            } else {
                let v = if v.abs() >= 1e15 { format!("{v:e}") } else { format!("{v}") };
                bail!("`{p}`: label {v} at index {i} is not a class index (a non-negative integer)")
            }
        })
        .collect()
}

fn is_image(path: &Path) -> bool {
    let lower = path.to_string_lossy().to_lowercase();
    lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

fn is_idx(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    name.ends_with(".gz") || name.contains("idx") || name.ends_with("-ubyte")
}

/// Reads a float32/float64 `.npy` file's bytes as `f64`; the header is
/// checked against the bytes present first.
pub fn read_npy_any(bytes: &[u8], path: &Path) -> Result<ArrayD<f64>> {
    let header = npy_header(bytes, path)?;
    let bad = |e: ndarray_npy::ReadNpyError| {
        anyhow::anyhow!("`{}`: cannot read the .npy data ({e})", path.display())
    };
    Ok(match header.descr.as_str() {
        "<f8" | "=f8" | ">f8" => ArrayD::<f64>::read_npy(bytes).map_err(bad)?,
        "<f4" | "=f4" | ">f4" => {
            ArrayD::<f32>::read_npy(bytes).map(|a| a.mapv(f64::from)).map_err(bad)?
        }
        other => {
            bail!("`{}` holds dtype '{other}'; inputs must be float32 or float64", path.display())
        }
    })
}

/// Reads X (`.npy` float32/float64, or IDX, optionally `.gz`, pixels scaled
/// to [0, 1]) as `N × n` instances for a model whose input shape is
/// `model_shape`: one instance (the input shape, with or without its batch
/// dimension of 1) or a batch `(N, ...)`.
pub fn read_instances(path: &Path, model_shape: &[usize]) -> Result<Array2<f64>> {
    read_instances_opts(path, model_shape, false)
}

/// Splits `file[A..B]` / `file[N]` into the file and the instance range.
pub fn split_range(path: &Path) -> Result<(PathBuf, Option<std::ops::Range<usize>>)> {
    let s = path.to_string_lossy();
    if let (true, Some(open)) = (s.ends_with(']'), s.rfind('[')) {
        let spec = &s[open + 1..s.len() - 1];
        let file = PathBuf::from(&s[..open]);
        let bad = || anyhow::anyhow!("bad instance selection `[{spec}]`: use [N] or [A..B]");
        let range = match spec.split_once("..") {
            Some((a, b)) => {
                a.trim().parse::<usize>().map_err(|_| bad())?
                    ..b.trim().parse::<usize>().map_err(|_| bad())?
            }
            None => {
                let n = spec.trim().parse::<usize>().map_err(|_| bad())?;
                n..n.checked_add(1).ok_or_else(bad)?
            }
        };
        if range.is_empty() {
            return Err(bad());
        }
        return Ok((file, Some(range)));
    }
    Ok((path.to_path_buf(), None))
}

/// Reads an image (PNG/JPEG) as `[C, H, W]` in [0, 1]: grayscale for one
/// channel, RGB for three; resized to the model's size only with `resize`.
fn read_image(
    bytes: &[u8],
    path: &Path,
    model_shape: &[usize],
    resize: bool,
) -> Result<ArrayD<f64>> {
    let dims: Vec<usize> = model_shape.iter().copied().skip(1).collect();
    let (c, h, w) = match dims.as_slice() {
        [c, h, w] if *c == 1 || *c == 3 => (*c, *h, *w),
        [h, w] => (1, *h, *w),
        _ => bail!(
            "`{}` is an image but the model input {model_shape:?} is not [1, C, H, W] with C = 1 or 3",
            path.display()
        ),
    };
    let mut img = image::load_from_memory(bytes)
        .with_context(|| format!("cannot decode image `{}`", path.display()))?;
    let have = img.color().channel_count();
    let kind = |n: u8| match n {
        1 => "grayscale",
        2 => "grayscale with alpha",
        3 => "RGB",
        _ => "RGBA",
    };
    if usize::from(have) != c {
        bail!(
            "image `{}` is {} ({have} channels) but the model takes {} ({c} channel{}); convert it first",
            path.display(),
            kind(have),
            kind(c as u8),
            if c == 1 { "" } else { "s" }
        );
    }
    if (img.width() as usize, img.height() as usize) != (w, h) {
        if !resize {
            bail!(
                "image `{}` is {}×{} but the model takes {w}×{h} (pass --resize to resize it)",
                path.display(),
                img.width(),
                img.height()
            );
        }
        img = img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle);
    }
    let mut out = Vec::with_capacity(c * h * w);
    if c == 1 {
        let g = img.to_luma8();
        out.extend(g.pixels().map(|p| f64::from(p.0[0]) / 255.0));
    } else {
        let rgb = img.to_rgb8();
        for ch in 0..3 {
            out.extend(rgb.pixels().map(|p| f64::from(p.0[ch]) / 255.0));
        }
    }
    Ok(ArrayD::from_shape_vec(model_shape.to_vec(), out)?)
}

/// Reads CSV rows: one instance per row, its first `n` numeric fields (a
/// trailing label column is ignored); a non-numeric first row is a header.
fn read_csv(text: &str, path: &Path, n: usize) -> Result<ArrayD<f64>> {
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let nums: Result<Vec<f64>, _> = fields.iter().take(n).map(|f| f.parse::<f64>()).collect();
        match nums {
            Ok(v) if v.len() == n => rows.extend(v),
            _ if i == 0 => continue, // header
            _ => bail!("`{}` line {}: expected {n} numbers", path.display(), i + 1),
        }
    }
    let count = rows.len() / n.max(1);
    Ok(ArrayD::from_shape_vec(vec![count, n], rows)?)
}

/// [`read_instances`] with image resizing allowed.
pub fn read_instances_opts(
    path: &Path,
    model_shape: &[usize],
    resize: bool,
) -> Result<Array2<f64>> {
    let (file, range) = split_range(path)?;
    let path = file.as_path();
    let bytes =
        fs::read(path).with_context(|| format!("cannot read input `{}`", path.display()))?;
    parse_instances(&bytes, path, model_shape, resize, range)
}

/// [`read_instances_opts`] of bytes already read; `path` names the format
/// (by its extension) and appears in errors; `range` selects instances.
pub fn parse_instances(
    bytes: &[u8],
    path: &Path,
    model_shape: &[usize],
    resize: bool,
    range: Option<std::ops::Range<usize>>,
) -> Result<Array2<f64>> {
    let lower = path.to_string_lossy().to_lowercase();
    let n_model: usize = model_shape.iter().product();
    let arr: ArrayD<f64> = if is_idx(path) {
        read_idx(bytes).with_context(|| format!("`{}`", path.display()))?
    } else if is_image(path) {
        read_image(bytes, path, model_shape, resize)?
    } else if lower.ends_with(".csv") {
        read_csv(&String::from_utf8_lossy(bytes), path, n_model)?
    } else {
        read_npy_any(bytes, path)?
    };
    let arr = match range {
        None => arr,
        Some(r) => {
            let count = arr.shape().first().copied().unwrap_or(0);
            if r.end > count {
                bail!(
                    "`{}` holds {count} instances; [{}..{}] is out of range",
                    path.display(),
                    r.start,
                    r.end
                );
            }
            arr.select(ndarray::Axis(0), &r.collect::<Vec<_>>())
        }
    };
    let shape = arr.shape().to_vec();
    let n: usize = model_shape.iter().product();
    let want = squeeze(model_shape);
    let count = if squeeze(&shape) == want {
        1
    } else if !shape.is_empty() && squeeze(&shape[1..]) == want {
        shape[0]
    } else {
        bail!(
            "input `{}` has shape {shape:?}; the model expects {model_shape:?} (one instance) or (N, ...) of it",
            path.display()
        );
    };
    if count == 0 {
        bail!("input `{}` holds no instances", path.display());
    }
    let flat: Vec<f64> = arr.iter().copied().collect();
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        bail!("input `{}` holds a non-finite value (NaN or Inf) at flat index {i}", path.display());
    }
    Ok(Array2::from_shape_vec((count, n), flat)?.into_dimensionality::<Ix2>()?)
}

/// Parses a comma-separated list of finite numbers (`--weights`, `--box`,
/// `--rates`).
pub fn parse_numbers(s: &str, flag: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|t| match t.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => bail!("{flag}: `{}` is not finite (a number is expected)", t.trim()),
        })
        .collect()
}

/// The most worker threads `--threads` may ask for.
pub const MAX_THREADS: usize = 1024;

/// A rayon pool with `threads` workers (all cores by default).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) if t > MAX_THREADS => {
            bail!("--threads {t} is above the limit of {MAX_THREADS}")
        }
        _ => {}
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t);
    }
    builder.build().context("cannot start worker threads")
}

/// Parses a byte size: `123`, `64K`, `512M`, `4G`, `1T` (powers of 1024;
/// a trailing `B` or `iB` is allowed).
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let bad = || anyhow::anyhow!("bad --max-memory `{s}`: expected bytes such as 512M or 4G");
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = v * 2f64.powi(shift);
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(bad());
    }
    Ok(bytes as usize)
}

/// The default memory budget: half of the least of the available memory,
/// the cgroup's remaining limit and the address-space limit (8 GiB where
/// none of them can be read).
pub fn default_budget() -> usize {
    let read = |p: &str| fs::read_to_string(p).ok();
    let field = |text: &str, key: &str| -> Option<u64> {
        text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
    };
    let mut limits: Vec<u64> = vec![];
    if let Some(kb) = read("/proc/meminfo").and_then(|t| field(&t, "MemAvailable:")) {
        limits.push(kb.saturating_mul(1024));
    }
    let cg_max = read("/sys/fs/cgroup/memory.max").and_then(|t| t.trim().parse::<u64>().ok());
    let cg_cur = read("/sys/fs/cgroup/memory.current").and_then(|t| t.trim().parse::<u64>().ok());
    if let Some(max) = cg_max {
        limits.push(max.saturating_sub(cg_cur.unwrap_or(0)));
    }
    if let Some(t) = read("/proc/self/limits")
        && let Some(line) = t.lines().find(|l| l.starts_with("Max address space"))
        && let Some(v) = line.split_whitespace().nth(3).and_then(|v| v.parse::<u64>().ok())
    {
        limits.push(v);
    }
    let least = limits.into_iter().min().unwrap_or(16 << 30);
    usize::try_from(least / 2).unwrap_or(usize::MAX)
}

/// The graph output `--output` names, set once by `main`.
static OUTPUT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Sets the graph output the commands' models are explained at.
pub fn set_output(name: Option<String>) {
    let _ = OUTPUT.set(name);
}

/// What fixes a model's dynamic input dimensions (a fully convolutional
/// detector's size): a shape given on the command line, or the input file,
/// whose header is read only for a model that has such dimensions.
#[derive(Clone)]
enum InputHint {
    Shape(Vec<usize>),
    File(PathBuf),
}

static INPUT_HINT: std::sync::Mutex<Option<InputHint>> = std::sync::Mutex::new(None);

fn set_hint(hint: Option<InputHint>) {
    if let Ok(mut h) = INPUT_HINT.lock() {
        *h = hint;
    }
}

/// Sets the data shape models are imported for (`--input-shape`).
pub fn set_input_shape(shape: Option<Vec<usize>>) {
    set_hint(shape.map(InputHint::Shape));
}

/// Sets the input file whose shape fixes dynamic dimensions, if a model has
/// any (`None`: no input, as for `--then` models).
pub fn set_input_file(path: Option<&Path>) {
    set_hint(path.map(|p| InputHint::File(p.to_path_buf())));
}

/// The shape an input file's header states (`.npy`, IDX, PNG/JPEG as
/// `[C, H, W]`), without reading its data; `None` for other files.
pub fn input_shape_of(path: &Path) -> Option<Vec<usize>> {
    let (file, range) = split_range(path).ok()?;
    let bytes = fs::read(&file).ok()?;
    let lower = file.to_string_lossy().to_lowercase();
    let mut shape = if is_idx(&file) {
        let mut r = maybe_gunzip(&bytes);
        idx_header(&mut *r).ok()?.1
    } else if is_image(&file) {
        // the decoder's header, not the pixels
        use image::ImageDecoder;
        let decoder = image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .ok()?
            .into_decoder()
            .ok()?;
        let (w, h) = decoder.dimensions();
        vec![usize::from(decoder.color_type().channel_count()), h as usize, w as usize]
    } else if lower.ends_with(".npy") {
        npy_header(&bytes, &file).ok()?.shape
    } else {
        return None;
    };
    if let (Some(r), Some(first)) = (range, shape.first_mut()) {
        *first = r.len();
    }
    Some(shape)
}

/// Imports a model (at the `--output` graph output) under the memory
/// budget; with explicit CSR convolutions, checks their storage against the
/// budget before building them.
pub fn load_model(path: &Path, kernel: nnlin::ConvKernel) -> Result<nnlin::Model> {
    load_model_at(path, kernel, OUTPUT.get().cloned().flatten())
}

/// [`load_model`] at the graph output `output` (`None`: the only one).
pub fn load_model_at(
    path: &Path,
    kernel: nnlin::ConvKernel,
    output: Option<String>,
) -> Result<nnlin::Model> {
    let mut opts = nnlin::ImportOptions::default().with_max_bytes(budget());
    if let Some(name) = output {
        opts = opts.with_output(name);
    }
    let hint = INPUT_HINT.lock().ok().and_then(|h| h.clone());
    if let Some(InputHint::Shape(shape)) = &hint {
        opts = opts.with_input_shape(shape.clone());
    }
    let first = nnlin::Model::from_onnx_file_with(path, &opts);
    // dynamic dimensions: only now is the input file's header read
    let shape = match (&first, &hint) {
        (
            Err(nnlin::Error::Onnx { source: nnlin::OnnxError::DynamicInput { .. }, .. }),
            Some(InputHint::File(file)),
        ) => input_shape_of(file),
        _ => None,
    };
    let model = match shape {
        Some(shape) => nnlin::Model::from_onnx_file_with(path, &opts.with_input_shape(shape))?,
        None => first?,
    };
    if kernel == nnlin::ConvKernel::Csr {
        let mut bytes: usize = 0;
        for node in model.network().nodes() {
            if let nnlin::ir::Layer::Conv(c) = &node.layer {
                let w = &c.window;
                let nnz = nnlin::ir::checked_numel(&[
                    c.c_out,
                    c.c_in / c.groups.max(1),
                    w.kh,
                    w.kw,
                    w.oh,
                    w.ow,
                ]);
                bytes = nnz
                    .and_then(|n| n.checked_mul(16))
                    .and_then(|b| bytes.checked_add(b))
                    .unwrap_or(usize::MAX);
            }
        }
        if bytes > budget() {
            bail!(
                "`{}`: explicit CSR convolutions need up to {bytes} bytes, above the memory budget of {} bytes (--max-memory); use --conv-kernel structured",
                path.display(),
                budget()
            );
        }
    }
    Ok(model.with_conv_kernel(kernel))
}

/// Kernel throughputs for the cost model: `NNLIN_CALIBRATION` or
/// `~/.config/nnlin/calibration.json` if `nnlin calibrate` wrote one,
/// otherwise measured once per process.
pub fn rates() -> nnlin::plan::Rates {
    static RATES: std::sync::OnceLock<nnlin::plan::Rates> = std::sync::OnceLock::new();
    *RATES.get_or_init(|| stored_rates().unwrap_or_else(nnlin::plan::Rates::measure))
}

/// Where `nnlin calibrate` stores its figures.
pub fn calibration_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("NNLIN_CALIBRATION") {
        return Some(p.into());
    }
    std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".config/nnlin/calibration.json"))
}

/// The rates `nnlin calibrate` stored, if any.
pub fn stored_rates() -> Option<nnlin::plan::Rates> {
    let text = std::fs::read_to_string(calibration_path()?).ok()?;
    let num = |key: &str| -> Option<f64> {
        let at = text.find(&format!("\"{key}\""))?;
        let rest = &text[at + key.len() + 2..];
        let rest = rest[rest.find(':')? + 1..].trim_start();
        let end =
            rest.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Some(nnlin::plan::Rates {
        gemm: num("gemm_madds_per_second")?,
        sparse: num("sparse_madds_per_second")?,
        bandwidth: num("bytes_per_second")?,
    })
}
