//! Runtime CPU dispatch for the crate's own inner loops (faer dispatches
//! its GEMMs itself): a kernel passed to [`dispatch`] is compiled a second
//! time for x86-64-v3 (AVX2) and that copy runs where the CPU has it.
//!
//! Only the vector width changes: Rust never contracts `a * b + c` into a
//! fused multiply-add, so both copies round every operation alike and give
//! the same bits.

/// Runs `f`, compiled for AVX2 where the CPU has it (through `pulp`, which
/// faer uses too). `f` and what it calls must be `#[inline(always)]` for the
/// AVX2 copy to reach the inner loops.
#[inline(always)]
pub(crate) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}
