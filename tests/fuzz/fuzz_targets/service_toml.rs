//! `service.toml` from a release: any text is refused with an error or
//! parses, never panics.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars = BTreeMap::from([
        ("port".to_owned(), "8080".to_owned()),
        ("BATON_HOST_ID".to_owned(), "h1".to_owned()),
    ]);
    let _ = baton_agent::service::parse(text, &vars);
});
