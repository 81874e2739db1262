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
/// has no other consumer and covers one row.
pub(crate) fn fuse_dense_affine(net: Network) -> Result<Network, IrError> {
    let uses = net.use_counts();
    let (input_shape, output) = (net.input_shape().to_vec(), net.output());
    let mut nodes: Vec<Option<nnlin_ir::Node>> = net.into_nodes().into_iter().map(Some).collect();
    let mut out = Network::new(input_shape);
    let mut map: Vec<Option<ValueId>> = vec![None; nodes.len() + 1];
    map[0] = Some(ValueId(0));
    for k in 0..nodes.len() {
        let Some(node) = nodes[k].take() else { continue };
        let inputs: Vec<ValueId> =
            node.inputs.iter().map(|i| map[i.0].expect("mapped input")).collect();
        // a Dense whose output is read only by an Affine of matching width
        let consumer = match &node.layer {
            Layer::Dense(d) if uses[node.output.0] == 1 && node.output != output => (k + 1..nodes.len())
                .find(|&j| nodes[j].as_ref().is_some_and(|n| n.inputs.contains(&node.output)))
                .filter(|&j| {
                    nodes[j].as_ref().is_some_and(|n| {
                        n.inputs.len() == 1 && matches!(&n.layer, Layer::Affine(a) if a.spatial == 1 && a.scale.len() == d.out_features)
                    })
                }),
            _ => None,
        };
        let (Some(j), Layer::Dense(mut d)) = (consumer, node.layer.clone()) else {
            map[node.output.0] = Some(out.push(node.name, node.source, node.layer, inputs)?);
            continue;
        };
        let next = nodes[j].take().expect("consumer");
        let Layer::Affine(a) = &next.layer else { unreachable!("checked above") };
        let old = d.bias.take().unwrap_or_else(|| vec![0.0; d.out_features]);
        for o in 0..d.out_features {
            for w in &mut d.weight[o * d.in_features..(o + 1) * d.in_features] {
                *w *= a.scale[o];
            }
        }
        d.bias = Some((0..d.out_features).map(|o| a.scale[o] * old[o] + a.shift[o]).collect());
        let source = format!("{}+{}", node.source, next.source);
        let v = out.push(node.name, source, Layer::Dense(d), inputs)?;
        map[node.output.0] = Some(v);
        map[next.output.0] = Some(v);
    }
    out.set_output(map[output.0].expect("mapped output"));
    Ok(out)
}
