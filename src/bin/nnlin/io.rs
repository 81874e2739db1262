//! The CLI's file handling: reading inputs, writing outputs atomically.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{Array2, Array3, ArrayD, Ix2};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

fn squeeze(s: &[usize]) -> Vec<usize> {
    s.iter().copied().filter(|&d| d != 1).collect()
}

/// Reads X.npy (float32 or float64) as `N × n` instances for a model whose
/// input shape is `model_shape`: one instance (the input shape, with or
/// without its batch dimension of 1) or a batch `(N, ...)`.
pub fn read_instances(path: &Path, model_shape: &[usize]) -> Result<Array2<f64>> {
    let bytes =
        fs::read(path).with_context(|| format!("cannot read input `{}`", path.display()))?;
    let arr: ArrayD<f64> = match ArrayD::<f64>::read_npy(bytes.as_slice()) {
        Ok(a) => a,
        Err(_) => {
            ArrayD::<f32>::read_npy(bytes.as_slice()).map(|a| a.mapv(f64::from)).map_err(|e| {
                anyhow::anyhow!("`{}` is not a float32/float64 .npy file ({e})", path.display())
            })?
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

/// Writes W.npy, b.npy and summary.json into `out` atomically: everything
/// goes to a staging directory beside `out` first, then each file is renamed
/// into place. On failure nothing is left behind.
pub fn write_outputs(
    out: &Path,
    w: &Array3<f64>,
    b: &Array2<f64>,
    f32_out: bool,
    summary: &serde_json::Value,
) -> Result<()> {
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
        let write = |file: &str, f: &dyn Fn(&mut fs::File) -> Result<()>| -> Result<()> {
            let p = staging.join(file);
            let mut fh =
                fs::File::create(&p).with_context(|| format!("cannot create `{}`", p.display()))?;
            f(&mut fh)?;
            fh.sync_all()?;
            Ok(())
        };
        write("W.npy", &|fh| {
            if f32_out {
                w.mapv(|v| v as f32).write_npy(fh)?
            } else {
                w.write_npy(fh)?
            }
            Ok(())
        })?;
        write("b.npy", &|fh| {
            if f32_out {
                b.mapv(|v| v as f32).write_npy(fh)?
            } else {
                b.write_npy(fh)?
            }
            Ok(())
        })?;
        write("summary.json", &|fh| {
            serde_json::to_writer_pretty(&mut *fh, summary)?;
            Ok(())
        })?;
        fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
        for f in ["W.npy", "b.npy", "summary.json"] {
            fs::rename(staging.join(f), out.join(f))
                .with_context(|| format!("cannot move output into `{}`", out.display()))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&staging);
    result
}
