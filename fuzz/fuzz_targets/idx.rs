//! The IDX readers (optionally gzip) on arbitrary bytes: decompression stops
//! at the size the header states.
#![no_main]
#![allow(dead_code)]

#[path = "../../crates/nnlin-cli/src/io.rs"]
mod io;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    io::set_budget(64 << 20);
    let _ = io::read_idx(data);
    let _ = io::parse_labels(data, Path::new("labels-idx1-ubyte.gz"));
    let _ = io::parse_instances(data, Path::new("x-idx3-ubyte"), &[1, 1, 4, 4], false, Some(0..2));
});
