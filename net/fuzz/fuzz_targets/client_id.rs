//! client.id features come from any client: parsing must be total.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let f = floe_net::client_id::parse(&text);
    if let Some(z) = f.zone {
        assert!(z.len() <= floe_net::client_id::ZONE_BYTES_MAX);
    }
    if let Some(h) = f.host_override {
        assert!(h.len() <= floe_net::client_id::HOST_BYTES_MAX);
    }
});
