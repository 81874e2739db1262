//! The CLI's file handling: reading inputs, writing outputs atomically.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{Array2, Array3, ArrayD, Ix2};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

fn squeeze(s: &[usize]) -> Vec<usize> {
    s.iter().copied().filter(|&d| d != 1).collect()
}

/// Reads an IDX file (optionally gzip-compressed); unsigned-byte data is
/// scaled to [0, 1] (pixels / 255), as MNIST models are trained.
pub fn read_idx(bytes: &[u8]) -> Result<ArrayD<f64>> {
    let raw = gunzip(bytes)?;
    if raw.len() < 4 || raw[0] != 0 || raw[1] != 0 {
        bail!("not an IDX file (bad magic number)");
    }
    let (ty, ndim) = (raw[2], raw[3] as usize);
    let mut dims = Vec::with_capacity(ndim);
    for i in 0..ndim {
        let b = raw.get(4 + 4 * i..8 + 4 * i).context("truncated IDX header")?;
        dims.push(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    }
    let data = &raw[4 + 4 * ndim..];
    let count: usize = dims.iter().product();
    let short = || anyhow::anyhow!("truncated IDX data");
    let values: Vec<f64> = match ty {
        0x08 => {
            data.get(..count).ok_or_else(short)?.iter().map(|&v| f64::from(v) / 255.0).collect()
        }
        0x0D => data
            .get(..count * 4)
            .ok_or_else(short)?
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        0x0E => data
            .get(..count * 8)
            .ok_or_else(short)?
            .chunks_exact(8)
            .map(|c| f64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => bail!("unsupported IDX element type 0x{other:02x}"),
    };
    Ok(ArrayD::from_shape_vec(dims, values)?)
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)
            .context("bad gzip data")?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Reads labels: an IDX unsigned-byte vector (optionally `.gz`) or an
/// integer/float `.npy` vector.
pub fn read_labels(path: &Path) -> Result<Vec<usize>> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read labels `{}`", path.display()))?;
    if is_idx(path) {
        let raw = gunzip(&bytes)?;
        if raw.len() < 8 || raw[2] != 0x08 || raw[3] != 1 {
            bail!("`{}` is not a 1-D unsigned-byte IDX label file", path.display());
        }
        let n = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
        let labels = raw.get(8..8 + n).context("truncated IDX labels")?;
        return Ok(labels.iter().map(|&v| usize::from(v)).collect());
    }
    if let Ok(a) = ndarray::Array1::<i64>::read_npy(bytes.as_slice()) {
        return a.iter().map(|&v| usize::try_from(v).context("negative label")).collect();
    }
    let a = read_npy_any(&bytes, path)?;
    Ok(a.iter().map(|&v| v as usize).collect())
}

fn is_idx(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    name.ends_with(".gz") || name.contains("idx") || name.ends_with("-ubyte")
}

fn read_npy_any(bytes: &[u8], path: &Path) -> Result<ArrayD<f64>> {
    Ok(match ArrayD::<f64>::read_npy(bytes) {
        Ok(a) => a,
        Err(_) => ArrayD::<f32>::read_npy(bytes).map(|a| a.mapv(f64::from)).map_err(|e| {
            anyhow::anyhow!("`{}` is not a float32/float64 .npy file ({e})", path.display())
        })?,
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
fn split_range(path: &Path) -> Result<(PathBuf, Option<std::ops::Range<usize>>)> {
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
                n..n + 1
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
    let lower = path.to_string_lossy().to_lowercase();
    let n_model: usize = model_shape.iter().product();
    let arr: ArrayD<f64> = if is_idx(path) {
        read_idx(&bytes).with_context(|| format!("`{}`", path.display()))?
    } else if lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg") {
        read_image(&bytes, path, model_shape, resize)?
    } else if lower.ends_with(".csv") {
        read_csv(&String::from_utf8_lossy(&bytes), path, n_model)?
    } else {
        read_npy_any(&bytes, path)?
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

/// One output file's contents.
pub enum Payload<'a> {
    /// A JSON document.
    Json(&'a serde_json::Value),
    /// A 2-D float64 array.
    Npy2(&'a Array2<f64>),
    /// A 2-D array written as float32.
    Npy2F32(&'a Array2<f64>),
    /// A 3-D float64 array.
    Npy3(&'a Array3<f64>),
    /// A 3-D array written as float32.
    Npy3F32(&'a Array3<f64>),
    /// Raw bytes (a PNG).
    Bytes(Vec<u8>),
}

/// Writes `files` into the directory `out` atomically: everything goes to a
/// staging directory beside `out` first, then each file is renamed into
/// place. On failure nothing is left behind and `out` keeps what it had.
pub fn write_files(out: &Path, files: &[(&str, &Payload)]) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("output `{}` exists and is not a directory", out.display());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map_or("nnlin-out".into(), |n| n.to_string_lossy().into_owned());
    let staging = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        fs::create_dir_all(&staging)
            .with_context(|| format!("cannot write output directory `{}`", out.display()))?;
        for (file, payload) in files {
            let p = staging.join(file);
            if let Some(dir) = p.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut fh =
                fs::File::create(&p).with_context(|| format!("cannot create `{}`", p.display()))?;
            match payload {
                Payload::Json(v) => serde_json::to_writer_pretty(&mut fh, v)?,
                Payload::Npy2(a) => a.write_npy(&mut fh)?,
                Payload::Npy2F32(a) => a.mapv(|v| v as f32).write_npy(&mut fh)?,
                Payload::Npy3(a) => a.write_npy(&mut fh)?,
                Payload::Npy3F32(a) => a.mapv(|v| v as f32).write_npy(&mut fh)?,
                Payload::Bytes(b) => std::io::Write::write_all(&mut fh, b)?,
            }
            fh.sync_all()?;
        }
        fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
        for (file, _) in files {
            let dst = out.join(file);
            if let Some(dir) = dst.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::rename(staging.join(file), &dst)
                .with_context(|| format!("cannot move output into `{}`", out.display()))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&staging);
    result
}

/// Writes W.npy, b.npy and summary.json into `out` atomically.
pub fn write_outputs(
    out: &Path,
    w: &Array3<f64>,
    b: &Array2<f64>,
    f32_out: bool,
    summary: &serde_json::Value,
    extra: &[(String, Payload)],
) -> Result<()> {
    let (wp, bp) = if f32_out {
        (Payload::Npy3F32(w), Payload::Npy2F32(b))
    } else {
        (Payload::Npy3(w), Payload::Npy2(b))
    };
    let sp = Payload::Json(summary);
    let mut files: Vec<(&str, &Payload)> =
        vec![("W.npy", &wp), ("b.npy", &bp), ("summary.json", &sp)];
    files.extend(extra.iter().map(|(n, p)| (n.as_str(), p)));
    write_files(out, &files)
}

/// Writes one JSON file atomically (a temporary file beside it, renamed).
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_text_atomic(path, &serde_json::to_string_pretty(value)?)
}

/// Writes one text file atomically (a temporary file beside it, renamed).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().map_or("out".into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut fh =
            fs::File::create(&tmp).with_context(|| format!("cannot write `{}`", path.display()))?;
        std::io::Write::write_all(&mut fh, text.as_bytes())?;
        fh.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("cannot write `{}`", path.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// A rayon pool with `threads` workers (all cores by default).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    if threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        builder = builder.num_threads(t);
    }
    builder.build().context("cannot start worker threads")
}
