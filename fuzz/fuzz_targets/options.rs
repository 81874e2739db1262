//! The option parsers: rows, instance ranges, byte sizes, lists of numbers
//! (weights, box) and the whole command line.
#![no_main]
#![allow(dead_code)]

#[path = "../../crates/nnlin-cli/src/io.rs"]
mod io;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = s.parse::<nnlin::Rows>();
    let _ = io::split_range(Path::new(s));
    let _ = io::parse_bytes(s);
    let _ = io::parse_numbers(s, "--weights");
});
