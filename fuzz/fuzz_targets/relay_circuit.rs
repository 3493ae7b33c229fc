//! Stateful: arbitrary sequences of cells, timer ticks and exit-driver callbacks fed to one
//! relay `CircuitCore` with simulated time (see `allium_fuzz::run_circuit`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| allium_fuzz::run_circuit(data));
