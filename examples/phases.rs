//! `cargo run --release -p nnlin --example phases -- MODEL X.npy [ROWS]`:
//! times one model's instance compile (f64, f32) and reverse accumulation (f32, f64)
//! separately: the minimum of `REPS` runs per instance, one thread, over the first `N`
//! inputs (default 2). With `CYCLE=1`, each rep instead runs every one of the `N` inputs
//! once, in turn (f32 compile, then f32 reverse): distinct inputs, as `explain` sees them,
//! where one input repeated lets the branch predictors learn its pattern.
use std::time::Instant;
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut opts = nnlin::ImportOptions::default();
    opts.output = std::env::var("OUTPUT").ok();
    let t = Instant::now();
    let m = nnlin::Model::from_onnx_file_with(&a[1], &opts).unwrap();
    println!("import {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    let x = ndarray_npy::read_npy::<_, ndarray::ArrayD<f64>>(&a[2]).unwrap();
    let n = x.shape()[0].min(std::env::var("N").ok().and_then(|s| s.parse().ok()).unwrap_or(2));
    let per = x.len() / x.shape()[0];
    let xs = x.as_slice().unwrap();
    let rows: usize = a.get(3).map(|s| s.parse().unwrap()).unwrap_or(10);
    let rows: Vec<usize> = (0..rows).collect();
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    // PHASE=reference|compile|compile32|f32|f64 runs one phase only (for a
    // profiler); PHASE=prepare times `Model::prepare` alone
    let phase = std::env::var("PHASE").unwrap_or_default();
    let on = |p: &str| phase.is_empty() || phase == p;
    // PAR=t: one instance's products spread over t threads
    let par = match std::env::var("PAR").ok().and_then(|s| s.parse().ok()) {
        Some(t) if t > 1 => faer::Par::rayon(t),
        _ => faer::Par::Seq,
    };
    if phase == "prepare" {
        // what a batch forms once before its instances (f32 weights,
        // Winograd kernels), on the whole pool: the first call only
        let t = Instant::now();
        m.prepare(nnlin::Precision::F32);
        println!("prepare f32 {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        return;
    }
    if std::env::var("CYCLE").is_ok() {
        // every rep runs all n inputs once (distinct inputs, as explain
        // sees them); the best rep's per-input mean
        let compile = |i: usize| {
            let xi = &xs[i * per..(i + 1) * per];
            m.compile_instance_in(xi, nnlin::Mode::Tangent, par, nnlin::Precision::F32).unwrap()
        };
        let insts: Vec<_> = (0..n).map(compile).collect();
        let c = best(reps, || {
            for i in 0..n {
                compile(i);
            }
        });
        let r = best(reps, || {
            for inst in &insts {
                nnlin_compile::accumulate_reverse::<f32>(inst, &rows, par).unwrap();
            }
        });
        println!(
            "cycle: compile f32 {:.2} us, reverse f32 {:.2} us per input ({n} inputs, best of {reps})",
            c / n as f64 * 1e6,
            r / n as f64 * 1e6
        );
        return;
    }
    let (mut tc, mut tc32, mut ta, mut t64, mut tr) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        let xi = &xs[i * per..(i + 1) * per];
        tr += best(if on("reference") { reps } else { 0 }, || {
            m.forward_reference(xi);
        });
        tc += best(if on("compile") { reps } else { 0 }, || {
            m.compile_instance_with(xi, nnlin::Mode::Tangent, par).unwrap();
        });
        tc32 += best(if on("compile32") { reps } else { 0 }, || {
            m.compile_instance_in(xi, nnlin::Mode::Tangent, par, nnlin::Precision::F32).unwrap();
        });
        if !(on("f32") || on("f64")) {
            continue;
        }
        let inst = m.compile_instance(xi, nnlin::Mode::Tangent).unwrap();
        ta += best(if on("f32") { reps } else { 0 }, || {
            nnlin_compile::accumulate_reverse::<f32>(&inst, &rows, par).unwrap();
        });
        t64 += best(if on("f64") { reps } else { 0 }, || {
            nnlin_compile::accumulate_reverse::<f64>(&inst, &rows, par).unwrap();
        });
    }
    let n = n as f64;
    println!(
        "reference {:.2} ms, compile {:.2} ms, compile f32 {:.2} ms, reverse f32 {:.2} ms, reverse f64 {:.2} ms (per instance, best of {reps}, {par:?})",
        tr / n * 1e3,
        tc / n * 1e3,
        tc32 / n * 1e3,
        ta / n * 1e3,
        t64 / n * 1e3
    );
}
