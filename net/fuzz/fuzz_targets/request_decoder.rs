//! Feeds arbitrary bytes, as one request frame, to floe's request decoder:
//! it must return a request or an error, never panic or abort.
//!
//! Run: `cd net/fuzz && cargo fuzz run request_decoder` (needs cargo-fuzz;
//! on a stable toolchain prefix with RUSTC_BOOTSTRAP=1).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = floe_net::request::decode(bytes::Bytes::copy_from_slice(data));
});
