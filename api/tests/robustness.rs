//! No input may panic the reader, converter or validator: every corpus file
//! truncated at many points and with bytes flipped is run through the whole
//! pipeline (the fuzz target in fuzz/ does the same with coverage guidance).

use std::path::PathBuf;

use mesh_api::analysis::{analyze, parse_sources, read_path};
use mesh_api::load::parse_stream;

fn corpus() -> Vec<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut texts = Vec::new();
    for dir in ["tests/corpus/valid", "tests/corpus/invalid", "../samples"] {
        for s in read_path(&root.join(dir)).unwrap() {
            texts.push(s.text);
        }
    }
    texts
}

fn run(text: &str) {
    let analysis = analyze(parse_stream("x.yaml", text));
    for r in &analysis.resources {
        let json = serde_json::to_string(&r.to_json()).unwrap();
        let again = analyze(parse_stream("again.json", &json));
        assert_eq!(again.resources.len(), 1, "{json}");
    }
}

#[test]
fn truncated_and_mutated_inputs_do_not_panic() {
    // A small deterministic generator: the same inputs on every run.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let interesting: &[&[u8]] = &[
        b"{",
        b"}",
        b"[",
        b"-",
        b":",
        b"\"",
        b"'",
        b"*",
        b"&",
        b"!",
        b"|",
        b"\n",
        b"  ",
        b"0",
        b"-1",
        b"99999999999999999999",
        b"\t",
        b"~",
        b"%",
        b"\\",
        b"1e309",
    ];
    let mut runs = 0;
    for text in corpus() {
        let bytes = text.as_bytes();
        // Truncations.
        for cut in (0..bytes.len()).step_by(37) {
            if let Ok(t) = std::str::from_utf8(&bytes[..cut]) {
                run(t);
                runs += 1;
            }
        }
        // Insertions of syntax characters at random points.
        for _ in 0..40 {
            let at = (next() as usize) % bytes.len().max(1);
            let what = interesting[(next() as usize) % interesting.len()];
            let mut m = bytes[..at].to_vec();
            m.extend_from_slice(what);
            m.extend_from_slice(&bytes[at..]);
            if let Ok(t) = std::str::from_utf8(&m) {
                run(t);
                runs += 1;
            }
        }
    }
    assert!(runs > 1000, "only {runs} runs");
}

#[test]
fn hostile_documents_are_rejected_not_panicked_on() {
    let cases = [
        // Deeply nested flow collections.
        format!("apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {{name: x}}\nspec: {}{}", "[".repeat(5000), "]".repeat(5000)),
        // A billion-laughs style alias bomb.
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\ni: [*h, *h, *h, *h, *h, *h, *h, *h, *h]\napiVersion: v1\nkind: X\n".to_string(),
        // A regex that would be huge once compiled.
        "apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [a]\n  http:\n  - match: [{uri: {regex: \"(a{1000}){1000}\"}}]\n    route: [{destination: {host: a}}]\n".to_string(),
        // Numbers out of every range.
        "apiVersion: networking.mesh.dev/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a, port: {number: 99999999999}}, weight: -5}]\n    timeout: 99999999999999999h\n".to_string(),
    ];
    for text in &cases {
        let analysis = analyze(parse_sources(&[mesh_api::analysis::Source {
            name: "hostile.yaml".into(),
            text: text.clone(),
        }]));
        assert!(analysis.errors() > 0, "accepted: {text:.200}");
    }
}
