//! Crafted and mutated ONNX files: import (and, where it succeeds, a
//! linearization) returns `Ok` or `Err`, never panics, hangs or allocates
//! past its budget. One test per defect class found by the audit of issue 12,
//! and a proptest that mutates the fixture models (truncation, bit flips,
//! field edits through the prost messages).

use nnlin::{ImportOptions, Model, Options, Rows, Strategy};
use nnlin_onnx::proto;
use proptest::prelude::*;
use prost::Message;

mod common;
use common::onnx::{floats, int, int64s, ints, model, node, string};

/// The budget every import here runs under.
const BUDGET: usize = 64 << 20;

/// Imports under the budget and, if that works, linearizes at a fixed x.
fn try_all(bytes: &[u8]) -> Result<(), String> {
    let opts = ImportOptions::default().with_max_bytes(BUDGET);
    let m = Model::from_onnx_bytes_with("crafted", bytes, &opts).map_err(|e| e.to_string())?;
    let x: Vec<f64> = (0..m.input_len()).map(|i| (i % 7) as f64 / 7.0 - 0.4).collect();
    let _ = m.forward_reference(&x);
    let lin = Options::new()
        .with_rows(Rows::Top(1))
        .with_strategy(Strategy::Reverse)
        .with_max_memory(BUDGET);
    m.linearize(&x, &lin).map(|_| ()).map_err(|e| e.to_string())
}

fn refused(bytes: &[u8], needle: &str) {
    match try_all(bytes) {
        Ok(()) => panic!("accepted; expected an error containing `{needle}`"),
        Err(e) => {
            assert!(e.contains(needle), "`{needle}` not in: {e}");
            assert!(!e.contains('\n'), "not one line: {e}");
        }
    }
}

#[test]
fn element_counts_that_wrap_around_are_refused() {
    let huge = 1i64 << 32;
    let bytes = model(
        17,
        &[1, 4],
        vec![node("Gemm", &["x", "w"], &["y"], vec![int("transB", 1)])],
        vec![floats("w", &[huge, huge, 0], &[])],
    );
    refused(&bytes, "more elements than memory can hold");
}

#[test]
fn zero_strides_and_same_padding_are_refused() {
    let w = floats("w", &[1, 1, 3, 3], &[0.1; 9]);
    let conv = node(
        "Conv",
        &["x", "w"],
        &["y"],
        vec![string("auto_pad", "SAME_UPPER"), ints("strides", &[0, 0])],
    );
    refused(&model(17, &[1, 1, 8, 8], vec![conv], vec![w]), "must be positive");
}

#[test]
fn malformed_constant_folding_is_refused() {
    // Range with an empty start
    let range = model(
        17,
        &[1, 4],
        vec![
            node("Range", &["s", "l", "d"], &["r"], vec![]),
            node("Add", &["x", "r"], &["y"], vec![]),
        ],
        vec![int64s("s", &[0], &[]), int64s("l", &[], &[4]), int64s("d", &[], &[1])],
    );
    refused(&range, "finite scalars");
    // Transpose with a short and with an out-of-range perm
    for perm in [vec![0], vec![0, 5]] {
        let t = model(
            17,
            &[1, 4],
            vec![
                node("Transpose", &["c"], &["t"], vec![ints("perm", &perm)]),
                node("Add", &["x", "t"], &["y"], vec![]),
            ],
            vec![floats("c", &[1, 4], &[1.0; 4])],
        );
        refused(&t, "not a permutation");
        let on_value = model(
            17,
            &[1, 4],
            vec![node("Transpose", &["x"], &["y"], vec![ints("perm", &perm)])],
            vec![],
        );
        refused(&on_value, "not a permutation");
    }
    // Slice with fewer ends than starts
    let slice = model(
        17,
        &[1, 4],
        vec![
            node("Slice", &["c", "st", "en"], &["t"], vec![]),
            node("Add", &["x", "t"], &["y"], vec![]),
        ],
        vec![
            floats("c", &[1, 4], &[1.0; 4]),
            int64s("st", &[2], &[0, 0]),
            int64s("en", &[1], &[1]),
        ],
    );
    refused(&slice, "all must be equal");
    // Unsqueeze with duplicate axes
    let unsq = model(
        17,
        &[1, 4],
        vec![node("Unsqueeze", &["x", "a"], &["y"], vec![])],
        vec![int64s("a", &[2], &[0, 0])],
    );
    refused(&unsq, "duplicate axes");
}

#[test]
fn sizes_stated_by_the_file_are_checked_against_the_budget() {
    let cos = model(
        17,
        &[1, 4],
        vec![
            node("ConstantOfShape", &["s"], &["c"], vec![]),
            node("Add", &["x", "c"], &["y"], vec![]),
        ],
        vec![int64s("s", &[2], &[1_000_000, 1_000_000])],
    );
    refused(&cos, "above the memory budget");
    let range = model(
        17,
        &[1, 4],
        vec![
            node("Range", &["s", "l", "d"], &["r"], vec![]),
            node("Add", &["x", "r"], &["y"], vec![]),
        ],
        vec![
            int64s("s", &[], &[0]),
            int64s("l", &[], &[1_000_000_000_000]),
            int64s("d", &[], &[1]),
        ],
    );
    refused(&range, "above the memory budget");
    let expand = model(
        17,
        &[1, 4],
        vec![node("Expand", &["c", "s"], &["e"], vec![]), node("Add", &["x", "e"], &["y"], vec![])],
        vec![floats("c", &[1], &[1.0]), int64s("s", &[3], &[100_000, 100_000, 4])],
    );
    refused(&expand, "above the memory budget");
    let input = model(
        17,
        &[1, 10_000_000_000, 10_000_000_000],
        vec![node("Relu", &["x"], &["y"], vec![])],
        vec![],
    );
    refused(&input, "memory budget");
}

#[test]
fn huge_window_geometry_is_refused_before_any_loop() {
    let w = floats("w", &[1, 1, 3, 3], &[0.1; 9]);
    for pad in [1_000_000_000i64, 1_000_000_000_000, i64::MAX] {
        let conv = node("Conv", &["x", "w"], &["y"], vec![ints("pads", &[pad, pad, pad, pad])]);
        assert!(try_all(&model(17, &[1, 1, 8, 8], vec![conv], vec![w.clone()])).is_err());
        let pool = node(
            "AveragePool",
            &["x"],
            &["y"],
            vec![ints("kernel_shape", &[2, 2]), ints("pads", &[pad, pad, pad, pad])],
        );
        assert!(try_all(&model(17, &[1, 1, 8, 8], vec![pool], vec![])).is_err());
        let pad_node = node("Pad", &["x", "p"], &["y"], vec![]);
        let pads = int64s("p", &[8], &[0, 0, pad, pad, 0, 0, pad, pad]);
        assert!(try_all(&model(17, &[1, 1, 8, 8], vec![pad_node], vec![pads])).is_err());
    }
    // pads of 1e5 on a pool: 4e10 windows
    let pool = node(
        "AveragePool",
        &["x"],
        &["y"],
        vec![ints("kernel_shape", &[2, 2]), ints("pads", &[100_000; 4])],
    );
    refused(&model(17, &[1, 3, 8, 8], vec![pool], vec![]), "above the memory budget");
    // a kernel of 1e5 × 1e5 taps on a tiny output
    let pool = node(
        "MaxPool",
        &["x"],
        &["y"],
        vec![ints("kernel_shape", &[100_000, 100_000]), ints("pads", &[50_000; 4])],
    );
    refused(&model(17, &[1, 3, 8, 8], vec![pool], vec![]), "above the memory budget");
}

#[test]
fn negative_and_inconsistent_attributes_are_refused_not_clamped() {
    let w = floats("w", &[2, 1, 3, 3], &[0.1; 18]);
    let conv = |attrs| {
        model(17, &[1, 2, 8, 8], vec![node("Conv", &["x", "w"], &["y"], attrs)], vec![w.clone()])
    };
    refused(&conv(vec![ints("pads", &[-1, 0, 0, 0]), int("group", 2)]), "negative");
    refused(&conv(vec![int("group", -2)]), "must be positive");
    refused(&conv(vec![int("group", 0)]), "must be positive");
    refused(&conv(vec![int("group", 3)]), "groups");
    refused(&conv(vec![ints("strides", &[-1, 1]), int("group", 2)]), "negative");
    // opset 6: a broadcast axis far beyond the rank
    let add = node("Add", &["x", "c"], &["y"], vec![int("broadcast", 1), int("axis", 1 << 40)]);
    refused(&model(6, &[1, 4, 2], vec![add], vec![floats("c", &[4], &[1.0; 4])]), "broadcast axis");
}

#[test]
fn duplicate_names_are_refused() {
    let twice = model(
        17,
        &[1, 4],
        vec![
            node("Relu", &["x"], &["r"], vec![]),
            node("Relu", &["x"], &["r"], vec![]),
            node("Relu", &["r"], &["y"], vec![]),
        ],
        vec![],
    );
    refused(&twice, "already defined");
    let inits = model(
        17,
        &[1, 4],
        vec![node("Add", &["x", "c"], &["y"], vec![])],
        vec![floats("c", &[4], &[1.0; 4]), floats("c", &[4], &[2.0; 4])],
    );
    refused(&inits, "defined twice");
    let shadow = model(
        17,
        &[1, 4],
        vec![node("Relu", &["x"], &["c"], vec![]), node("Add", &["c", "c"], &["y"], vec![])],
        vec![floats("c", &[4], &[1.0; 4])],
    );
    refused(&shadow, "already defined");
}

#[test]
fn self_sums_share_subexpressions() {
    // r_{k+1} = r_k + r_k, 2 000 times: a tree would hold 2^2000 nodes
    let mut nodes = vec![node("Relu", &["x"], &["r0"], vec![])];
    let names: Vec<String> = (0..=2000).map(|k| format!("r{k}")).collect();
    for k in 0..2000 {
        let out = if k == 1999 { "y" } else { names[k + 1].as_str() };
        nodes.push(node("Add", &[&names[k], &names[k]], &[out], vec![]));
    }
    let bytes = model(17, &[1, 4], nodes, vec![]);
    let opts = ImportOptions::default().with_max_bytes(BUDGET);
    let m = Model::from_onnx_bytes_with("sums", &bytes, &opts).unwrap();
    // F(x) = 2^2000 relu(x) overflows to inf: refused as non-finite or
    // linearized; what matters is that import finished
    assert_eq!(m.input_len(), 4);
    // and that the fused expressions print (inspect) in bounded time: as
    // trees they would have 2^256 nodes
    for node in m.network().nodes() {
        if let nnlin::ir::Layer::Activation(a) = &node.layer {
            assert!(a.expr.to_string().len() < 2000);
        }
    }
    // and a long chain of distinct elementwise ops is split into layers
    let mut nodes = vec![];
    let mut prev = "x".to_string();
    for k in 0..3000 {
        let out = if k == 2999 { "y".to_string() } else { format!("t{k}") };
        nodes.push(node(if k % 2 == 0 { "Tanh" } else { "Neg" }, &[&prev], &[&out], vec![]));
        prev = out;
    }
    let m =
        Model::from_onnx_bytes_with("chain", &model(17, &[1, 4], nodes, vec![]), &opts).unwrap();
    let x = [0.1, -0.2, 0.3, 0.05];
    let lin = m.linearize(&x, &Options::default()).unwrap();
    let f = m.forward_reference(&x);
    for i in 0..4 {
        let wx: f64 = (0..4).map(|j| lin.w[(i, j)] * x[j]).sum();
        assert!((wx + lin.b[i] - f[i]).abs() < 1e-12);
    }
}

/// The small fixture models the mutation test starts from.
fn seeds() -> Vec<Vec<u8>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    ["iris/relu.onnx", "iris/gelu.onnx", "cnn/lenet5.onnx", "cnn/resnet_small.onnx"]
        .iter()
        .filter_map(|p| std::fs::read(root.join(p)).ok())
        .collect()
}

/// Values that break naive size arithmetic.
const EXTREMES: [i64; 9] =
    [i64::MIN, -1_000_000_000_000, -1, 0, 1, 2, 1 << 31, 1_000_000_000_000, i64::MAX];

fn edit(m: &mut proto::ModelProto, pick: usize, what: usize, value: i64) {
    let Some(g) = m.graph.as_mut() else { return };
    match what % 6 {
        0 if !g.node.is_empty() => {
            let n = pick % g.node.len();
            let node = &mut g.node[n];
            let k = pick % node.attribute.len().max(1);
            if let Some(a) = node.attribute.get_mut(k) {
                if a.ints.is_empty() {
                    a.i = Some(value);
                } else {
                    let k = pick % a.ints.len();
                    a.ints[k] = value;
                }
            }
        }
        1 if !g.initializer.is_empty() => {
            let n = pick % g.initializer.len();
            let t = &mut g.initializer[n];
            if !t.dims.is_empty() {
                let k = pick % t.dims.len();
                t.dims[k] = value;
            }
        }
        2 if !g.node.is_empty() => {
            // rewire an input to another value's name
            let names: Vec<String> = g.node.iter().flat_map(|n| n.output.clone()).collect();
            let n = pick % g.node.len();
            if let Some(i) = g.node[n].input.first_mut() {
                *i = names[value.unsigned_abs() as usize % names.len()].clone();
            }
        }
        3 if !g.node.is_empty() => {
            let ops = [
                "Conv",
                "MaxPool",
                "Reshape",
                "Transpose",
                "Slice",
                "Pad",
                "Gemm",
                "Concat",
                "Unsqueeze",
                "Add",
                "Range",
                "Expand",
            ];
            let n = pick % g.node.len();
            g.node[n].op_type = Some(ops[value.unsigned_abs() as usize % ops.len()].into());
        }
        4 => {
            if let Some(d) = g
                .input
                .first_mut()
                .and_then(|i| i.r#type.as_mut())
                .and_then(|t| match &mut t.value {
                    Some(proto::type_proto::Value::TensorType(t)) => Some(t),
                    _ => None,
                })
                .and_then(|t| t.shape.as_mut())
                .and_then(|s| s.dim.get_mut(pick % 4))
            {
                d.value = Some(proto::tensor_shape_proto::dimension::Value::DimValue(value));
            }
        }
        _ => {
            if !g.node.is_empty() {
                let n = pick % g.node.len();
                let dup = g.node[n].clone();
                g.node.insert(n, dup);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn truncated_and_bit_flipped_models_never_panic(
        seed in 0usize..4, cut in 0.0f64..1.0, flips in prop::collection::vec((0.0f64..1.0, 0u8..8), 0..6)
    ) {
        let seeds = seeds();
        let mut bytes = seeds[seed % seeds.len()].clone();
        for (at, bit) in flips {
            let k = ((bytes.len() as f64 * at) as usize).min(bytes.len().saturating_sub(1));
            if let Some(b) = bytes.get_mut(k) {
                *b ^= 1 << bit;
            }
        }
        let keep = ((bytes.len() as f64) * (0.5 + cut / 2.0)) as usize;
        bytes.truncate(keep.max(1));
        let _ = try_all(&bytes);
    }

    #[test]
    fn edited_fields_never_panic(
        seed in 0usize..4,
        edits in prop::collection::vec((any::<usize>(), any::<usize>(), prop::sample::select(EXTREMES.to_vec())), 1..4)
    ) {
        let seeds = seeds();
        let mut m = proto::ModelProto::decode(seeds[seed % seeds.len()].as_slice()).unwrap();
        for (pick, what, value) in edits {
            edit(&mut m, pick, what, value);
        }
        let _ = try_all(&m.encode_to_vec());
    }
}

#[test]
fn the_auto_planner_handles_deep_chains() {
    // 3 000 layers: the matrix-chain program is O(k³) and is left out above
    // MAX_DP_FACTORS factors; auto and dp still give the exact W
    use nnlin::ir::{Activation, Dense, Expr, Layer, Network, Unary};
    let mut net = Network::new(vec![1, 4]);
    for k in 0..1500 {
        let weight: Vec<f64> =
            (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.01 * ((i + k) % 3) as f64 }).collect();
        let dense = Dense { out_features: 4, in_features: 4, weight, bias: Some(vec![0.01; 4]) };
        net.push(format!("d{k}"), "Gemm", Layer::Dense(dense), vec![net.output()]).unwrap();
        let relu = Activation { expr: Expr::unary(Unary::LeakyRelu { alpha: 0.5 }) };
        net.push(format!("a{k}"), "LeakyRelu", Layer::Activation(relu), vec![net.output()])
            .unwrap();
    }
    let m = Model::from_network("deep", net);
    let x = [0.3, -0.1, 0.2, 0.05];
    let reference = m.linearize(&x, &Options::default().with_strategy(Strategy::Reverse)).unwrap();
    for strategy in [Strategy::Auto, Strategy::Dp] {
        let lin = m.linearize(&x, &Options::default().with_strategy(strategy)).unwrap();
        for (a, b) in lin.w.iter().zip(reference.w.iter()) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{strategy:?}: {a} vs {b}");
        }
    }
}

#[test]
fn operators_that_grow_with_the_data_are_structured_or_budgeted() {
    // a 200×200 dense over 2 000 rows: as an explicit I ⊗ W it would hold
    // 8e7 entries (1.9 GB); structured it holds W once and fits 64 MiB
    let w = floats("w", &[200, 200], &vec![0.001; 40_000]);
    let gemm =
        model(17, &[1, 2000, 200], vec![node("MatMul", &["x", "w"], &["y"], vec![])], vec![w]);
    try_all(&gemm).unwrap();
    // a softmax over 10 000 elements: its Jacobian would be a 10 000² block;
    // applied structurally it costs O(n)
    let sm = model(
        17,
        &[1, 10_000],
        vec![
            node("Tanh", &["x"], &["t"], vec![]),
            node("Softmax", &["t"], &["s"], vec![int("axis", -1)]),
            node("Tanh", &["s"], &["y"], vec![]),
        ],
        vec![],
    );
    try_all(&sm).unwrap();
    // a product of two 3 000 × 3 000 activations: the values alone exceed it
    let mm = model(
        17,
        &[1, 3000, 3000],
        vec![node("Tanh", &["x"], &["t"], vec![]), node("MatMul", &["t", "t"], &["y"], vec![])],
        vec![],
    );
    refused(&mm, "memory budget");
}

#[test]
fn mod_folds_with_both_sign_conventions() {
    // y = x + (c mod d): Python's % for fmod = 0, C's fmod for fmod = 1
    for (fmod, want) in [(0, [1.0, 2.0, -2.0, -1.0]), (1, [1.0, -1.0, 1.0, -1.0])] {
        let b = model(
            17,
            &[1, 4],
            vec![
                node("Mod", &["c", "d"], &["m"], vec![int("fmod", fmod)]),
                node("Add", &["x", "m"], &["y"], vec![]),
            ],
            vec![
                floats("c", &[4], &[7.0, -7.0, 7.0, -7.0]),
                floats("d", &[4], &[3.0, 3.0, -3.0, -3.0]),
            ],
        );
        let m = Model::from_onnx_bytes("mod", &b).unwrap();
        assert_eq!(m.forward_reference(&[0.0; 4]), want, "fmod = {fmod}");
    }
}
