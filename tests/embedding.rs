//! The embedding API: one `Linearize` trait for `Model`, `Ensemble` and
//! `Pipeline`; streaming batches give exactly the held batch's results.

use std::sync::Mutex;

use ndarray::Array2;
use nnlin::{Ensemble, Linearization, Linearize, Model, Options, Pipeline};

fn iris(name: &str) -> Model {
    Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/").to_owned() + name)
        .unwrap()
}

fn streamed(f: &impl Linearize, xs: &Array2<f64>) -> Vec<Linearization> {
    let got: Mutex<Vec<Option<Linearization>>> = Mutex::new(vec![None; xs.nrows()]);
    f.linearize_batch_with(xs.view(), &Options::new(), &|k, lin| {
        got.lock().unwrap()[k] = Some(lin);
        Ok(())
    })
    .unwrap();
    got.into_inner().unwrap().into_iter().map(Option::unwrap).collect()
}

fn check(f: &impl Linearize) {
    let xs = Array2::from_shape_fn((6, f.input_len()), |(k, j)| (k * 3 + j) as f64 * 0.3 - 1.0);
    let held = f.linearize_batch(xs.view(), &Options::new()).unwrap();
    let stream = streamed(f, &xs);
    for (a, b) in held.iter().zip(&stream) {
        assert_eq!(a.w, b.w);
        assert_eq!(a.b, b.b);
        assert_eq!(a.rows, b.rows);
    }
    // an error from the callback stops the batch and comes back
    let e = f
        .linearize_batch_with(xs.view(), &Options::new(), &|_, _| {
            Err(nnlin::Error::Caller("stop".into()))
        })
        .unwrap_err();
    assert!(e.to_string().contains("stop"));
    assert_eq!(f.forward_reference(xs.row(0).as_slice().unwrap()).len(), f.output_len());
}

#[test]
fn models_ensembles_and_pipelines_stream_what_they_hold() {
    let (a, b) = (iris("relu.onnx"), iris("tanh.onnx"));
    check(&a);
    let ens = Ensemble::new(vec![(a.clone(), 0.5), (b, 2.0)]).unwrap();
    check(&ens);
    check(&Pipeline::new(Ensemble::single(a), vec![]).unwrap());
}
