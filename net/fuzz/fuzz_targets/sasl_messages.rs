//! Authentication messages come from clients that have not authenticated:
//! SASL/PLAIN tokens, OAUTHBEARER initial responses and both SCRAM client
//! messages must be parsed totally — a result or an error, never a panic.
//!
//! Run: `cd net/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run sasl_messages`.
#![no_main]

use floe_net::scram::{self, Mechanism};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = floe_net::sasl::parse_plain(data);
    let _ = floe_net::oauth::parse_initial_response(data);
    let _ = scram::parse_client_first(data);
    // A client-final message against an exchange under way.
    let m = Mechanism::Sha512;
    let cred = m.credential(&[7; 64], b"salt", 4096);
    let first = scram::parse_client_first(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL")
        .expect("a valid client-first message");
    let (exchange, _) = scram::Exchange::start(m, first, &cred).expect("a valid credential");
    assert!(exchange.finish(data).is_err(), "a proof without the password");
});
