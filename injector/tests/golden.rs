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

#[test]
fn golden_files_native_and_classic() {
    for (name, input) in inputs() {
        let native = check(&name, &input, "native", Cluster { minor: 29 });
        let classic = check(&name, &input, "classic", Cluster { minor: 28 });
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
