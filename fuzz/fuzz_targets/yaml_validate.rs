//! YAML → resources → conversion → validation must never panic.
//!
//! Run: `cargo fuzz run yaml_validate` (seeds: api/tests/corpus, samples/).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::analysis::{Source, analyze};
use mesh_api::load::parse_stream;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let docs = parse_stream("fuzz.yaml", text);
    let analysis = analyze(docs);
    // Whatever was read must serialize and read back.
    for r in &analysis.resources {
        let yaml = serde_yaml_roundtrip(r);
        let _ = analyze(mesh_api::analysis::parse_sources(&[Source {
            name: "again.yaml".into(),
            text: yaml,
        }]));
    }
});

fn serde_yaml_roundtrip(r: &mesh_api::Resource) -> String {
    serde_json::to_string(&r.to_json()).unwrap_or_default()
}
