//! Golden files: each input under `tests/golden/` is injected for a cluster
//! with native sidecars (1.29) and one without (1.28), and compared with
//! `<input>.native.out.yaml` and `<input>.classic.out.yaml`. Set
//! `MESH_UPDATE_GOLDEN=1` to rewrite them after a deliberate change.

use std::path::{Path, PathBuf};

use mesh_injector::{Cluster, Settings, inject_documents};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn inputs() -> Vec<(String, PathBuf)> {
    let samples = root().join("../samples");
    vec![
        ("tricky".into(), root().join("tests/golden/tricky.yaml")),
        (
            "bookinfo".into(),
            samples.join("bookinfo/platform/bookinfo.yaml"),
        ),
        ("callme".into(), samples.join("callme/platform/callme.yaml")),
    ]
}

fn check(name: &str, input: &Path, variant: &str, cluster: Cluster) -> String {
    let text = std::fs::read_to_string(input).unwrap();
    let got = inject_documents(&text, &Settings::default(), cluster)
        .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
    let golden = root().join(format!("tests/golden/{name}.{variant}.out.yaml"));
    if std::env::var_os("MESH_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_else(|_| {
        panic!(
            "{} is missing; run with MESH_UPDATE_GOLDEN=1 to write it",
            golden.display()
        )
    });
    assert!(
        got == want,
        "{} differs from {}; if the change is meant, rerun with MESH_UPDATE_GOLDEN=1\n{}",
        input.display(),
        golden.display(),
        first_difference(&want, &got)
    );
    got
}

fn first_difference(want: &str, got: &str) -> String {
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        if w != g {
            return format!("line {}: want {w:?}, got {g:?}", i + 1);
        }
    }
    format!(
        "lengths differ: want {} lines, got {}",
        want.lines().count(),
        got.lines().count()
    )
}

/// The documents of a YAML stream by `metadata.name`.
fn by_name(text: &str) -> Vec<(String, serde_yaml::Value)> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            (v["metadata"]["name"].as_str().unwrap_or("").to_string(), v)
        })
        .collect()
}

#[test]
fn golden_files_native_and_classic() {
    for (name, input) in inputs() {
        let native = check(&name, &input, "native", Cluster { minor: 29 });
        let classic = check(&name, &input, "classic", Cluster { minor: 28 });
        // What is not injected comes back as it went in.
        let given = by_name(&std::fs::read_to_string(&input).unwrap());
        for out in [&native, &classic] {
            let got = by_name(out);
            assert_eq!(got.len(), given.len());
            for ((n, want), (_, got)) in given.iter().zip(&got) {
                if ["untouched", "host-net", "opted-out", "already-injected"].contains(&n.as_str())
                {
                    assert_eq!(got, want, "{name}: {n} changed");
                }
            }
        }
        if name == "tricky" {
            assert!(given.iter().any(|(n, _)| n == "already-injected"));
        }
        // Injecting the output again changes nothing.
        for (out, cluster) in [
            (native, Cluster { minor: 29 }),
            (classic, Cluster { minor: 28 }),
        ] {
            let again = inject_documents(&out, &Settings::default(), cluster).unwrap();
            assert_eq!(again, out, "{name}: injection is not idempotent");
        }
    }
}
