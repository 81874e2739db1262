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
    /// A file written piece by piece while the command ran, moved in.
    Spooled(&'a Spool),
}

/// An `.npy` array written piece by piece, beside its output folder, while
/// a command runs (so the whole array is never in memory), and moved into
/// the staged folder when the folder is committed. Pieces are written at
/// their own offsets, from any thread, in any order. The file is removed if
/// it is never committed; a spool left by a process that died is removed by
/// the next commit to the same target.
///
/// A piece's bytes are gathered into the file's aligned stripes of
/// [`STRIPE`] bytes, and a stripe is written with one `pwrite` once its
/// pieces are all in: the page cache's cost per write and per partly
/// written page is paid per stripe, not per piece (LeNet-5's 31 360-byte
/// pieces at unaligned offsets cost this file system twice what the same
/// bytes cost in aligned 256 KiB writes: `dd`, 31 MB, 18 ms against 9).
/// At most [`STAGED_MAX`] bytes are held; a piece whose stripe would
/// exceed that is written at once, and [`Spool::flush`] writes what is
/// left.
pub struct Spool {
    path: PathBuf,
    file: File,
    header: u64,
    /// The file's length.
    len: u64,
    piece: usize,
    f32: bool,
    staged: std::sync::Mutex<Staged>,
    /// Most bytes held in stripes ([`STAGED_MAX`]).
    max_staged: usize,
}

/// Bytes per stripe of a [`Spool`]'s file (stripe `j` is the file's bytes
/// `j·STRIPE .. (j+1)·STRIPE`, less the header and past the end).
const STRIPE: u64 = 256 << 10;

/// Most bytes a [`Spool`] holds in stripes not yet written.
const STAGED_MAX: usize = 64 << 20;

/// A spool's stripes with some pieces' bytes in and others not yet.
#[derive(Default)]
struct Staged {
    stripes: std::collections::HashMap<u64, Stripe>,
    /// Bytes held, all stripes together.
    bytes: usize,
    /// Buffers of stripes written, for the next ones.
    spare: Vec<Vec<u8>>,
}

/// Most written stripes' buffers a [`Spool`] keeps for reuse.
const SPARE_STRIPES: usize = 4;

/// `w`'s values in C order as `N`-byte cells of `out` (`cell` of each
/// value). A column-major `w` (as W is formed) is read eight columns at a
/// time, so that each of its cache lines is read once, where row by row
/// each would be read once per row it holds.
fn c_order_bytes<const N: usize>(
    w: ndarray::ArrayView2<'_, f64>,
    out: &mut [u8],
    cell: impl Fn(f64) -> [u8; N],
) {
    let (m, n) = w.dim();
    debug_assert_eq!(out.len(), m * n * N);
    let wt = w.t();
    if m == 0 || n == 0 {
        return;
    }
    let Some(data) = wt.as_slice() else {
        for (out, row) in out.chunks_exact_mut(N * n).zip(w.rows()) {
            for (c, &v) in out.chunks_exact_mut(N).zip(row) {
                c.copy_from_slice(&cell(v));
            }
        }
        return;
    };
    // (column-major: entry (r, c) at c·m + r)
    for c0 in (0..n).step_by(8) {
        let cols = &data[c0 * m..(c0 + 8).min(n) * m];
        for r in 0..m {
            let at = (r * n + c0) * N;
            let dst = &mut out[at..at + cols.len() / m * N];
            for (j, d) in dst.chunks_exact_mut(N).enumerate() {
                d.copy_from_slice(&cell(cols[j * m + r]));
            }
        }
    }
}

/// One stripe's bytes as far as they came in: `buf` from the stripe's
/// first byte, `ranges` the parts written into it (disjoint), `filled`
/// their total length.
struct Stripe {
    buf: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    filled: usize,
}

/// The marker in the names of spool files: `.NAME.nnlin-spool-FILE-PID`.
const SPOOL: &str = ".nnlin-spool-";

/// The `.npy` (version 1.0) header of a C-order array of `shape`, padded to
/// a multiple of 64 bytes as numpy writes it.
fn npy_header(shape: &[usize], f32: bool) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let descr = if f32 { "<f4" } else { "<f8" };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

impl Spool {
    /// A spool for the file `file` of the output folder `out`: an array of
    /// `shape`, float32 if `f32`, whose pieces are its sub-arrays along the
    /// first axis.
    pub fn create(out: &Path, file: &str, shape: &[usize], f32: bool) -> Result<Spool> {
        let name = name_of(out)?;
        let parent = prepare_dir_target(out)?;
        let path =
            parent.join(format!(".{name}{SPOOL}{}-{}", file.replace('/', "_"), std::process::id()));
        let header = npy_header(shape, f32);
        let piece: usize = shape.iter().skip(1).product();
        let size = if f32 { 4 } else { 8 };
        let bytes = shape
            .iter()
            .try_fold(size as u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|b| b.checked_add(header.len() as u64))
            .ok_or_else(|| anyhow::anyhow!("`{file}` is too large"))?;
        let fh =
            File::create(&path).with_context(|| format!("cannot create `{}`", path.display()))?;
        let spool = Spool {
            path,
            file: fh,
            header: header.len() as u64,
            len: bytes,
            piece,
            f32,
            staged: Default::default(),
            max_staged: STAGED_MAX,
        };
        use std::os::unix::fs::FileExt;
        spool
            .file
            .write_all_at(&header, 0)
            .and_then(|()| spool.file.set_len(bytes))
            .with_context(|| format!("cannot write `{}`", spool.path.display()))?;
        Ok(spool)
    }

    /// Writes piece `index`: the matrix `w` (its values in C order,
    /// whatever its memory layout).
    pub fn write(&self, index: usize, w: ndarray::ArrayView2<'_, f64>) -> Result<()> {
        anyhow::ensure!(w.len() == self.piece, "spool piece of {} values", w.len());
        let size = if self.f32 { 4 } else { 8 };
        let mut buf = vec![0u8; self.piece * size];
        if self.f32 {
            c_order_bytes::<4>(w, &mut buf, |v| (v as f32).to_le_bytes());
        } else {
            c_order_bytes::<8>(w, &mut buf, f64::to_le_bytes);
        }
        let at = self.header + (index * self.piece * size) as u64;
        let end = at + buf.len() as u64;
        anyhow::ensure!(end <= self.len, "spool piece {index} past the end");
        let mut part = at;
        while part < end {
            let j = part / STRIPE;
            let (lo, hi) = ((j * STRIPE).max(self.header), ((j + 1) * STRIPE).min(self.len));
            let upto = end.min(hi);
            let bytes = &buf[(part - at) as usize..(upto - at) as usize];
            match self.stage(j, (lo, hi), part, bytes) {
                Staging::Held => {}
                Staging::Full(stripe) => {
                    self.write_at(&stripe, lo)?;
                    self.recycle(stripe);
                }
                Staging::Over => self.write_at(bytes, part)?,
            }
            part = upto;
        }
        Ok(())
    }

    /// `bytes`, at file offset `at` within stripe `j` (file bytes `lo ..
    /// hi`), into the stripe's buffer.
    fn stage(&self, j: u64, (lo, hi): (u64, u64), at: u64, bytes: &[u8]) -> Staging {
        let size = (hi - lo) as usize;
        let mut staged = self.staged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !staged.stripes.contains_key(&j) {
            if staged.bytes + size > self.max_staged {
                return Staging::Over;
            }
            staged.bytes += size;
            // a written stripe's buffer where one is spare (its old bytes
            // are never written: only the ranges that came in are)
            let mut buf = staged.spare.pop().unwrap_or_default();
            buf.resize(size, 0);
            staged.stripes.insert(j, Stripe { buf, ranges: vec![], filled: 0 });
        }
        let stripe = staged.stripes.get_mut(&j).expect("the stripe just held");
        let from = (at - lo) as usize;
        stripe.buf[from..from + bytes.len()].copy_from_slice(bytes);
        stripe.ranges.push((from, bytes.len()));
        stripe.filled += bytes.len();
        if stripe.filled < size {
            return Staging::Held;
        }
        let full = staged.stripes.remove(&j).expect("the stripe just filled");
        staged.bytes -= size;
        Staging::Full(full.buf)
    }

    /// Writes the stripes' parts still held (those of stripes some of
    /// whose pieces were written at once, or never came).
    pub fn flush(&self) -> Result<()> {
        let held = std::mem::take(
            &mut *self.staged.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (j, mut stripe) in held.stripes {
            let lo = (j * STRIPE).max(self.header);
            stripe.ranges.sort_unstable();
            // adjacent parts in one write
            let mut k = 0;
            while k < stripe.ranges.len() {
                let (from, mut len) = stripe.ranges[k];
                k += 1;
                while k < stripe.ranges.len() && stripe.ranges[k].0 == from + len {
                    len += stripe.ranges[k].1;
                    k += 1;
                }
                self.write_at(&stripe.buf[from..from + len], lo + from as u64)?;
            }
        }
        Ok(())
    }

    /// Keeps a written stripe's buffer for the next stripe, up to
    /// [`SPARE_STRIPES`] of them (a fresh buffer of a stripe's size is
    /// fresh pages, each faulted in and zeroed by the kernel).
    fn recycle(&self, buf: Vec<u8>) {
        let mut staged = self.staged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if staged.spare.len() < SPARE_STRIPES {
            staged.spare.push(buf);
        }
    }

    fn write_at(&self, bytes: &[u8], at: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(bytes, at)
            .with_context(|| format!("cannot write `{}`", self.path.display()))
    }
}

/// What [`Spool::stage`] did with a part of a piece.
enum Staging {
    /// Held in its stripe's buffer.
    Held,
    /// Held, and that filled the stripe: its bytes, to be written.
    Full(Vec<u8>),
    /// Not held (the stripe would take more than [`STAGED_MAX`]): to be
    /// written at once.
    Over,
}

impl Drop for Spool {
    fn drop(&mut self) {
        // gone already when it was committed
        let _ = fs::remove_file(&self.path);
    }
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
    if let Payload::Spooled(spool) = payload {
        spool.flush()?;
        spool.file.sync_all().with_context(|| format!("cannot write `{}`", path.display()))?;
        return fs::rename(&spool.path, path)
            .with_context(|| format!("cannot move `{}` into place", spool.path.display()));
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
        Payload::Spooled(_) => Ok(()),
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

/// Whether process `pid` has ended (never says so where `/proc` is absent).
fn process_gone(pid: &str) -> bool {
    Path::new("/proc/self").exists() && !Path::new("/proc").join(pid).exists()
}

/// Removes the staging and set-aside entries of target `name` in `parent`
/// (called under the parent's lock, so their writers are gone), and the
/// spools of processes that have ended.
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
        } else if let Some(rest) = file.strip_prefix(&prefix)
            && rest.starts_with(SPOOL)
            && let Some(pid) = rest.rsplit('-').next()
            && pid.chars().all(|c| c.is_ascii_digit())
            && process_gone(pid)
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

/// Checks that the folder target `out` can be written (it is a folder or
/// absent) and creates its parent; returns the parent.
fn prepare_dir_target(out: &Path) -> Result<PathBuf> {
    if fs::metadata(out).is_ok_and(|m| !m.is_dir()) {
        bail!("output `{}` exists and is not a directory", out.display())
    }
    let parent = parent_of(out);
    fs::create_dir_all(&parent).with_context(|| {
        format!(
            "cannot write output directory `{}`: cannot create `{}`",
            out.display(),
            parent.display()
        )
    })?;
    Ok(parent)
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

/// Writes W.npy (spooled), b.npy, summary.json and `extra` into the folder
/// `out`.
pub fn write_outputs(
    out: &Path,
    w: &Spool,
    b: &Array2<f64>,
    f32_out: bool,
    summary: &serde_json::Value,
    extra: &[(String, Payload)],
) -> Result<()> {
    let wp = Payload::Spooled(w);
    let bp = if f32_out { Payload::Npy2F32(b) } else { Payload::Npy2(b) };
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Pieces written in any order, from several threads, with or
        /// without room to hold their stripes, give the bytes numpy would
        /// write for the whole array.
        #[test]
        fn spool_writes_the_whole_arrays_bytes(
            n in 1usize..40,
            rows in 1usize..12,
            cols in 1usize..3000,
            f32 in any::<bool>(),
            room in prop::sample::select(vec![0usize, 300_000, super::STAGED_MAX]),
            seed in any::<u64>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out");
            let mut spool = super::Spool::create(&out, "W.npy", &[n, rows, cols], f32).unwrap();
            spool.max_staged = room;
            let a = ndarray::Array3::from_shape_fn((n, rows, cols), |(i, r, c)| {
                (i * 7919 + r * 104_729 + c) as f64 * 0.37 - 1e3
            });
            // the pieces in a shuffled order, split between three threads
            let mut order: Vec<usize> = (0..n).collect();
            let mut s = seed | 1;
            for i in (1..n).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            std::thread::scope(|sc| {
                for part in order.chunks(n.div_ceil(3)) {
                    let (spool, a) = (&spool, &a);
                    sc.spawn(move || {
                        for &i in part {
                            let piece = a.index_axis(ndarray::Axis(0), i);
                            if i % 2 == 0 {
                                // column-major, as W is formed
                                use ndarray::ShapeBuilder;
                                let mut w = ndarray::Array2::zeros(piece.dim().f());
                                w.assign(&piece);
                                spool.write(i, w.view()).unwrap();
                            } else {
                                spool.write(i, piece).unwrap();
                            }
                        }
                    });
                }
            });
            spool.flush().unwrap();
            prop_assert_eq!(spool.staged.lock().unwrap().bytes, 0);
            // read back as numpy would read it: the same values, bit for bit
            let f = std::fs::File::open(&spool.path).unwrap();
            if f32 {
                let got: ndarray::Array3<f32> = ndarray_npy::ReadNpyExt::read_npy(f).unwrap();
                prop_assert!(got == a.mapv(|v| v as f32), "spooled values differ");
            } else {
                let got: ndarray::Array3<f64> = ndarray_npy::ReadNpyExt::read_npy(f).unwrap();
                prop_assert!(got == a, "spooled values differ");
            }
        }
    }
}
