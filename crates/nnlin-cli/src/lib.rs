//! The `nnlin` command line's library part: PNG drawing for heat maps,
//! neuron maps and figures (`plot`). The `nnlin` binary (`src/main.rs`) is
//! the command line itself; the `nnlin` library crate has none of its
//! dependencies (clap, image, indicatif, flate2).

pub mod plot;
