//! The header block of the HTTP responses the directory client parses.
#![no_main]
use allium_directory::client::http::fuzz_parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((status, _len)) = fuzz_parse_head(data) {
        // A status is only accepted from an HTTP/1.x status line.
        assert!(data.starts_with(b"HTTP/1."));
        let _ = status;
    }
});
