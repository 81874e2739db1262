//! Layer builders: one method per structural operator, each lowering an
//! ONNX node to IR layers exactly.

use super::*;

impl Importer<'_> {
    /// A `Softmax`/`LogSoftmax` inside the graph (attention weights). Before
    /// opset 13 the input is read as 2-D, `[∏ dims[..axis], ∏ dims[axis..]]`.
    pub(crate) fn softmax(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let rank = shape.len();
        let default = if self.opset < 13 { 1 } else { -1 };
        let axis = norm_axis(attr_i(self.node, "axis", default), rank)
            .ok_or_else(|| self.unsupported("bad axis"))?;
        let log = op == "LogSoftmax";
        let name = node_name(self.node);
        let coerced = self.opset < 13 && axis + 1 < rank;
        if !coerced {
            let layer = Layer::Softmax(nnlin_ir::Softmax { axis, log });
            return Ok(Sym::Value(self.net.push(name, op, layer, vec![x])?));
        }
        let slice: usize = shape[axis..].iter().product();
        let flat = vec![shape[..axis].iter().product(), slice];
        let r = Layer::Reshape(nnlin_ir::Reshape { shape: flat });
        let v = self.net.push(format!("{name}.2d"), op.clone(), r, vec![x])?;
        let layer = Layer::Softmax(nnlin_ir::Softmax { axis: 1, log });
        let v = self.net.push(name.clone(), op.clone(), layer, vec![v])?;
        let back = Layer::Reshape(nnlin_ir::Reshape { shape });
        Ok(Sym::Value(self.net.push(format!("{name}.nd"), op, back, vec![v])?))
    }

    /// `v` broadcast to `shape` (numpy rules): a selection.
    pub(crate) fn expand_to(&mut self, v: ValueId, shape: &[usize]) -> Result<ValueId, OnnxError> {
        let small = self.net.shape(v).to_vec();
        let mut padded = vec![1; shape.len().saturating_sub(small.len())];
        padded.extend(&small);
        self.check_shape("the broadcast value", shape)?;
        let src = nnlin_ir::broadcast_index(shape, &padded).into_iter().map(Some).collect();
        let layer = Layer::Select(nnlin_ir::Select { shape: shape.to_vec(), src, fill: vec![] });
        let name = format!("{}.expand{}", node_name(self.node), v.0);
        Ok(self.net.push(name, "Expand", layer, vec![v])?)
    }

    /// `(x − mean) / √(var + ε)` over `axes`, as layers: a mean (`Reduce`),
    /// its broadcast subtracted (`Add`), the mean of squares, `1/√(· + ε)`
    /// (an activation) and their `Product`. Tangent mode is the Jacobian;
    /// secant mode freezes the standard deviation (the product's gate),
    /// while the mean subtraction is linear and stays exact.
    pub(crate) fn normalize(
        &mut self,
        x: ValueId,
        axes: Vec<usize>,
        eps: f64,
    ) -> Result<ValueId, OnnxError> {
        let name = node_name(self.node);
        let op = self.op().to_string();
        let shape = self.net.shape(x).to_vec();
        let reduce =
            |axes: &Vec<usize>| Layer::Reduce(nnlin_ir::Reduce { axes: axes.clone(), mean: true });
        let mean = self.net.push(format!("{name}.mean"), op.clone(), reduce(&axes), vec![x])?;
        let mean = self.expand_to(mean, &shape)?;
        let sub = Layer::Add(nnlin_ir::Add { coeffs: vec![1.0, -1.0] });
        let centred = self.net.push(format!("{name}.centred"), op.clone(), sub, vec![x, mean])?;
        let mut sq = Expr::var();
        sq.push(ExprNode::Binary(Binary::Mul, 0, 0));
        let sq = Layer::Activation(nnlin_ir::Activation { expr: sq });
        let squared = self.net.push(format!("{name}.squared"), op.clone(), sq, vec![centred])?;
        let var =
            self.net.push(format!("{name}.variance"), op.clone(), reduce(&axes), vec![squared])?;
        let mut inv = Expr::var();
        let e = inv.push_const(vec![eps]);
        let ve = inv.push(ExprNode::Binary(Binary::Add, 0, e));
        let sd = inv.push(ExprNode::Unary(Unary::Sqrt, ve));
        inv.push(ExprNode::Unary(Unary::Reciprocal, sd));
        let inv = Layer::Activation(nnlin_ir::Activation { expr: inv });
        let inv_sd = self.net.push(format!("{name}.inv_std"), op.clone(), inv, vec![var])?;
        let product = Layer::Product(nnlin_ir::Product {});
        Ok(self.net.push(name, op, product, vec![centred, inv_sd])?)
    }

    /// `LayerNormalization`, `InstanceNormalization`, `GroupNormalization`:
    /// [`Self::normalize`] over their axes, then the scale and bias (an
    /// `Affine` layer).
    pub(crate) fn normalization(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        if self.node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(
                self.unsupported("the mean and inverse-deviation outputs are not supported")
            );
        }
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let rank = shape.len();
        let eps = attr_f(self.node, "epsilon", 1e-5);
        let scale =
            self.const_input(1)?.ok_or_else(|| self.unsupported("scale must be a constant"))?;
        let bias = self.const_input(2)?;
        let name = node_name(self.node);
        // each parameter element's value for every element of the output
        let (y, per_element): (ValueId, PerElement) = match op.as_str() {
            "LayerNormalization" => {
                let axis = norm_axis(attr_i(self.node, "axis", -1), rank)
                    .ok_or_else(|| self.unsupported("bad axis"))?;
                let y = self.normalize(x, (axis..rank).collect(), eps)?;
                let sh = shape.clone();
                (y, Box::new(move |t: &Tensor| tensor::broadcast_to(t, &sh)))
            }
            _ => {
                let channels = shape.get(1).copied().unwrap_or(0);
                if rank < 3 {
                    return Err(self.unsupported(format!("input {shape:?} has no spatial axes")));
                }
                let groups = if op == "InstanceNormalization" {
                    channels
                } else {
                    usize::try_from(attr_i(self.node, "num_groups", 0)).unwrap_or(0)
                };
                if groups == 0 || channels % groups != 0 {
                    return Err(self.unsupported(format!(
                        "num_groups {groups} must divide the {channels} channels"
                    )));
                }
                let y = if groups == channels {
                    self.normalize(x, (2..rank).collect(), eps)?
                } else {
                    let per_group = shape[1..].iter().product::<usize>() / groups;
                    let grouped =
                        Layer::Reshape(nnlin_ir::Reshape { shape: vec![1, groups, per_group] });
                    let g =
                        self.net.push(format!("{name}.groups"), op.clone(), grouped, vec![x])?;
                    let n = self.normalize(g, vec![2], eps)?;
                    let back = Layer::Reshape(nnlin_ir::Reshape { shape: shape.clone() });
                    self.net.push(format!("{name}.ungroup"), op.clone(), back, vec![n])?
                };
                // per channel, or per group (GroupNormalization at opset 18)
                let spatial: usize = shape[2..].iter().product();
                (
                    y,
                    Box::new(move |t: &Tensor| {
                        let per = match t.numel() {
                            n if n == channels => 1,
                            n if n == groups => channels / groups,
                            _ => return None,
                        };
                        Some(
                            (0..channels)
                                .flat_map(|c| std::iter::repeat_n(t.data[c / per], spatial))
                                .collect(),
                        )
                    }),
                )
            }
        };
        let sc = per_element(&scale)
            .ok_or_else(|| self.unsupported(format!("scale of shape {:?}", scale.dims)))?;
        let sh = match &bias {
            None => vec![0.0; sc.len()],
            Some(b) => per_element(b)
                .ok_or_else(|| self.unsupported(format!("bias of shape {:?}", b.dims)))?,
        };
        let layer = Layer::Affine(nnlin_ir::Affine::per_element(sc, sh));
        Ok(Sym::Value(self.net.push(format!("{name}.affine"), op, layer, vec![y])?))
    }

    /// Spatial attributes of Conv / pooling: (kernel, strides, dilations,
    /// pads as (top, left, bottom, right)), with 1-D lifted to 2-D.
    pub(crate) fn window(
        &self,
        spatial: &[usize],
        kernel: &[usize],
        ceil: bool,
    ) -> Result<nnlin_ir::Window, OnnxError> {
        let n = self.node;
        let rank = spatial.len();
        if !(1..=2).contains(&rank) || kernel.len() != rank {
            return Err(self.unsupported(format!(
                "only 1-D and 2-D windows are supported (input spatial {spatial:?})"
            )));
        }
        let ints = |name: &str, default: usize| -> Result<Vec<usize>, OnnxError> {
            match attr_ints(n, name) {
                None => Ok(vec![default; rank]),
                Some(v) => self.sizes(name, &v),
            }
        };
        let strides = ints("strides", 1)?;
        let dil = ints("dilations", 1)?;
        if strides.len() != rank || dil.len() != rank {
            return Err(self.unsupported("strides/dilations do not match the kernel rank"));
        }
        if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
            return Err(self.unsupported(format!(
                "strides {strides:?}, dilations {dil:?} and kernel {kernel:?} must be positive"
            )));
        }
        let auto_pad = attr_s(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let pads: Vec<usize> = match auto_pad.as_str() {
            "NOTSET" => match attr_ints(n, "pads") {
                None => vec![0; 2 * rank],
                Some(v) => self.sizes("pads", &v)?,
            },
            "VALID" => vec![0; 2 * rank],
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut p = vec![0; 2 * rank];
                for i in 0..rank {
                    let out = spatial[i].div_ceil(strides[i]);
                    let need = (out.saturating_sub(1))
                        .checked_mul(strides[i])
                        .and_then(|v| v.checked_add((kernel[i] - 1).checked_mul(dil[i])?))
                        .and_then(|v| v.checked_add(1))
                        .ok_or_else(|| self.unsupported("the window overflows"))?
                        .saturating_sub(spatial[i]);
                    let (small, big) = (need / 2, need - need / 2);
                    if auto_pad == "SAME_UPPER" {
                        (p[i], p[i + rank]) = (small, big)
                    } else {
                        (p[i], p[i + rank]) = (big, small)
                    }
                }
                p
            }
            other => return Err(self.unsupported(format!("auto_pad={other}"))),
        };
        if pads.len() != 2 * rank {
            return Err(self.unsupported("pads do not match the kernel rank"));
        }
        let w = if rank == 1 {
            nnlin_ir::Window::new(
                (1, spatial[0]),
                (1, kernel[0]),
                (1, strides[0]),
                (1, dil[0]),
                (0, pads[0], 0, pads[1]),
                ceil,
            )
        } else {
            nnlin_ir::Window::new(
                (spatial[0], spatial[1]),
                (kernel[0], kernel[1]),
                (strides[0], strides[1]),
                (dil[0], dil[1]),
                (pads[0], pads[1], pads[2], pads[3]),
                ceil,
            )
        };
        let w = w.ok_or_else(|| {
            self.unsupported(format!(
                "kernel {kernel:?} (pads {pads:?}) does not fit input {spatial:?}"
            ))
        })?;
        self.check_alloc("the output positions", w.oh.checked_mul(w.ow), 8)?;
        Ok(w)
    }

    pub(crate) fn conv(&mut self) -> Result<Sym, OnnxError> {
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let w = self
            .take_const_input(1)?
            .ok_or_else(|| self.unsupported("weight must be a constant"))?;
        if shape.len() < 3 || shape[0] != 1 || w.dims.len() != shape.len() {
            return Err(self.unsupported(format!("input {shape:?} with weight {:?}", w.dims)));
        }
        let group = attr_i(self.node, "group", 1);
        let groups = match usize::try_from(group) {
            Ok(g) if g > 0 => g,
            _ => return Err(self.unsupported(format!("group {group} must be positive"))),
        };
        let kernel = w.dims[2..].to_vec();
        if let Some(k) = attr_ints(self.node, "kernel_shape")
            && k.iter().map(|&v| usize::try_from(v).ok()).collect::<Vec<_>>()
                != kernel.iter().map(|&v| Some(v)).collect::<Vec<_>>()
        {
            return Err(self.unsupported("kernel_shape disagrees with the weight"));
        }
        let window = self.window(&shape[2..], &kernel, false)?;
        let (c_in, c_out) = (shape[1], w.dims[0]);
        if w.dims[1].checked_mul(groups) != Some(c_in) || c_out % groups != 0 {
            return Err(self.unsupported(format!(
                "weight {:?} with {groups} groups on {c_in} channels",
                w.dims
            )));
        }
        // the structured kernel unfolds the input: (C_in/g·kh·kw) × (oh·ow)
        let unfolded = [w.dims[1], window.kh, window.kw, window.oh, window.ow];
        self.check_alloc("the unfolded input", nnlin_ir::checked_numel(&unfolded), 8)?;
        let bias = self.take_const_input(2)?.map(|b| b.data);
        let one_d = shape.len() == 3;
        let layer = Layer::Conv(nnlin_ir::Conv {
            window,
            c_in,
            c_out,
            groups,
            weight: std::sync::Arc::new(w.data),
            bias,
            one_d,
        });
        Ok(Sym::Value(self.net.push(node_name(self.node), "Conv", layer, vec![x])?))
    }

    /// `ConvTranspose` (1-D and 2-D), as the transpose of the convolution
    /// from its output space to its input space.
    pub(crate) fn conv_transpose(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let w = self
            .take_const_input(1)?
            .ok_or_else(|| self.unsupported("weight must be a constant"))?;
        let rank = shape.len().saturating_sub(2);
        if !(1..=2).contains(&rank) || shape[0] != 1 || w.dims.len() != shape.len() {
            return Err(self.unsupported(format!("input {shape:?} with weight {:?}", w.dims)));
        }
        let group = attr_i(n, "group", 1);
        let groups = match usize::try_from(group) {
            Ok(g) if g > 0 => g,
            _ => return Err(self.unsupported(format!("group {group} must be positive"))),
        };
        let c_in = shape[1];
        if w.dims[0] != c_in || !c_in.is_multiple_of(groups) {
            return Err(self.unsupported(format!(
                "weight {:?} with {groups} groups on {c_in} channels",
                w.dims
            )));
        }
        let c_out = w.dims[1]
            .checked_mul(groups)
            .ok_or_else(|| self.unsupported("the channel count overflows"))?;
        let kernel = w.dims[2..].to_vec();
        let list = |name: &str, default: usize| -> Result<Vec<usize>, OnnxError> {
            match attr_ints(n, name) {
                None => Ok(vec![default; rank]),
                Some(v) => self.sizes(name, &v),
            }
        };
        let (strides, dil, out_pad) =
            (list("strides", 1)?, list("dilations", 1)?, list("output_padding", 0)?);
        if strides.len() != rank || dil.len() != rank || out_pad.len() != rank {
            return Err(
                self.unsupported("strides/dilations/output_padding do not match the kernel rank")
            );
        }
        if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
            return Err(self.unsupported(format!(
                "strides {strides:?}, dilations {dil:?} and kernel {kernel:?} must be positive"
            )));
        }
        let spatial = &shape[2..];
        // the full extent s·(in − 1) + output_padding + d·(k − 1) + 1
        let mut full = Vec::with_capacity(rank);
        for i in 0..rank {
            let f = (spatial[i] - 1)
                .checked_mul(strides[i])
                .and_then(|v| v.checked_add(out_pad[i]))
                .and_then(|v| v.checked_add((kernel[i] - 1).checked_mul(dil[i])?))
                .and_then(|v| v.checked_add(1))
                .ok_or_else(|| self.unsupported("the output extent overflows"))?;
            full.push(f);
        }
        let auto_pad = attr_s(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let target: Option<Vec<usize>> = match attr_ints(n, "output_shape") {
            Some(v) => {
                let v = self.sizes("output_shape", &v)?;
                // output_shape may list the spatial axes or all of them
                Some(if v.len() == rank + 2 { v[2..].to_vec() } else { v })
            }
            None if auto_pad.starts_with("SAME") => {
                Some(spatial.iter().zip(&strides).map(|(a, b)| a.saturating_mul(*b)).collect())
            }
            None => None,
        };
        let pads: Vec<usize> = match (&target, auto_pad.as_str()) {
            (Some(t), _) => {
                if t.len() != rank {
                    return Err(self.unsupported("output_shape does not match the kernel rank"));
                }
                let mut p = vec![0; 2 * rank];
                for i in 0..rank {
                    let total = full[i].checked_sub(t[i]).ok_or_else(|| {
                        self.unsupported(format!(
                            "output_shape {t:?} exceeds the full extent {full:?}"
                        ))
                    })?;
                    let (half, rest) = (total / 2, total - total / 2);
                    (p[i], p[i + rank]) =
                        if auto_pad == "SAME_UPPER" { (half, rest) } else { (rest, half) };
                }
                p
            }
            (None, "NOTSET") => match attr_ints(n, "pads") {
                None => vec![0; 2 * rank],
                Some(v) => self.sizes("pads", &v)?,
            },
            (None, "VALID") => vec![0; 2 * rank],
            (None, other) => return Err(self.unsupported(format!("auto_pad={other}"))),
        };
        if pads.len() != 2 * rank {
            return Err(self.unsupported("pads do not match the kernel rank"));
        }
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let o = full[i].checked_sub(pads[i] + pads[i + rank]).filter(|&o| o > 0);
            out.push(o.ok_or_else(|| self.unsupported(format!("pads {pads:?} leave no output")))?);
        }
        let g2 = |v: &[usize], d: usize| if rank == 1 { (d, v[0]) } else { (v[0], v[1]) };
        let (pt, pl, pb, pr) =
            if rank == 1 { (0, pads[0], 0, pads[1]) } else { (pads[0], pads[1], pads[2], pads[3]) };
        let window = nnlin_ir::Window::new(
            g2(&out, 1),
            g2(&kernel, 1),
            g2(&strides, 1),
            g2(&dil, 1),
            (pt, pl, pb, pr),
            false,
        )
        .filter(|w| (w.oh, w.ow) == g2(spatial, 1))
        .ok_or_else(|| {
            self.unsupported(format!(
                "output_padding {out_pad:?} must be smaller than the stride or the dilation"
            ))
        })?;
        let unfolded = [w.dims[1], window.kh, window.kw, window.oh, window.ow];
        self.check_alloc("the unfolded input", nnlin_ir::checked_numel(&unfolded), 8)?;
        self.check_shape("the output", &[c_out, window.ih, window.iw])?;
        let bias = self.take_const_input(2)?.map(|b| b.data);
        let conv = nnlin_ir::Conv {
            window,
            c_in: c_out,
            c_out: c_in,
            groups,
            weight: std::sync::Arc::new(w.data),
            bias: None,
            one_d: rank == 1,
        };
        let layer = Layer::ConvTranspose(nnlin_ir::ConvTranspose { conv, bias });
        Ok(Sym::Value(self.net.push(node_name(n), "ConvTranspose", layer, vec![x])?))
    }

    pub(crate) fn pool(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        if self.node.output.len() > 1 && !self.node.output[1].is_empty() {
            return Err(self.unsupported("the Indices output is not supported"));
        }
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        if shape.len() < 3 || shape[0] != 1 {
            return Err(self.unsupported(format!("input {shape:?}")));
        }
        let spatial = &shape[2..];
        let global = op.starts_with("Global");
        let window = if global {
            global_window(spatial).ok_or_else(|| self.unsupported("only 1-D and 2-D pooling"))?
        } else {
            let kernel = attr_ints(self.node, "kernel_shape")
                .ok_or_else(|| self.unsupported("missing kernel_shape"))?;
            let kernel = self.sizes("kernel_shape", &kernel)?;
            self.window(spatial, &kernel, attr_i(self.node, "ceil_mode", 0) != 0)?
        };
        let taps = [shape[1], window.oh, window.ow, window.kh, window.kw];
        self.check_alloc("the pooling windows' taps", nnlin_ir::checked_numel(&taps), 8)?;
        let kind = if op.contains("Max") {
            nnlin_ir::PoolKind::Max
        } else {
            nnlin_ir::PoolKind::Average {
                count_include_pad: attr_i(self.node, "count_include_pad", 0) != 0,
            }
        };
        if let nnlin_ir::PoolKind::Max = kind
            && (0..window.oh).any(|oy| (0..window.ow).any(|ox| window.taps_in_input(oy, ox) == 0))
        {
            return Err(self.unsupported("a max-pool window lies entirely in the padding"));
        }
        let layer = Layer::Pool(nnlin_ir::Pool {
            window,
            channels: shape[1],
            kind,
            one_d: shape.len() == 3,
        });
        Ok(Sym::Value(self.net.push(node_name(self.node), op, layer, vec![x])?))
    }

    /// `ReduceMean`/`ReduceSum` over the spatial axes (how the dynamo
    /// exporter writes adaptive average pooling to 1): a global average pool,
    /// scaled for a sum, reshaped when `keepdims = 0`.
    pub(crate) fn reduce(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let rank = shape.len();
        let axes = match attr_ints(self.node, "axes") {
            Some(a) => Some(a),
            None => self.const_input(1)?.map(|t| t.as_ints()),
        };
        let mut axes: Vec<usize> = match axes {
            Some(a) => a
                .iter()
                .map(|&v| norm_axis(v, rank).ok_or_else(|| self.unsupported("bad axis")))
                .collect::<Result<_, _>>()?,
            None => (0..rank).collect(),
        };
        axes.sort_unstable();
        if axes.windows(2).any(|w| w[0] == w[1]) {
            return Err(self.unsupported(format!("duplicate axes {axes:?}")));
        }
        if axes.is_empty() && attr_i(self.node, "noop_with_empty_axes", 0) != 0 {
            return Ok(Sym::Value(x));
        }
        if axes.is_empty() {
            axes = (0..rank).collect();
        }
        let spatial: Vec<usize> = (2..rank).collect();
        if rank < 3 || axes != spatial || rank > 4 {
            // any other axes: a Reduce layer (the spatial case stays a pool)
            let name = node_name(self.node);
            let layer =
                Layer::Reduce(nnlin_ir::Reduce { axes: axes.clone(), mean: op == "ReduceMean" });
            let mut v = self.net.push(name.clone(), op.clone(), layer, vec![x])?;
            if attr_i(self.node, "keepdims", 1) == 0 {
                let kept: Vec<usize> =
                    (0..rank).filter(|a| !axes.contains(a)).map(|a| shape[a]).collect();
                let layer = Layer::Reshape(nnlin_ir::Reshape { shape: kept });
                v = self.net.push(format!("{name}.squeeze"), op, layer, vec![v])?;
            }
            return Ok(Sym::Value(v));
        }
        let window =
            global_window(&shape[2..]).ok_or_else(|| self.unsupported("empty spatial axes"))?;
        let name = node_name(self.node);
        let kind = nnlin_ir::PoolKind::Average { count_include_pad: false };
        let layer =
            Layer::Pool(nnlin_ir::Pool { window, channels: shape[1], kind, one_d: rank == 3 });
        let mut v = self.net.push(name.clone(), op.clone(), layer, vec![x])?;
        if op == "ReduceSum" {
            let count: usize = shape[2..].iter().product();
            let n = self.net.numel(v);
            let layer = Layer::Affine(nnlin_ir::Affine {
                scale: vec![count as f64; n.min(1)],
                shift: vec![0.0; n.min(1)],
                spatial: n.max(1),
            });
            v = self.net.push(format!("{name}.sum"), op.clone(), layer, vec![v])?;
        }
        if attr_i(self.node, "keepdims", 1) == 0 {
            let layer = Layer::Reshape(nnlin_ir::Reshape { shape: shape[..2].to_vec() });
            v = self.net.push(format!("{name}.squeeze"), op, layer, vec![v])?;
        }
        Ok(Sym::Value(v))
    }

    /// `Split`: every output is a slice along the axis (of a constant, or a
    /// selection of a tensor that depends on the input).
    pub(crate) fn split(&mut self) -> Result<(), OnnxError> {
        let sym = self.input(0)?.cloned().ok_or_else(|| self.unsupported("missing input"))?;
        let dims = self.shape_of(&sym);
        let axis = norm_axis(attr_i(self.node, "axis", 0), dims.len())
            .ok_or_else(|| self.unsupported("bad axis"))?;
        let sizes = self.split_sizes(dims[axis], self.node.output.len())?;
        let (source, index) = match &sym {
            Sym::Const(t) => (None, t.clone()),
            _ => {
                let v = self.input_value(0)?;
                let numel = self.net.numel(v);
                (Some(v), Tensor::new(dims.clone(), (0..numel).map(|k| k as f64).collect(), false))
            }
        };
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let mut start = 0;
        for (k, &len) in sizes.iter().enumerate() {
            let name = self.node.output[k].clone();
            let mut part_dims = dims.clone();
            part_dims[axis] = len;
            let mut data = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                let at = (o * dims[axis] + start) * inner;
                data.extend_from_slice(&index.data[at..at + len * inner]);
            }
            start += len;
            if name.is_empty() {
                continue;
            }
            let part = Tensor::new(part_dims.clone(), data, index.is_int);
            let sym = match source {
                None => Sym::Const(part),
                Some(v) => {
                    let src = part.data.iter().map(|&d| Some(d as usize)).collect();
                    let layer =
                        Layer::Select(nnlin_ir::Select { shape: part_dims, src, fill: vec![] });
                    Sym::Value(self.net.push(name.clone(), "Split", layer, vec![v])?)
                }
            };
            self.syms.insert(name, sym);
        }
        Ok(())
    }

    /// `Slice`, `Gather`, `Expand`, `Tile`, `Where` and `Concat` with
    /// constants, on tensors that depend on the input: a [`Layer::Select`].
    /// The constant folder computes it: it runs on a tensor of element
    /// indices in place of the data (constants as negative codes into a fill
    /// table), so each op's indexing rules are written once.
    pub(crate) fn select(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        let n_in = self.node.input.len();
        let data_inputs: Vec<usize> = match op.as_str() {
            "Where" => vec![1, 2],
            "Concat" => (0..n_in).collect(),
            _ => vec![0],
        };
        for i in 0..n_in {
            if !data_inputs.contains(&i) && !matches!(self.input(i)?, None | Some(Sym::Const(_))) {
                return Err(self.unsupported(format!("input {i} must be a constant")));
            }
        }
        // the tensors that depend on the input, each once
        let mut values: Vec<ValueId> = vec![];
        for &i in &data_inputs {
            if matches!(self.input(i)?, Some(Sym::Value(_) | Sym::Expr { .. })) {
                let v = self.input_value(i)?;
                if !values.contains(&v) {
                    values.push(v);
                }
            }
        }
        // one source value: several are flattened and concatenated first
        let source = match values.as_slice() {
            [] => return Err(self.unsupported("no input depends on the model input")),
            [v] => *v,
            vs => {
                let mut flat = vec![];
                for (k, v) in vs.iter().enumerate() {
                    let numel = self.net.numel(*v);
                    let layer = Layer::Reshape(nnlin_ir::Reshape { shape: vec![numel] });
                    flat.push(self.net.push(
                        format!("{}.flat{k}", node_name(self.node)),
                        op.clone(),
                        layer,
                        vec![*v],
                    )?);
                }
                let layer = Layer::Concat(nnlin_ir::Concat { axis: 0 });
                self.net.push(
                    format!("{}.sources", node_name(self.node)),
                    op.clone(),
                    layer,
                    flat,
                )?
            }
        };
        let mut offset = std::collections::HashMap::new();
        let mut at = 0usize;
        for v in &values {
            offset.insert(*v, at);
            at += self.net.numel(*v);
        }
        // index tensors in place of the data inputs
        let mut fill: Vec<f64> = vec![];
        let mut saved = vec![];
        for &i in &data_inputs {
            let Some(name) = self.node.input.get(i).filter(|s| !s.is_empty()).cloned() else {
                continue;
            };
            if saved.iter().any(|(n, _)| n == &name) {
                continue;
            }
            let sym = self.syms.get(&name).cloned().expect("checked above");
            // the tensors that depend on the input were materialized above
            let index = match &sym {
                Sym::Const(t) => {
                    let base = fill.len();
                    fill.extend(&t.data);
                    let codes = (0..t.numel()).map(|k| -((base + k) as f64) - 1.0).collect();
                    Tensor::new(t.dims.clone(), codes, false)
                }
                Sym::Value(v) => {
                    let base = offset[v];
                    let numel = self.net.numel(*v);
                    let data = (0..numel).map(|k| (base + k) as f64).collect();
                    Tensor::new(self.net.shape(*v).to_vec(), data, false)
                }
                Sym::Expr { .. } => unreachable!("data inputs are materialized before indexing"),
            };
            saved.push((name.clone(), sym));
            self.syms.insert(name, Sym::Const(index));
        }
        let folded = self.fold();
        for (name, sym) in saved {
            self.syms.insert(name, sym);
        }
        let out = folded?;
        let mut src = Vec::with_capacity(out.numel());
        let mut consts = vec![0.0; if out.data.iter().any(|&d| d < 0.0) { out.numel() } else { 0 }];
        for (i, &d) in out.data.iter().enumerate() {
            if d >= 0.0 {
                src.push(Some(d as usize));
            } else {
                src.push(None);
                consts[i] = fill[(-d - 1.0) as usize];
            }
        }
        let layer = Layer::Select(nnlin_ir::Select { shape: out.dims, src, fill: consts });
        Ok(Sym::Value(self.net.push(node_name(self.node), op, layer, vec![source])?))
    }

    pub(crate) fn concat(&mut self) -> Result<Sym, OnnxError> {
        let mut inputs = vec![];
        for i in 0..self.node.input.len() {
            if matches!(self.input(i)?, Some(Sym::Const(_))) {
                return self.select();
            }
        }
        for i in 0..self.node.input.len() {
            inputs.push(self.input_value(i)?);
        }
        let rank = self.net.shape(inputs[0]).len();
        let axis = norm_axis(attr_i(self.node, "axis", 0), rank)
            .ok_or_else(|| self.unsupported("bad axis"))?;
        let layer = Layer::Concat(nnlin_ir::Concat { axis });
        Ok(Sym::Value(self.net.push(node_name(self.node), "Concat", layer, inputs)?))
    }

    pub(crate) fn pad(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        let x = self.input_value(0)?;
        let rank = self.net.shape(x).len();
        let mode_s = attr_s(n, "mode").unwrap_or_else(|| "constant".into());
        let (pads, value, axes): (Vec<i64>, f64, Option<Vec<i64>>) = if self.opset < 11 {
            (attr_ints(n, "pads").unwrap_or_default(), attr_f(n, "value", 0.0), None)
        } else {
            let pads = self
                .const_input(1)?
                .ok_or_else(|| self.unsupported("pads must be a constant"))?
                .as_ints();
            let value =
                self.const_input(2)?.map_or(0.0, |t| t.data.first().copied().unwrap_or(0.0));
            let axes = self.const_input(3)?.map(|t| t.as_ints());
            (pads, value, axes)
        };
        let axes: Vec<usize> = match axes {
            None => (0..rank).collect(),
            Some(a) => a
                .iter()
                .map(|&v| norm_axis(v, rank).ok_or_else(|| self.unsupported("bad axis")))
                .collect::<Result<_, _>>()?,
        };
        if pads.len() != 2 * axes.len() || pads.iter().any(|&p| p < 0) {
            return Err(
                self.unsupported(format!("pads {pads:?} (negative pads are not supported)"))
            );
        }
        let mut begin = vec![0; rank];
        let mut end = vec![0; rank];
        for (k, &ax) in axes.iter().enumerate() {
            begin[ax] = pads[k] as usize;
            end[ax] = pads[k + axes.len()] as usize;
        }
        let mode = match mode_s.as_str() {
            "constant" => nnlin_ir::PadMode::Constant(value),
            "reflect" => nnlin_ir::PadMode::Reflect,
            "edge" => nnlin_ir::PadMode::Edge,
            other => return Err(self.unsupported(format!("mode={other}"))),
        };
        let layer = Layer::Pad(nnlin_ir::Pad { begin, end, mode });
        Ok(Sym::Value(self.net.push(node_name(n), "Pad", layer, vec![x])?))
    }

    pub(crate) fn transpose(&mut self) -> Result<Sym, OnnxError> {
        let x = self.input_value(0)?;
        let rank = self.net.shape(x).len();
        let perm = self.perm(rank)?;
        let layer = Layer::Transpose(nnlin_ir::Transpose { perm });
        Ok(Sym::Value(self.net.push(node_name(self.node), "Transpose", layer, vec![x])?))
    }

    pub(crate) fn lrn(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        let x = self.input_value(0)?;
        let size = attr_i(n, "size", 0);
        if size <= 0 {
            return Err(self.unsupported("size must be positive"));
        }
        let layer = Layer::Lrn(nnlin_ir::Lrn {
            size: size as usize,
            alpha: attr_f(n, "alpha", 1e-4),
            beta: attr_f(n, "beta", 0.75),
            bias: attr_f(n, "bias", 1.0),
        });
        Ok(Sym::Value(self.net.push(node_name(n), "LRN", layer, vec![x])?))
    }

    pub(crate) fn dense(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        if self.op() == "MatMul" && matches!(self.input(1)?, Some(Sym::Value(_) | Sym::Expr { .. }))
        {
            // both factors depend on the input (attention)
            if matches!(self.input(0)?, Some(Sym::Const(_))) {
                return Err(self.unsupported("a constant times a tensor (MatMul(C, x))"));
            }
            let (a, b) = (self.input_value(0)?, self.input_value(1)?);
            let layer = Layer::MatMul(nnlin_ir::MatMul {});
            return Ok(Sym::Value(self.net.push(node_name(n), "MatMul", layer, vec![a, b])?));
        }
        let x = self.input_value(0)?;
        let xshape = self.net.shape(x).to_vec();
        let b = self.take_const_input(1)?.ok_or_else(|| self.unsupported("missing weight"))?;
        if b.dims.len() != 2 {
            return Err(
                self.unsupported(format!("weight must be a 2-D constant, got shape {:?}", b.dims))
            );
        }
        let (alpha, beta, trans_a, trans_b) = if self.op() == "Gemm" {
            (
                attr_f(n, "alpha", 1.0),
                attr_f(n, "beta", 1.0),
                attr_i(n, "transA", 0),
                attr_i(n, "transB", 0),
            )
        } else {
            (1.0, 1.0, 0, 0)
        };
        let (k, out) = if trans_b != 0 { (b.dims[1], b.dims[0]) } else { (b.dims[0], b.dims[1]) };
        if trans_a != 0 {
            // A is K×M; with one instance (M = 1) its data is the K-vector.
            if xshape != [k, 1] {
                return Err(self.unsupported(format!("transA with input shape {xshape:?}")));
            }
        }
        if self.op() == "Gemm" && trans_a == 0 && xshape.len() != 2 {
            return Err(self.unsupported(format!("Gemm input must be 2-D, got {xshape:?}")));
        }
        let mut weight = vec![0.0; out * k];
        for o in 0..out {
            for kk in 0..k {
                let w = if trans_b != 0 { b.data[o * k + kk] } else { b.data[kk * out + o] };
                weight[o * k + kk] = alpha * w;
            }
        }
        let bias = match self.const_input(2)? {
            None => None,
            Some(c) => {
                let full = tensor::broadcast_to(&c, &[out])
                    .or_else(|| tensor::broadcast_to(&c, &[1, out]))
                    .ok_or_else(|| self.unsupported(format!("bias of shape {:?}", c.dims)))?;
                Some(full.iter().map(|v| beta * v).collect())
            }
        };
        let mut v = x;
        if trans_a != 0 {
            v = self.net.push(
                format!("{}.transA", node_name(n)),
                "Gemm",
                Layer::Reshape(nnlin_ir::Reshape { shape: vec![1, k] }),
                vec![v],
            )?;
        }
        let layer = Layer::Dense(Dense { out_features: out, in_features: k, weight, bias });
        let source = self.op().to_string();
        let y = self.net.push(node_name(n), source, layer, vec![v])?;
        Ok(Sym::Value(y))
    }
}

/// The window of a global pool over 1-D or 2-D spatial axes (one output
/// position; `None` for other ranks or an empty axis).
fn global_window(spatial: &[usize]) -> Option<nnlin_ir::Window> {
    let (h, w) = match *spatial {
        [w] => (1, w),
        [h, w] => (h, w),
        _ => return None,
    };
    nnlin_ir::Window::new((h, w), (h, w), (1, 1), (1, 1), (0, 0, 0, 0), false)
}
