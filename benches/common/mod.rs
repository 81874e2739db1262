//! Shared by the benches.

use std::sync::Arc;

use nnlin::linalg::{ConvGeometry, ConvOp};

/// The convolutions of the benchmark workloads the kernels' thresholds
/// are measured on: LeNet-5's two, ONet's first three, a CIFAR ResNet's
/// 64-channel 3×3.
#[allow(dead_code)] // (a bench without convolutions includes this module too)
pub fn workload_convs() -> Vec<(&'static str, ConvOp)> {
    vec![
        ("lenet5_conv1", conv(1, 6, 28, 5, 2)),
        ("lenet5_conv2", conv(6, 16, 14, 5, 0)),
        ("onet_conv1", conv(3, 32, 48, 3, 0)),
        ("onet_conv2", conv(32, 64, 23, 3, 0)),
        ("onet_conv3", conv(64, 64, 10, 3, 0)),
        ("resnet_3x3_64ch_32px", conv(64, 64, 32, 3, 1)),
    ]
}

/// A stride-1 `k × k` convolution over `c_in × hw × hw` with padding `pad`
/// and fixed pseudo-random weights.
pub fn conv(c_in: usize, c_out: usize, hw: usize, k: usize, pad: usize) -> ConvOp {
    strided_conv(c_in, c_out, hw, k, 1, pad)
}

/// [`conv`] with stride `s` in both directions.
pub fn strided_conv(
    c_in: usize,
    c_out: usize,
    hw: usize,
    k: usize,
    s: usize,
    pad: usize,
) -> ConvOp {
    let o = (hw + 2 * pad - k) / s + 1;
    let n = c_out * c_in * k * k;
    let weight: Vec<f64> = (0..n).map(|i| ((i * 7919) % 1000) as f64 / 1000.0 - 0.5).collect();
    ConvOp::new(
        ConvGeometry {
            c_in,
            c_out,
            groups: 1,
            ih: hw,
            iw: hw,
            kh: k,
            kw: k,
            stride: (s, s),
            dilation: (1, 1),
            pad: (pad, pad),
            oh: o,
            ow: o,
        },
        Arc::new(weight),
    )
    .unwrap()
}
