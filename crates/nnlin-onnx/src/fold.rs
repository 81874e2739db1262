//! Constant folding: a node whose inputs are all constant is evaluated at
//! import time.

use super::*;

impl Importer<'_> {
    /// Folds a node whose inputs are all constant.
    pub(crate) fn fold(&self) -> Result<Tensor, OnnxError> {
        let n = self.node;
        let op = self.op();
        let c = |i: usize| -> Result<Tensor, OnnxError> {
            self.const_input(i)?.ok_or_else(|| self.unsupported(format!("missing input {i}")))
        };
        let unary = |f: fn(f64) -> f64| -> Result<Tensor, OnnxError> {
            let t = c(0)?;
            let data = t.data.iter().map(|&v| f(v)).collect();
            Ok(Tensor::new(t.dims, data, false))
        };
        let bin = |f: fn(f64, f64) -> f64| -> Result<Tensor, OnnxError> {
            let (a, b) = (c(0)?, c(1)?);
            if let Some(shape) = tensor::broadcast_shape(&a.dims, &b.dims) {
                self.check_shape("the folded constant", &shape)?;
            }
            let mut t = tensor::binary(&a, &b, f)
                .ok_or_else(|| self.unsupported("constant shapes do not broadcast"))?;
            if t.is_int {
                t.data.iter_mut().for_each(|v| *v = v.trunc());
            }
            Ok(t)
        };
        let bool_bin = |f: fn(f64, f64) -> bool| -> Result<Tensor, OnnxError> {
            let (a, b) = (c(0)?, c(1)?);
            if let Some(shape) = tensor::broadcast_shape(&a.dims, &b.dims) {
                self.check_shape("the folded constant", &shape)?;
            }
            let mut t = tensor::binary(&a, &b, |x, y| f64::from(u8::from(f(x, y))))
                .ok_or_else(|| self.unsupported("constant shapes do not broadcast"))?;
            t.is_int = true;
            Ok(t)
        };
        Ok(match op {
            "Identity" | "Dropout" => c(0)?,
            "Add" => bin(|a, b| a + b)?,
            "Sub" => bin(|a, b| a - b)?,
            "Mul" => bin(|a, b| a * b)?,
            "Div" => bin(|a, b| a / b)?,
            "Pow" => bin(f64::powf)?,
            "Neg" => {
                let t = c(0)?;
                Tensor::new(t.dims.clone(), t.data.iter().map(|v| -v).collect(), t.is_int)
            }
            "Sqrt" => unary(f64::sqrt)?,
            "Exp" => unary(f64::exp)?,
            "Log" => unary(f64::ln)?,
            "Reciprocal" => unary(|v| 1.0 / v)?,
            "Erf" => unary(libm_erf)?,
            "Tanh" => unary(f64::tanh)?,
            "Sigmoid" => unary(|v| 1.0 / (1.0 + (-v).exp()))?,
            "Relu" => unary(|v| v.max(0.0))?,
            "Cast" | "CastLike" => {
                let t = c(0)?;
                let is_int = if op == "CastLike" {
                    c(1)?.is_int
                } else {
                    !matches!(attr_i(n, "to", 1), 1 | 10 | 11 | 16)
                };
                let data = if is_int {
                    t.data.iter().map(|v| v.trunc()).collect()
                } else {
                    t.data.clone()
                };
                Tensor::new(t.dims, data, is_int)
            }
            "Transpose" => {
                let t = c(0)?;
                let perm = self.perm(t.dims.len())?;
                tensor::transpose(&t, &perm)
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                let t = c(0)?;
                let dims = self.reshape_target(&t.dims)?;
                Tensor::new(dims, t.data, t.is_int)
            }
            "ConstantOfShape" => {
                let shape = self.sizes("dimension", &c(0)?.as_ints())?;
                let numel = self.check_shape("the constant", &shape)?;
                let (value, is_int) = match attr(n, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => {
                        let t = tensor::decode(t).map_err(|reason| OnnxError::BadTensor {
                            name: node_name(n),
                            reason,
                        })?;
                        (t.data.first().copied().unwrap_or(0.0), t.is_int)
                    }
                    None => (0.0, false),
                };
                Tensor::new(shape, vec![value; numel], is_int)
            }
            "Shape" => {
                let t = c(0)?;
                Tensor::ints(&t.dims.iter().map(|&d| d as i64).collect::<Vec<_>>())
            }
            "Concat" => {
                let parts: Vec<Tensor> = (0..n.input.len()).map(c).collect::<Result<_, _>>()?;
                let first = parts.first().ok_or_else(|| self.unsupported("no inputs"))?;
                let rank = first.dims.len();
                let axis = norm_axis(attr_i(n, "axis", 0), rank)
                    .ok_or_else(|| self.unsupported("bad axis"))?;
                let same = |p: &Tensor| {
                    p.dims.len() == rank
                        && p.dims
                            .iter()
                            .zip(&first.dims)
                            .enumerate()
                            .all(|(i, (a, b))| i == axis || a == b)
                };
                if !parts.iter().all(same) {
                    return Err(self.unsupported("concatenated shapes differ off the axis"));
                }
                let mut dims = first.dims.clone();
                dims[axis] = parts.iter().map(|p| p.dims[axis]).sum();
                self.check_shape("the concatenation", &dims)?;
                let outer: usize = dims[..axis].iter().product();
                let mut data = Vec::with_capacity(parts.iter().map(Tensor::numel).sum());
                for o in 0..outer {
                    for p in &parts {
                        let inner: usize = p.dims[axis..].iter().product();
                        data.extend_from_slice(&p.data[o * inner..(o + 1) * inner]);
                    }
                }
                Tensor::new(dims, data, parts.iter().all(|p| p.is_int))
            }
            "Tile" => {
                let t = c(0)?;
                let reps = self.sizes("repeats", &c(1)?.as_ints())?;
                if reps.len() != t.dims.len() {
                    return Err(self.unsupported("repeats must have one entry per axis"));
                }
                let dims: Option<Vec<usize>> =
                    t.dims.iter().zip(&reps).map(|(d, r)| d.checked_mul(*r)).collect();
                let dims = dims.ok_or_else(|| self.unsupported("the tiled shape overflows"))?;
                let numel = self.check_shape("the tiled tensor", &dims)?;
                let rank = dims.len();
                let st = tensor::strides(&t.dims);
                let data = (0..numel)
                    .map(|flat| {
                        let (mut rem, mut src) = (flat, 0);
                        for ax in (0..rank).rev() {
                            src += (rem % dims[ax]) % t.dims[ax] * st[ax];
                            rem /= dims[ax];
                        }
                        t.data[src]
                    })
                    .collect();
                Tensor::new(dims, data, t.is_int)
            }
            "Range" => {
                let scalar = |i: usize| -> Result<f64, OnnxError> {
                    match c(i)?.data.as_slice() {
                        [v] if v.is_finite() => Ok(*v),
                        _ => Err(self.unsupported("start, limit and delta must be finite scalars")),
                    }
                };
                let (start, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
                if delta == 0.0 {
                    return Err(self.unsupported("delta 0"));
                }
                let steps = ((limit - start) / delta).ceil().max(0.0);
                let count = if steps.is_finite() && steps < 2f64.powi(62) {
                    Some(steps as usize)
                } else {
                    None
                };
                let count = self.check_alloc(&format!("a range of {steps} elements"), count, 8)?;
                let data: Vec<f64> = (0..count).map(|i| start + i as f64 * delta).collect();
                Tensor::new(vec![count], data, c(0)?.is_int)
            }
            "Slice" => {
                let t = c(0)?;
                let rank = t.dims.len();
                let (starts, ends, axes, steps) = if self.opset < 10 {
                    (
                        attr_ints(n, "starts").unwrap_or_default(),
                        attr_ints(n, "ends").unwrap_or_default(),
                        attr_ints(n, "axes"),
                        None,
                    )
                } else {
                    (
                        c(1)?.as_ints(),
                        c(2)?.as_ints(),
                        self.const_input(3)?.map(|t| t.as_ints()),
                        self.const_input(4)?.map(|t| t.as_ints()),
                    )
                };
                let axes: Vec<i64> = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
                if [ends.len(), axes.len(), steps.len()].iter().any(|&l| l != starts.len()) {
                    return Err(self.unsupported(format!(
                        "{} starts, {} ends, {} axes and {} steps (all must be equal)",
                        starts.len(),
                        ends.len(),
                        axes.len(),
                        steps.len()
                    )));
                }
                // per axis: the list of source indices
                let mut picks: Vec<Vec<usize>> = t.dims.iter().map(|&d| (0..d).collect()).collect();
                for k in 0..starts.len() {
                    let ax =
                        norm_axis(axes[k], rank).ok_or_else(|| self.unsupported("bad axis"))?;
                    let d = t.dims[ax] as i64;
                    let step = steps[k];
                    if step == 0 {
                        return Err(self.unsupported("step 0"));
                    }
                    let clampi = |v: i64, lo: i64, hi: i64| {
                        let v = if v < 0 { v + d } else { v };
                        v.clamp(lo, hi)
                    };
                    let mut idx = vec![];
                    if step > 0 {
                        let (mut i, e) = (clampi(starts[k], 0, d), clampi(ends[k], 0, d));
                        while i < e {
                            idx.push(i as usize);
                            let Some(next) = i.checked_add(step) else { break };
                            i = next;
                        }
                    } else {
                        let (mut i, e) = (clampi(starts[k], -1, d - 1), clampi(ends[k], -1, d - 1));
                        while i > e {
                            idx.push(i as usize);
                            let Some(next) = i.checked_add(step) else { break };
                            i = next;
                        }
                    }
                    picks[ax] = idx;
                }
                let dims: Vec<usize> = picks.iter().map(Vec::len).collect();
                let numel: usize = dims.iter().product();
                let st = tensor::strides(&t.dims);
                let mut data = Vec::with_capacity(numel);
                let mut idx = vec![0usize; rank];
                for _ in 0..numel {
                    data.push(t.data[(0..rank).map(|a| picks[a][idx[a]] * st[a]).sum::<usize>()]);
                    for a in (0..rank).rev() {
                        idx[a] += 1;
                        if idx[a] < dims[a] {
                            break;
                        }
                        idx[a] = 0;
                    }
                }
                Tensor::new(dims, data, t.is_int)
            }
            "Expand" => {
                let t = c(0)?;
                let shape = self.sizes("dimension", &c(1)?.as_ints())?;
                let out = tensor::broadcast_shape(&t.dims, &shape)
                    .ok_or_else(|| self.unsupported("shapes do not broadcast"))?;
                self.check_shape("the expanded constant", &out)?;
                let data =
                    tensor::broadcast_to(&t, &out).ok_or_else(|| self.unsupported("broadcast"))?;
                Tensor::new(out, data, t.is_int)
            }
            "Equal" => bool_bin(|a, b| a == b)?,
            "Less" => bool_bin(|a, b| a < b)?,
            "LessOrEqual" => bool_bin(|a, b| a <= b)?,
            "Greater" => bool_bin(|a, b| a > b)?,
            "GreaterOrEqual" => bool_bin(|a, b| a >= b)?,
            "And" => bool_bin(|a, b| a != 0.0 && b != 0.0)?,
            "Or" => bool_bin(|a, b| a != 0.0 || b != 0.0)?,
            "Xor" => bool_bin(|a, b| (a != 0.0) != (b != 0.0))?,
            "Not" => {
                let t = c(0)?;
                Tensor::new(
                    t.dims,
                    t.data.iter().map(|&v| f64::from(u8::from(v == 0.0))).collect(),
                    true,
                )
            }
            "Floor" => unary(f64::floor)?,
            "Ceil" => unary(f64::ceil)?,
            "Sign" => unary(|v| {
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            })?,
            // integer Mod takes the divisor's sign (Python's %); fmod = 1
            // the dividend's, as C's fmod
            "Mod" if attr_i(n, "fmod", 0) != 0 => bin(|a, b| a % b)?,
            "Mod" => bin(|a, b| a - b * (a / b).floor())?,
            "Where" => {
                let (cond, a, b) = (c(0)?, c(1)?, c(2)?);
                let shape = tensor::broadcast_shape(&cond.dims, &a.dims)
                    .and_then(|s| tensor::broadcast_shape(&s, &b.dims))
                    .ok_or_else(|| self.unsupported("shapes do not broadcast"))?;
                self.check_shape("the selected constant", &shape)?;
                let bc = |t: &Tensor| {
                    tensor::broadcast_to(t, &shape).ok_or_else(|| self.unsupported("broadcast"))
                };
                let (cv, av, bv) = (bc(&cond)?, bc(&a)?, bc(&b)?);
                let data =
                    (0..cv.len()).map(|i| if cv[i] != 0.0 { av[i] } else { bv[i] }).collect();
                Tensor::new(shape, data, a.is_int && b.is_int)
            }
            "Gather" => {
                let (t, idx) = (c(0)?, c(1)?);
                let axis = norm_axis(attr_i(n, "axis", 0), t.dims.len())
                    .ok_or_else(|| self.unsupported("bad axis"))?;
                let len = t.dims[axis] as i64;
                let picks = idx
                    .as_ints()
                    .iter()
                    .map(|&i| {
                        let j = if i < 0 { i + len } else { i };
                        (0..len).contains(&j).then_some(j as usize).ok_or_else(|| {
                            self.unsupported(format!("index {i} out of range for {len}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut dims = t.dims[..axis].to_vec();
                dims.extend(&idx.dims);
                dims.extend(&t.dims[axis + 1..]);
                self.check_shape("the gathered tensor", &dims)?;
                let outer: usize = t.dims[..axis].iter().product();
                let inner: usize = t.dims[axis + 1..].iter().product();
                let mut data = Vec::with_capacity(outer * picks.len() * inner);
                for o in 0..outer {
                    for &j in &picks {
                        let at = (o * t.dims[axis] + j) * inner;
                        data.extend_from_slice(&t.data[at..at + inner]);
                    }
                }
                Tensor::new(dims, data, t.is_int)
            }
            "ScatterND" => {
                // a copy of data with the slices named by indices replaced
                // (or combined, per `reduction`) by updates
                let (data, idx, upd) = (c(0)?, c(1)?, c(2)?);
                let (r, q) = (data.dims.len(), idx.dims.len());
                let k = idx.dims.last().copied().unwrap_or(0);
                if q == 0 || k == 0 || k > r {
                    return Err(self.unsupported(format!(
                        "indices of shape {:?} for data of rank {r}",
                        idx.dims
                    )));
                }
                let mut want = idx.dims[..q - 1].to_vec();
                want.extend(&data.dims[k..]);
                if upd.dims != want {
                    return Err(self.unsupported(format!(
                        "updates of shape {:?}, expected {want:?}",
                        upd.dims
                    )));
                }
                let combine: fn(f64, f64) -> f64 = match attr_s(n, "reduction").as_deref() {
                    None | Some("none") => |_, u| u,
                    Some("add") => |a, u| a + u,
                    Some("mul") => |a, u| a * u,
                    Some("max") => f64::max,
                    Some("min") => f64::min,
                    Some(other) => return Err(self.unsupported(format!("reduction={other}"))),
                };
                let slice: usize = data.dims[k..].iter().product();
                let st = tensor::strides(&data.dims);
                let ints = idx.as_ints();
                let mut out = data.data.clone();
                for (t, tuple) in ints.chunks_exact(k).enumerate() {
                    let mut at = 0usize;
                    for (a, &i) in tuple.iter().enumerate() {
                        let d = data.dims[a] as i64;
                        let j = if i < 0 { i + d } else { i };
                        if !(0..d).contains(&j) {
                            return Err(self.unsupported(format!("index {i} out of range for {d}")));
                        }
                        at += j as usize * st[a];
                    }
                    for (o, &u) in out[at..at + slice].iter_mut().zip(&upd.data[t * slice..]) {
                        *o = combine(*o, u);
                    }
                }
                Tensor::new(data.dims.clone(), out, data.is_int && upd.is_int)
            }
            other => {
                return Err(OnnxError::UnsupportedOp {
                    node: node_name(n),
                    op_type: other.to_string(),
                });
            }
        })
    }
}
