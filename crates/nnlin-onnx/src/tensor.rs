//! Constant tensors at import time: decoding `TensorProto` and the small
//! constant folder (shape arithmetic, transposes, casts of initializers).

use crate::proto::{TensorProto, data_type as dt};

/// A constant tensor; integers are stored exactly as `f64` (|v| < 2^53).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Shape (empty for a scalar).
    pub dims: Vec<usize>,
    /// Row-major data.
    pub data: Vec<f64>,
    /// Whether the ONNX type is an integer or boolean type.
    pub is_int: bool,
}

impl Tensor {
    /// A tensor with the given shape and data.
    pub fn new(dims: Vec<usize>, data: Vec<f64>, is_int: bool) -> Self {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        Self { dims, data, is_int }
    }
    /// A 1-D integer tensor.
    pub fn ints(v: &[i64]) -> Self {
        Self::new(vec![v.len()], v.iter().map(|&x| x as f64).collect(), true)
    }
    /// Element count.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Data as integers.
    pub fn as_ints(&self) -> Vec<i64> {
        self.data.iter().map(|&x| x as i64).collect()
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = (h >> 10) & 0x1f;
    let frac = u32::from(h & 0x3ff);
    let bits = match exp {
        0 => {
            if frac == 0 {
                sign
            } else {
                // subnormal: value = frac · 2^-24
                let v = frac as f32 * (1.0 / 16_777_216.0);
                return if sign != 0 { -v } else { v };
            }
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        e => sign | ((u32::from(e) + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// Where a tensor's data lie when `data_location = EXTERNAL`: a file
/// (relative to the model's folder), a byte offset and a length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalRef {
    /// The `location` entry, as written in the model.
    pub location: String,
    /// The `offset` entry (0 if absent).
    pub offset: u64,
    /// The `length` entry (to the end of the file if absent).
    pub length: Option<u64>,
}

/// The external-data reference of a tensor stored outside the model, if it
/// is one.
pub fn external_ref(t: &TensorProto) -> Result<Option<ExternalRef>, String> {
    if t.data_location != Some(1) {
        return Ok(None);
    }
    let (mut location, mut offset, mut length) = (None, 0u64, None);
    for e in &t.external_data {
        let value = e.value.clone().unwrap_or_default();
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("external data {what} `{value}` is not a byte count"))
        };
        match e.key.as_deref() {
            Some("location") => location = Some(value.clone()),
            Some("offset") => offset = number("offset")?,
            Some("length") => length = Some(number("length")?),
            _ => {}
        }
    }
    let location = location.ok_or("external data without a location")?;
    Ok(Some(ExternalRef { location, offset, length }))
}

/// Decodes a `TensorProto` (typed fields or `raw_data`, little-endian).
/// External data must have been resolved into `raw_data` first.
pub fn decode(t: &TensorProto) -> Result<Tensor, String> {
    if t.data_location == Some(1) {
        return Err(
            "external data was not resolved (load the model from its file, or pass a resolver)"
                .into(),
        );
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        dims.push(usize::try_from(d).map_err(|_| format!("negative dimension {d}"))?);
    }
    let numel = nnlin_ir::checked_numel(&dims)
        .ok_or_else(|| format!("shape {dims:?} has more elements than memory can hold"))?;
    let ty = t.data_type.unwrap_or(0);
    let is_int = !matches!(ty, dt::FLOAT | dt::DOUBLE | dt::FLOAT16);
    let data: Vec<f64> = if let Some(raw) = t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        let width = match ty {
            dt::FLOAT | dt::INT32 | dt::UINT32 => 4,
            dt::DOUBLE | dt::INT64 | dt::UINT64 => 8,
            dt::FLOAT16 | dt::INT16 | dt::UINT16 => 2,
            dt::INT8 | dt::UINT8 | dt::BOOL => 1,
            other => return Err(format!("unsupported tensor data type {other}")),
        };
        if numel.checked_mul(width) != Some(raw.len()) {
            return Err(format!(
                "raw_data holds {} bytes, shape {:?} needs {}",
                raw.len(),
                dims,
                numel.saturating_mul(width)
            ));
        }
        if ty == dt::FLOAT {
            // the weights' type: its own loop (no type match per element)
            raw.chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect()
        } else {
            raw.chunks_exact(width)
                .map(|c| match ty {
                    dt::FLOAT => f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))),
                    dt::DOUBLE => f64::from_le_bytes(c.try_into().expect("8 bytes")),
                    dt::INT32 => f64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))),
                    dt::UINT32 => f64::from(u32::from_le_bytes(c.try_into().expect("4 bytes"))),
                    dt::INT64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                    dt::UINT64 => u64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                    dt::FLOAT16 => f64::from(f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                    dt::INT16 => f64::from(i16::from_le_bytes([c[0], c[1]])),
                    dt::UINT16 => f64::from(u16::from_le_bytes([c[0], c[1]])),
                    dt::INT8 => f64::from(c[0] as i8),
                    _ => f64::from(c[0]),
                })
                .collect()
        }
    } else {
        match ty {
            dt::FLOAT => t.float_data.iter().map(|&v| f64::from(v)).collect(),
            dt::DOUBLE => t.double_data.clone(),
            dt::INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
            dt::UINT32 | dt::UINT64 => t.uint64_data.iter().map(|&v| v as f64).collect(),
            dt::FLOAT16 => t.int32_data.iter().map(|&v| f64::from(f16_to_f32(v as u16))).collect(),
            dt::INT32 | dt::INT16 | dt::INT8 | dt::UINT16 | dt::UINT8 | dt::BOOL => {
                t.int32_data.iter().map(|&v| f64::from(v)).collect()
            }
            other => return Err(format!("unsupported tensor data type {other}")),
        }
    };
    if data.len() != numel {
        return Err(format!("holds {} values, shape {:?} needs {}", data.len(), dims, numel));
    }
    Ok(Tensor { dims, data, is_int })
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Expands `t` to `shape` (which must be a broadcast of its shape).
pub fn broadcast_to(t: &Tensor, shape: &[usize]) -> Option<Vec<f64>> {
    if broadcast_shape(&t.dims, shape)? != shape {
        return None;
    }
    let n = shape.len();
    let numel: usize = shape.iter().product();
    if t.numel() == numel {
        return Some(t.data.clone());
    }
    // strides of t aligned to `shape`, 0 where broadcast
    let mut strides = vec![0usize; n];
    let mut s = 1;
    for i in (0..t.dims.len()).rev() {
        let j = i + n - t.dims.len();
        strides[j] = if t.dims[i] == 1 { 0 } else { s };
        s *= t.dims[i];
    }
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; n];
    for _ in 0..numel {
        let off: usize = idx.iter().zip(&strides).map(|(a, b)| a * b).sum();
        out.push(t.data[off]);
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(out)
}

/// Elementwise binary op with broadcasting.
pub fn binary(a: &Tensor, b: &Tensor, f: impl Fn(f64, f64) -> f64) -> Option<Tensor> {
    let shape = broadcast_shape(&a.dims, &b.dims)?;
    let (x, y) = (broadcast_to(a, &shape)?, broadcast_to(b, &shape)?);
    let data = x.iter().zip(&y).map(|(&p, &q)| f(p, q)).collect();
    Some(Tensor::new(shape, data, a.is_int && b.is_int))
}

/// Row-major strides of a shape (elements, not bytes).
pub fn strides(dims: &[usize]) -> Vec<usize> {
    let mut st = vec![1usize; dims.len()];
    for ax in (0..dims.len().saturating_sub(1)).rev() {
        st[ax] = st[ax + 1] * dims[ax + 1];
    }
    st
}

/// Transpose by a permutation.
pub fn transpose(t: &Tensor, perm: &[usize]) -> Tensor {
    let n = t.dims.len();
    let out_dims: Vec<usize> = perm.iter().map(|&p| t.dims[p]).collect();
    let in_strides = strides(&t.dims);
    let numel = t.numel();
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; n];
    for _ in 0..numel {
        let off: usize = (0..n).map(|d| idx[d] * in_strides[perm[d]]).sum();
        out.push(t.data[off]);
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < out_dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::new(out_dims, out, t.is_int)
}

/// Well-known constants that exporters write as float32 literals.
const KNOWN: &[f64] = &[
    std::f64::consts::SQRT_2,
    std::f64::consts::FRAC_1_SQRT_2,
    std::f64::consts::PI,
    std::f64::consts::E,
    std::f64::consts::FRAC_2_SQRT_PI,
    0.797_884_560_802_865_4, // √(2/π), tanh-GELU
    1.673_263_242_354_377_3, // SELU alpha
    1.050_700_987_355_480_5, // SELU scale
    1.0 / 6.0,
    1.0 / 3.0,
];

/// Recovers the intended `f64` of a float32 *literal* (an attribute such as
/// ELU's alpha, or a scalar `Constant` node such as GELU's √2): a well-known
/// constant whose float32 rounding it is, else the shortest decimal that
/// round-trips through float32 (0.8f32 → 0.8). PyTorch keeps such literals in
/// double precision, so this is what a float64 copy of the model computes.
/// Weight tensors (initializers) are never touched: their float32 values are
/// the model.
pub fn literal_f32(v: f32) -> f64 {
    if let Some(&c) = KNOWN.iter().find(|&&c| c as f32 == v) {
        return c;
    }
    format!("{v}").parse::<f64>().unwrap_or(f64::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TensorProto;

    fn proto(dims: &[i64], ty: i32) -> TensorProto {
        TensorProto { dims: dims.to_vec(), data_type: Some(ty), ..Default::default() }
    }

    #[test]
    fn typed_fields_and_raw_data_decode_alike() {
        let vals = [1.5f32, -2.25, 0.0, 3.0e-5];
        let mut typed = proto(&[2, 2], dt::FLOAT);
        typed.float_data = vals.to_vec();
        let mut raw = proto(&[2, 2], dt::FLOAT);
        raw.raw_data = Some(vals.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into());
        let (a, b) = (decode(&typed).unwrap(), decode(&raw).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.dims, vec![2, 2]);
        assert_eq!(a.data[1], -2.25);

        let mut d = proto(&[2], dt::DOUBLE);
        d.double_data = vec![0.1, 0.2];
        assert_eq!(decode(&d).unwrap().data, vec![0.1, 0.2]);
        let mut i = proto(&[3], dt::INT64);
        i.int64_data = vec![-1, 0, 7];
        let t = decode(&i).unwrap();
        assert!(t.is_int);
        assert_eq!(t.as_ints(), vec![-1, 0, 7]);
        let mut h = proto(&[2], dt::FLOAT16);
        h.raw_data = Some(vec![0x00, 0x3c, 0x00, 0xc0].into()); // 1.0, -2.0
        assert_eq!(decode(&h).unwrap().data, vec![1.0, -2.0]);
    }

    #[test]
    fn bad_tensors_are_errors() {
        let mut t = proto(&[3], dt::FLOAT);
        t.raw_data = Some(vec![0; 8].into());
        assert!(decode(&t).unwrap_err().contains("raw_data holds 8 bytes"));
        let mut t = proto(&[2], dt::FLOAT);
        t.float_data = vec![1.0];
        assert!(decode(&t).is_err());
        let mut t = proto(&[1], dt::FLOAT);
        t.data_location = Some(1);
        assert!(decode(&t).unwrap_err().contains("external data"));
    }

    #[test]
    fn broadcasting_and_transpose() {
        let t = Tensor::new(vec![2, 1], vec![1.0, 2.0], false);
        assert_eq!(broadcast_to(&t, &[2, 3]).unwrap(), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert!(broadcast_to(&t, &[3, 3]).is_none());
        let m = Tensor::new(vec![2, 3], (0..6).map(f64::from).collect(), false);
        let tt = transpose(&m, &[1, 0]);
        assert_eq!(tt.dims, vec![3, 2]);
        assert_eq!(tt.data, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn float32_literals_read_back_as_their_doubles() {
        assert_eq!(literal_f32(0.8f32), 0.8);
        assert_eq!(literal_f32(std::f32::consts::SQRT_2), std::f64::consts::SQRT_2);
        assert_eq!(literal_f32(1.673_263_2_f32), 1.673_263_242_354_377_3);
        assert_eq!(literal_f32(1e-5f32), 1e-5);
    }
}
