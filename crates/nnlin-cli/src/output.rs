//! All-or-nothing outputs.
//!
//! A command's targets (an output folder, a JSON or markdown file) are
//! written in full beside themselves first, then swapped in, each with one
//! `rename`: on Linux `renameat2(RENAME_EXCHANGE)` exchanges the staged
//! folder with the old one atomically, so a reader or a crash sees the old
//! result or the new one, never a mix (where the file system cannot
//! exchange, the old target is renamed aside first). One writer at a time per
//! folder: the parent directory is locked (an advisory `flock`) for the whole
//! commit, and a second writer waits for it. Under that lock every staging
//! entry of the same target is stale (its process died), so it is removed.
//! Commands with several targets commit all of them or none: a failure while
//! swapping puts back the targets already swapped.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ndarray::{Array2, Array3};
use ndarray_npy::WriteNpyExt;

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
    /// Raw bytes (a PNG, a text).
    Bytes(Vec<u8>),
}

/// A target of a commit: a folder of files, or one file.
pub enum Target<'a> {
    /// A folder holding exactly these files (relative paths).
    Dir(&'a Path, Vec<(&'a str, &'a Payload<'a>)>),
    /// One file.
    File(&'a Path, &'a Payload<'a>),
}

impl Target<'_> {
    fn path(&self) -> &Path {
        match self {
            Target::Dir(p, _) | Target::File(p, _) => p,
        }
    }
}

/// The marker in the names of staging entries: `.NAME.nnlin-new-PID`.
const STAGING: &str = ".nnlin-new-";
/// Old targets moved aside where the file system cannot exchange.
const ASIDE: &str = ".nnlin-old-";

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn name_of(path: &Path) -> Result<String> {
    match path.file_name() {
        Some(n) => Ok(n.to_string_lossy().into_owned()),
        None => bail!("output `{}` does not name a file or folder", path.display()),
    }
}

fn write_payload(path: &Path, payload: &Payload) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    let fh = File::create(path).with_context(|| format!("cannot create `{}`", path.display()))?;
    let mut w = std::io::BufWriter::new(fh);
    let written: Result<()> = match payload {
        Payload::Json(v) => serde_json::to_writer_pretty(&mut w, v).map_err(Into::into),
        Payload::Npy2(a) => a.write_npy(&mut w).map_err(Into::into),
        Payload::Npy2F32(a) => a.mapv(|v| v as f32).write_npy(&mut w).map_err(Into::into),
        Payload::Npy3(a) => a.write_npy(&mut w).map_err(Into::into),
        Payload::Npy3F32(a) => a.mapv(|v| v as f32).write_npy(&mut w).map_err(Into::into),
        Payload::Bytes(b) => std::io::Write::write_all(&mut w, b).map_err(Into::into),
    };
    written.with_context(|| format!("cannot write `{}`", path.display()))?;
    let fh = w.into_inner().map_err(|e| e.into_error())?;
    fh.sync_all().with_context(|| format!("cannot write `{}`", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Removes the staging and set-aside entries of target `name` in `parent`
/// (called under the parent's lock, so their writers are gone).
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    let prefix = format!(".{name}");
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = file.strip_prefix(&prefix)
            && (rest.starts_with(STAGING) || rest.starts_with(ASIDE))
            && rest.rsplit('-').next().is_some_and(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        {
            remove_any(&e.path());
        }
    }
}

/// How a target was swapped in, to undo it.
enum Swapped {
    /// Exchanged with the old target, which now sits at the staging path.
    Exchanged { target: PathBuf, staging: PathBuf },
    /// Moved in where nothing was.
    Created { target: PathBuf },
    /// The old target was renamed aside first (no exchange on this file
    /// system).
    Aside { target: PathBuf, aside: PathBuf },
}

fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(std::io::Error::from)
}

fn swap_in(staging: &Path, target: &Path, aside: &Path) -> Result<Swapped> {
    let fail = |e: std::io::Error| {
        anyhow::anyhow!("cannot move the output into `{}`: {e}", target.display())
    };
    if fs::symlink_metadata(target).is_err() {
        fs::rename(staging, target).map_err(fail)?;
        return Ok(Swapped::Created { target: target.to_path_buf() });
    }
    match exchange(staging, target) {
        Ok(()) => {
            Ok(Swapped::Exchanged { target: target.to_path_buf(), staging: staging.to_path_buf() })
        }
        Err(e)
            if matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::INVAL.raw_os_error()
                || code == rustix::io::Errno::NOSYS.raw_os_error()) =>
        {
            fs::rename(target, aside).map_err(fail)?;
            if let Err(e) = fs::rename(staging, target) {
                let _ = fs::rename(aside, target);
                return Err(fail(e));
            }
            Ok(Swapped::Aside { target: target.to_path_buf(), aside: aside.to_path_buf() })
        }
        Err(e) => Err(fail(e)),
    }
}

fn undo(s: &Swapped) {
    match s {
        Swapped::Exchanged { target, staging } => {
            let _ = exchange(staging, target);
        }
        Swapped::Created { target } => remove_any(target),
        Swapped::Aside { target, aside } => {
            remove_any(target);
            let _ = fs::rename(aside, target);
        }
    }
}

/// Writes every target, all or nothing (see the module docs).
pub fn commit(targets: &[Target]) -> Result<()> {
    let pid = std::process::id();
    // where each target goes, and its kind checked against what is there
    let mut plan = Vec::with_capacity(targets.len());
    for t in targets {
        let path = t.path();
        let name = name_of(path)?;
        let parent = parent_of(path);
        match (t, fs::metadata(path)) {
            (Target::Dir(..), Ok(m)) if !m.is_dir() => {
                bail!("output `{}` exists and is not a directory", path.display())
            }
            (Target::File(..), Ok(m)) if m.is_dir() => {
                bail!("output `{}` exists and is a directory", path.display())
            }
            _ => {}
        }
        fs::create_dir_all(&parent).with_context(|| {
            let what = if matches!(t, Target::Dir(..)) { "output directory" } else { "output" };
            format!(
                "cannot write {what} `{}`: cannot create `{}`",
                path.display(),
                parent.display()
            )
        })?;
        let staging = parent.join(format!(".{name}{STAGING}{pid}"));
        let aside = parent.join(format!(".{name}{ASIDE}{pid}"));
        plan.push((parent, name, staging, aside));
    }
    // one writer at a time: lock each parent folder, in a fixed order
    let mut parents: Vec<PathBuf> =
        plan.iter().map(|p| fs::canonicalize(&p.0).unwrap_or_else(|_| p.0.clone())).collect();
    parents.sort();
    parents.dedup();
    let mut locks = Vec::with_capacity(parents.len());
    for p in &parents {
        let f = File::open(p).with_context(|| format!("cannot open `{}`", p.display()))?;
        f.lock().with_context(|| format!("cannot lock `{}`", p.display()))?;
        locks.push(f);
    }
    for (parent, name, ..) in &plan {
        remove_stale(parent, name);
    }
    // stage everything
    let staged: Result<()> = (|| {
        for (t, (_, _, staging, _)) in targets.iter().zip(&plan) {
            match t {
                Target::Dir(path, files) => {
                    fs::create_dir(staging).with_context(|| {
                        format!("cannot write output directory `{}`", path.display())
                    })?;
                    for (file, payload) in files {
                        write_payload(&staging.join(file), payload)?;
                    }
                    sync_dir(staging);
                }
                Target::File(_, payload) => write_payload(staging, payload)?,
            }
        }
        Ok(())
    })();
    if let Err(e) = staged {
        for (_, _, staging, _) in &plan {
            remove_any(staging);
        }
        return Err(e);
    }
    // swap in, undoing on failure
    let mut done = Vec::with_capacity(plan.len());
    for (t, (_, _, staging, aside)) in targets.iter().zip(&plan) {
        match swap_in(staging, t.path(), aside) {
            Ok(s) => done.push(s),
            Err(e) => {
                for s in done.iter().rev() {
                    undo(s);
                }
                for (_, _, staging, aside) in &plan {
                    remove_any(staging);
                    remove_any(aside);
                }
                return Err(e);
            }
        }
    }
    // the old results now sit at the staging or aside paths
    for (parent, _, staging, aside) in &plan {
        remove_any(staging);
        remove_any(aside);
        sync_dir(parent);
    }
    drop(locks);
    Ok(())
}

/// Writes the folder `out` holding exactly `files`, all or nothing.
pub fn write_files(out: &Path, files: &[(&str, &Payload)]) -> Result<()> {
    commit(&[Target::Dir(out, files.to_vec())])
}

/// Writes W.npy, b.npy, summary.json and `extra` into the folder `out`.
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

/// Writes one JSON file, all or nothing.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    commit(&[Target::File(path, &Payload::Json(value))])
}
