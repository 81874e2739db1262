//! Shape arithmetic: reshape targets, permutations, split sizes and the
//! legacy broadcast of old opsets.

use super::*;

impl Importer<'_> {
    /// Output shape of Reshape/Flatten/Squeeze/Unsqueeze applied to `dims`.
    pub(crate) fn reshape_target(&self, dims: &[usize]) -> Result<Vec<usize>, OnnxError> {
        let n = self.node;
        let numel: usize = dims.iter().product();
        let axes_of = |this: &Self| -> Result<Option<Vec<i64>>, OnnxError> {
            if let Some(a) = attr_ints(n, "axes") {
                return Ok(Some(a));
            }
            Ok(this.const_input(1)?.map(|t| t.as_ints()))
        };
        match self.op() {
            "Flatten" => {
                let axis = attr_i(n, "axis", 1);
                let a = if axis < 0 { axis + dims.len() as i64 } else { axis };
                if !(0..=dims.len() as i64).contains(&a) {
                    return Err(self.unsupported(format!("axis {axis} out of range")));
                }
                let lead: usize = dims[..a as usize].iter().product();
                Ok(vec![lead, numel / lead.max(1)])
            }
            "Reshape" => {
                let target = self
                    .const_input(1)?
                    .ok_or_else(|| self.unsupported("missing shape"))?
                    .as_ints();
                let allowzero = attr_i(n, "allowzero", 0) != 0;
                let mut out = Vec::with_capacity(target.len());
                let mut infer = None;
                for (i, &t) in target.iter().enumerate() {
                    match t {
                        -1 => {
                            infer = Some(i);
                            out.push(1);
                        }
                        0 if !allowzero => out.push(
                            *dims
                                .get(i)
                                .ok_or_else(|| self.unsupported("0 copies a missing dimension"))?,
                        ),
                        t if t >= 0 => out.push(t as usize),
                        t => return Err(self.unsupported(format!("bad dimension {t}"))),
                    }
                }
                if target.iter().filter(|&&t| t == -1).count() > 1 {
                    return Err(self.unsupported(format!("more than one -1 in {target:?}")));
                }
                if let Some(i) = infer {
                    let known = nnlin_ir::checked_numel(&out).ok_or_else(|| {
                        self.unsupported(format!("cannot reshape {dims:?} to {target:?}"))
                    })?;
                    if known == 0 || !numel.is_multiple_of(known) {
                        return Err(
                            self.unsupported(format!("cannot reshape {dims:?} to {target:?}"))
                        );
                    }
                    out[i] = numel / known;
                }
                if nnlin_ir::checked_numel(&out) != Some(numel) {
                    return Err(self.unsupported(format!("cannot reshape {dims:?} to {target:?}")));
                }
                Ok(out)
            }
            "Squeeze" => {
                let axes = axes_of(self)?;
                let rank = dims.len();
                let drop: Vec<usize> = match axes {
                    Some(a) => a
                        .iter()
                        .map(|&x| norm_axis(x, rank).ok_or_else(|| self.unsupported("bad axis")))
                        .collect::<Result<_, _>>()?,
                    None => (0..rank).filter(|&i| dims[i] == 1).collect(),
                };
                if drop.iter().any(|&i| dims[i] != 1) {
                    return Err(self.unsupported("squeezing a dimension that is not 1"));
                }
                Ok((0..rank).filter(|i| !drop.contains(i)).map(|i| dims[i]).collect())
            }
            "Unsqueeze" => {
                let axes = axes_of(self)?.ok_or_else(|| self.unsupported("missing axes"))?;
                let rank = dims.len() + axes.len();
                let mut ins: Vec<usize> = axes
                    .iter()
                    .map(|&x| norm_axis(x, rank).ok_or_else(|| self.unsupported("bad axis")))
                    .collect::<Result<_, _>>()?;
                ins.sort_unstable();
                if ins.windows(2).any(|w| w[0] == w[1]) {
                    return Err(self.unsupported(format!("duplicate axes {axes:?}")));
                }
                let mut out = Vec::with_capacity(rank);
                let mut it = dims.iter();
                for i in 0..rank {
                    if ins.contains(&i) {
                        out.push(1);
                    } else {
                        out.push(*it.next().ok_or_else(|| self.unsupported("bad axes"))?);
                    }
                }
                Ok(out)
            }
            other => unreachable!("{other} is not a reshape"),
        }
    }

    /// Opsets before 7 broadcast a constant only when `broadcast = 1`,
    /// aligning it at `axis` (PRelu: a per-channel slope at axis 1); later
    /// opsets use numpy rules. Returns the constant reshaped for numpy rules.
    pub(crate) fn legacy_broadcast(&self, t: &Tensor, rank: usize) -> Result<Tensor, OnnxError> {
        if self.opset >= 7 || t.numel() == 1 || t.dims.len() >= rank {
            return Ok(t.clone());
        }
        let axis = if self.op() == "PRelu" {
            1
        } else if attr_i(self.node, "broadcast", 0) != 0 {
            match attr(self.node, "axis").and_then(|a| a.i) {
                Some(a) => norm_axis(a, rank).ok_or_else(|| {
                    self.unsupported(format!("broadcast axis {a} outside rank {rank}"))
                })?,
                None => rank - t.dims.len(),
            }
        } else {
            return Ok(t.clone());
        };
        if axis + t.dims.len() > rank {
            return Err(self.unsupported(format!(
                "a constant of shape {:?} at axis {axis} exceeds rank {rank}",
                t.dims
            )));
        }
        let mut dims = vec![1; axis];
        dims.extend(&t.dims);
        dims.resize(rank, 1);
        Ok(Tensor::new(dims, t.data.clone(), t.is_int))
    }

    /// A transpose's permutation for `rank` axes (reversed by default),
    /// validated.
    pub(crate) fn perm(&self, rank: usize) -> Result<Vec<usize>, OnnxError> {
        let perm: Vec<usize> = match attr_ints(self.node, "perm") {
            Some(p) => self.sizes("perm entry", &p)?,
            None => (0..rank).rev().collect(),
        };
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if !sorted.iter().copied().eq(0..rank) {
            return Err(
                self.unsupported(format!("perm {perm:?} is not a permutation of {rank} axes"))
            );
        }
        Ok(perm)
    }

    /// The split sizes along `axis` of a tensor of length `len`, for
    /// `outputs` outputs (the `split` attribute or input, else equal parts).
    pub(crate) fn split_sizes(&self, len: usize, outputs: usize) -> Result<Vec<usize>, OnnxError> {
        let given = if self.opset < 13 {
            attr_ints(self.node, "split")
        } else {
            self.const_input(1)?.map(|t| t.as_ints())
        };
        let sizes = match given {
            Some(v) => self.sizes("split", &v)?,
            None => {
                let parts = match attr(self.node, "num_outputs").and_then(|a| a.i) {
                    Some(k) => usize::try_from(k).ok().filter(|&k| k > 0).ok_or_else(|| {
                        self.unsupported(format!("num_outputs {k} must be positive"))
                    })?,
                    None => outputs.max(1),
                };
                let each = len.div_ceil(parts);
                (0..parts).map(|k| each.min(len.saturating_sub(k * each))).collect()
            }
        };
        if sizes.len() != outputs
            || sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b)) != Some(len)
        {
            return Err(self.unsupported(format!(
                "split {sizes:?} does not cut an axis of {len} into {outputs} outputs"
            )));
        }
        Ok(sizes)
    }
}
