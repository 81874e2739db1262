//! Elementwise fusion: elementwise nodes on one tensor become one pending
//! expression per result (so GELU, SiLU, Mish, HardSwish and input
//! normalization are one layer however the exporter decomposed them);
//! products and sums of two tensors that depend on the input become layers.

use super::*;

impl Importer<'_> {
    /// An elementwise node with at least one non-constant input.
    pub(crate) fn elementwise(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        // A pending affine map (normalization, batch-norm) stays its own
        // diagonal layer before a named activation, so the activation's
        // secant rescale sees exactly its own pre-activation.
        if ops::handler(&op) == Some(ops::Handler::Elementwise { named: true }) {
            for i in 0..self.node.input.len() {
                if let Some(Sym::Expr { expr, .. }) = self.input(i)?
                    && expr.class() == ExprClass::Affine
                    && !expr.is_identity()
                {
                    let name = self.node.input[i].clone();
                    self.materialize(&name)?;
                }
            }
        }
        if op == "BatchNormalization" {
            return self.batchnorm();
        }
        // Residual / branch sums: Add, Sub, Sum of different tensors.
        let roots: Vec<ValueId> = (0..self.node.input.len())
            .filter_map(|i| match self.input(i) {
                Ok(Some(Sym::Value(v) | Sym::Expr { root: v, .. })) => Some(*v),
                _ => None,
            })
            .collect();
        if roots.iter().any(|r| *r != roots[0]) {
            if matches!(op.as_str(), "Mul" | "Div") && self.node.input.len() == 2 {
                return self.product(op == "Div");
            }
            return self.branch_sum();
        }
        let mut root: Option<ValueId> = None;
        let mut out_shape: Vec<usize> = vec![];
        let mut inputs: Vec<Option<Sym>> = vec![];
        let rank = roots.first().map_or(0, |r| self.net.shape(*r).len());
        for i in 0..self.node.input.len() {
            let s = self.input(i)?.cloned();
            if let Some(s) = &s {
                let shape = match s {
                    Sym::Const(t) => self.legacy_broadcast(t, rank)?.dims,
                    other => self.shape_of(other),
                };
                out_shape = tensor::broadcast_shape(&out_shape, &shape).ok_or_else(|| {
                    self.unsupported(format!("shapes do not broadcast: {shape:?}"))
                })?;
                if let Sym::Value(v) | Sym::Expr { root: v, .. } = s {
                    match root {
                        None => root = Some(*v),
                        Some(r) if r == *v => {}
                        Some(_) => {
                            return Err(self.unsupported(
                                "elementwise op on two different tensors (a residual or gated \
                                 branch) is not supported",
                            ));
                        }
                    }
                }
            }
            inputs.push(s);
        }
        let root = root.expect("elementwise called with a non-constant input");
        let root_shape = self.net.shape(root).to_vec();
        if out_shape != root_shape {
            return Err(self.unsupported(format!(
                "broadcasting expands the tensor from {root_shape:?} to {out_shape:?}"
            )));
        }
        let mut e = Expr::var();
        let var = 0;
        let mut sources = vec![];
        let mut args: Vec<Option<usize>> = vec![];
        for (k, s) in inputs.iter().enumerate() {
            let repeated = self.node.input[..k].contains(&self.node.input[k]);
            args.push(match s {
                None => None,
                Some(Sym::Value(_)) => Some(var),
                Some(Sym::Expr { expr, sources: src, .. }) => {
                    // the op names of a shared subexpression are listed once;
                    // the list is a label, capped so that it cannot double
                    // with every node
                    if !repeated {
                        let room = MAX_SOURCES.saturating_sub(sources.len());
                        sources.extend(src.iter().take(room).cloned());
                    }
                    Some(e.splice(expr, var))
                }
                Some(Sym::Const(t)) => {
                    let t = &self.legacy_broadcast(t, root_shape.len())?;
                    // a constant whose shape is the tensor's up to an axis
                    // and 1 after it (a per-channel [1, C, 1, 1] over
                    // [1, C, H, W]) keeps its values, each read by a block
                    // (numpy rules align the shapes at the right: a
                    // [C, 1, 1] constant, as PyTorch exports a PReLU slope,
                    // is [1, C, 1, 1])
                    let dims: Vec<usize> = (t.dims.len()..root_shape.len())
                        .map(|_| 1)
                        .chain(t.dims.iter().copied())
                        .collect();
                    let last = dims.iter().rposition(|&d| d != 1);
                    let blocks = last.filter(|&k| {
                        dims.len() == root_shape.len() && dims[..=k] == root_shape[..=k]
                    });
                    if t.numel() == 1 {
                        Some(e.push_const(vec![t.data[0]]))
                    } else if let Some(k) = blocks {
                        let repeat = root_shape[k + 1..].iter().product::<usize>().max(1);
                        Some(e.push_const_repeated(t.data.clone(), repeat))
                    } else {
                        let data = tensor::broadcast_to(t, &root_shape).ok_or_else(|| {
                            self.unsupported(format!(
                                "constant of shape {:?} does not broadcast",
                                t.dims
                            ))
                        })?;
                        Some(e.push_const(data))
                    }
                }
            });
        }
        sources.push(op.clone());
        let a = |i: usize| args.get(i).copied().flatten();
        if op == "Sum" {
            let mut acc = a(0).ok_or_else(|| self.unsupported("missing input 0"))?;
            for i in 1..args.len() {
                let y = a(i).ok_or_else(|| self.unsupported("missing input"))?;
                acc = e.push(ExprNode::Binary(Binary::Add, acc, y));
            }
            debug_assert_eq!(acc, e.nodes.len() - 1);
            return Ok(Sym::Expr { root, expr: e, sources });
        }
        let x = a(0).ok_or_else(|| self.unsupported("missing input 0"))?;
        let n = self.node;
        let un = |e: &mut Expr, f: Unary| e.push(ExprNode::Unary(f, x));
        let bin = |e: &mut Expr, f: Binary| -> Result<usize, OnnxError> {
            let y = a(1).ok_or_else(|| self.unsupported("missing input 1"))?;
            Ok(e.push(ExprNode::Binary(f, x, y)))
        };
        match op.as_str() {
            "Add" => bin(&mut e, Binary::Add)?,
            "Sub" => bin(&mut e, Binary::Sub)?,
            "Mul" => bin(&mut e, Binary::Mul)?,
            "Div" => bin(&mut e, Binary::Div)?,
            "Pow" => bin(&mut e, Binary::Pow)?,
            "PRelu" => {
                if !matches!(inputs.get(1), Some(Some(Sym::Const(_)))) {
                    return Err(self.unsupported("PRelu slope must be a constant"));
                }
                bin(&mut e, Binary::PRelu)?
            }
            "Relu" => un(&mut e, Unary::Relu),
            "LeakyRelu" => un(&mut e, Unary::LeakyRelu { alpha: attr_f(n, "alpha", 0.01) }),
            "Elu" => un(&mut e, Unary::Elu { alpha: attr_f(n, "alpha", 1.0) }),
            "Celu" => un(&mut e, Unary::Celu { alpha: attr_f(n, "alpha", 1.0) }),
            "Selu" => un(
                &mut e,
                Unary::Selu {
                    // The spec's defaults are the float32 roundings of SELU's
                    // constants; PyTorch computes with the exact ones.
                    alpha: attr_f(n, "alpha", 1.673_263_242_354_377_3),
                    gamma: attr_f(n, "gamma", 1.050_700_987_355_480_5),
                },
            ),
            "Gelu" => match attr_s(n, "approximate").as_deref() {
                Some("tanh") => un(&mut e, Unary::GeluTanh),
                None | Some("none") => un(&mut e, Unary::Gelu),
                Some(other) => {
                    return Err(self.unsupported(format!("approximate=`{other}`")));
                }
            },
            "Softplus" => un(&mut e, Unary::Softplus),
            "Sigmoid" => un(&mut e, Unary::Sigmoid),
            "Tanh" => un(&mut e, Unary::Tanh),
            "HardSigmoid" => un(
                &mut e,
                Unary::HardSigmoid { alpha: attr_f(n, "alpha", 0.2), beta: attr_f(n, "beta", 0.5) },
            ),
            "HardSwish" => un(&mut e, Unary::HardSwish),
            "Softsign" => un(&mut e, Unary::Softsign),
            "Mish" => {
                let sp = un(&mut e, Unary::Softplus);
                let th = e.push(ExprNode::Unary(Unary::Tanh, sp));
                e.push(ExprNode::Binary(Binary::Mul, x, th))
            }
            "Erf" => un(&mut e, Unary::Erf),
            "Exp" => un(&mut e, Unary::Exp),
            "Log" => un(&mut e, Unary::Log),
            "Sqrt" => un(&mut e, Unary::Sqrt),
            "Abs" => un(&mut e, Unary::Abs),
            "Neg" => un(&mut e, Unary::Neg),
            "Reciprocal" => un(&mut e, Unary::Reciprocal),
            "Clip" => {
                let (min, max) = if self.opset < 11 {
                    (attr_f(n, "min", f64::NEG_INFINITY), attr_f(n, "max", f64::INFINITY))
                } else {
                    let scalar = |i: usize| -> Result<Option<f64>, OnnxError> {
                        match inputs.get(i) {
                            Some(Some(Sym::Const(t))) if t.numel() == 1 => Ok(Some(t.data[0])),
                            Some(Some(_)) => {
                                Err(self.unsupported("Clip bounds must be constant scalars"))
                            }
                            _ => Ok(None),
                        }
                    };
                    (scalar(1)?.unwrap_or(f64::NEG_INFINITY), scalar(2)?.unwrap_or(f64::INFINITY))
                };
                // Bounds were pushed as constant nodes above; they are unused,
                // which is harmless.
                un(&mut e, Unary::Clip { min, max })
            }
            other => unreachable!("{other} is not elementwise"),
        };
        Ok(Sym::Expr { root, expr: e, sources })
    }

    /// Inference batch-norm, `(x − mean)/√(var + ε)·scale + B` per channel:
    /// an affine map pending on its input (a diagonal and a bias).
    pub(crate) fn batchnorm(&mut self) -> Result<Sym, OnnxError> {
        let eps = attr_f(self.node, "epsilon", 1e-5);
        if attr_i(self.node, "training_mode", 0) != 0 {
            return Err(self.unsupported("training_mode=1"));
        }
        if self.node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(self.unsupported("running-statistics outputs are not supported"));
        }
        let c = |i: usize| {
            self.const_input(i)?
                .ok_or_else(|| self.unsupported("scale, B, mean and var must be constants"))
        };
        let (scale, bias, mean, var) = (c(1)?, c(2)?, c(3)?, c(4)?);
        let (root, base, mut sources) = match self.input(0)?.cloned() {
            Some(Sym::Value(v)) => (v, Expr::var(), vec![]),
            Some(Sym::Expr { root, expr, sources }) => (root, expr, sources),
            _ => return Err(self.unsupported("input must depend on the model input")),
        };
        let shape = self.net.shape(root).to_vec();
        let channels = shape.get(1).copied().unwrap_or(1);
        if [&scale, &bias, &mean, &var].iter().any(|t| t.numel() != channels) {
            return Err(self.unsupported(format!("parameters must have {channels} channels")));
        }
        // one scale and shift per channel, each read by the channel's
        // `inner` elements (a [1, C, ...] tensor)
        let inner: usize = shape.iter().skip(2).product();
        if shape.first().is_some_and(|&b| b != 1) {
            return Err(self.unsupported(format!("input {shape:?}: batch size must be 1")));
        }
        let (mul, add): (Vec<f64>, Vec<f64>) = (0..channels)
            .map(|ch| {
                let sc = scale.data[ch] / (var.data[ch] + eps).sqrt();
                (sc, bias.data[ch] - mean.data[ch] * sc)
            })
            .unzip();
        let mut e = Expr::var();
        let x = e.splice(&base, 0);
        let m = e.push_const_repeated(mul, inner.max(1));
        let xm = e.push(ExprNode::Binary(Binary::Mul, x, m));
        let t = e.push_const_repeated(add, inner.max(1));
        e.push(ExprNode::Binary(Binary::Add, xm, t));
        sources.push("BatchNormalization".into());
        Ok(Sym::Expr { root, expr: e, sources })
    }

    /// `Mul` of two tensors that depend on the input (a gate), or `Div` by
    /// one (the product with its reciprocal): a `Product` layer whose first
    /// input has the output's shape and whose second broadcasts to it. In
    /// secant mode the second is frozen: the gate, or the denominator.
    pub(crate) fn product(&mut self, divide: bool) -> Result<Sym, OnnxError> {
        let (mut a, mut g) = (self.input_value(0)?, self.input_value(1)?);
        let (sa, sg) = (self.net.shape(a).to_vec(), self.net.shape(g).to_vec());
        if divide {
            let layer =
                Layer::Activation(nnlin_ir::Activation { expr: Expr::unary(Unary::Reciprocal) });
            g = self.net.push(
                format!("{}.reciprocal", node_name(self.node)),
                "Div",
                layer,
                vec![g],
            )?;
        } else if sa != sg && tensor::broadcast_shape(&sa, &sg).as_deref() == Some(sg.as_slice()) {
            // the larger operand first (its shape is the output's)
            std::mem::swap(&mut a, &mut g);
        }
        let (sa, sg) = (self.net.shape(a).to_vec(), self.net.shape(g).to_vec());
        if sa.len() != sg.len()
            || tensor::broadcast_shape(&sa, &sg).as_deref() != Some(sa.as_slice())
        {
            return Err(self.unsupported(format!(
                "a product of shapes {sa:?} and {sg:?} (one must broadcast to the other at equal rank)"
            )));
        }
        let layer = Layer::Product(nnlin_ir::Product {});
        let y = self.net.push(node_name(self.node), self.op().to_string(), layer, vec![a, g])?;
        Ok(Sym::Value(y))
    }

    /// `Add`/`Sub`/`Sum` of different tensors: an `Add` layer.
    pub(crate) fn branch_sum(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        if !matches!(op.as_str(), "Add" | "Sub" | "Sum") {
            return Err(self.unsupported(
                "elementwise op on two different tensors (only Add, Sub and Sum of branches are linear)",
            ));
        }
        let mut inputs = vec![];
        for i in 0..self.node.input.len() {
            if matches!(self.input(i)?, Some(Sym::Const(_))) {
                return Err(self.unsupported("a sum of branches and constants"));
            }
            inputs.push(self.input_value(i)?);
        }
        // broadcasting between branches (x − mean(x)): the smaller ones are
        // expanded by a selection
        let mut shape: Vec<usize> = vec![];
        for v in &inputs {
            shape = tensor::broadcast_shape(&shape, self.net.shape(*v))
                .ok_or_else(|| self.unsupported("branches whose shapes do not broadcast"))?;
        }
        for v in inputs.iter_mut() {
            if self.net.shape(*v) != shape.as_slice() {
                *v = self.expand_to(*v, &shape)?;
            }
        }
        let coeffs =
            (0..inputs.len()).map(|i| if op == "Sub" && i == 1 { -1.0 } else { 1.0 }).collect();
        let y = self.net.push(
            node_name(self.node),
            op,
            Layer::Add(nnlin_ir::Add { coeffs }),
            inputs,
        )?;
        Ok(Sym::Value(y))
    }
}
