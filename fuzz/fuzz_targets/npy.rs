//! The `.npy` readers (instances and labels) on arbitrary bytes.
#![no_main]
#![allow(dead_code)]

#[path = "../../crates/nnlin-cli/src/io.rs"]
mod io;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    io::set_budget(64 << 20);
    let _ = io::read_npy_any(data, Path::new("x.npy"));
    let _ = io::parse_labels(data, Path::new("y.npy"));
    let _ = io::parse_instances(data, Path::new("x.npy"), &[1, 4], false, Some(1..3));
    let _ = io::parse_instances(data, Path::new("x.csv"), &[1, 3], false, None);
});
