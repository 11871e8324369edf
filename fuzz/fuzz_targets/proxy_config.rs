//! A proxy config file → compiled snapshot must never panic: a bad config
//! is an error naming its path, whatever the bytes.
//!
//! Run: `cargo fuzz run proxy_config`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::model::ProxyConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = serde_yaml::from_str::<ProxyConfig>(text) else {
        return;
    };
    let registry = mesh_proxy::cluster::Registry::default();
    let _ = mesh_proxy::state::compile(cfg, &registry, &[]);
});
