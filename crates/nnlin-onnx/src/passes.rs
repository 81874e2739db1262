//! Graph passes after import (dead nodes are pruned by `Network::pruned`):
//! the fusion of an affine layer into the dense layer before it; and the
//! trailing-softmax test.

use super::*;

/// Whether `value` reaches the graph output `output` through shape ops
/// alone, each the only reader of the previous value.
pub(crate) fn trailing_through_shape_ops(
    graph: &proto::GraphProto,
    value: &str,
    output: &str,
) -> bool {
    const SHAPE_OPS: &[&str] =
        &["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"];
    let mut v = value.to_string();
    // each step moves to a later node, so at most one step per node
    for _ in 0..=graph.node.len() {
        if v == output {
            return true;
        }
        let readers: Vec<&NodeProto> = graph.node.iter().filter(|m| m.input.contains(&v)).collect();
        match readers.as_slice() {
            [m] if SHAPE_OPS.contains(&m.op_type.as_deref().unwrap_or(""))
                && m.input.first() == Some(&v)
                && !m.input[1..].contains(&v) =>
            {
                let Some(next) = m.output.first() else { return false };
                v = next.clone();
            }
            _ => return false,
        }
    }
    false
}

/// Folds an `Affine` layer into the `Dense` layer that feeds it (ONNX
/// `MatMul` followed by `Add` of the bias, or a scale), when the dense output
/// has no other consumer and covers one row: the dense layer is replaced in
/// place (and checked), the affine bypassed, and the dead nodes pruned;
/// the other layers are not checked again.
pub(crate) fn fuse_dense_affine(mut net: Network) -> Result<Network, IrError> {
    let uses = net.use_counts();
    let output = net.output();
    let nodes = net.nodes();
    // (dense, affine) pairs: a Dense whose output is read only by an Affine
    // of matching width
    let pairs: Vec<(usize, usize)> = (0..nodes.len())
        .filter_map(|k| {
            let node = &nodes[k];
            let Layer::Dense(d) = &node.layer else { return None };
            if uses[node.output.0] != 1 || node.output == output {
                return None;
            }
            let j = (k + 1..nodes.len()).find(|&j| nodes[j].inputs.contains(&node.output))?;
            let n = &nodes[j];
            (n.inputs.len() == 1
                && matches!(&n.layer, Layer::Affine(a) if a.spatial == 1 && a.scale.len() == d.out_features))
            .then_some((k, j))
        })
        .collect();
    for (k, j) in pairs {
        let (dense, affine) = (&net.nodes()[k], &net.nodes()[j]);
        let (Layer::Dense(d), Layer::Affine(a)) = (&dense.layer, &affine.layer) else {
            unreachable!("checked above")
        };
        let mut d = d.clone();
        let old = d.bias.take().unwrap_or_else(|| vec![0.0; d.out_features]);
        for o in 0..d.out_features {
            for w in &mut d.weight[o * d.in_features..(o + 1) * d.in_features] {
                *w *= a.scale[o];
            }
        }
        d.bias = Some((0..d.out_features).map(|o| a.scale[o] * old[o] + a.shift[o]).collect());
        let source = format!("{}+{}", dense.source, affine.source);
        net.replace_layer(k, Layer::Dense(d), source)?;
        net.bypass(j)?;
    }
    Ok(net.pruned())
}
