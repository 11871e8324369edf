//! `manifests/crds/` must hold exactly what the types generate.

use std::path::PathBuf;

use mesh_api::{Kind, crd};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds")
}

#[test]
fn crds_match_the_types() {
    let update = std::env::var_os("MESH_UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for kind in Kind::ALL {
        let path = dir().join(crd::file_name(kind));
        let want = crd::to_yaml(kind);
        if update {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "CRDs differ from the types: {stale:?}\nrun MESH_UPDATE_GOLDEN=1 cargo test -p mesh-api --test crds"
    );
}

/// What the API server rejects in a CRD schema: keywords outside the
/// structural subset, and objects or arrays without a type.
fn structural_errors(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    let Value::Object(obj) = v else { return };
    for forbidden in [
        "patternProperties",
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "definitions",
        "dependencies",
        "additionalItems",
        "const",
    ] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: {forbidden}"));
        }
    }
    if (obj.contains_key("properties")
        || obj.contains_key("items")
        || obj.contains_key("additionalProperties"))
        && !obj.contains_key("type")
    {
        out.push(format!("{path}: no type"));
    }
    if let Some(f) = obj.get("format").and_then(Value::as_str) {
        const KNOWN: [&str; 6] = ["int32", "int64", "float", "double", "date-time", "byte"];
        if !KNOWN.contains(&f) {
            out.push(format!("{path}: format {f}"));
        }
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (k, child) in props {
            structural_errors(child, &format!("{path}.{k}"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = obj.get(key) {
            structural_errors(child, &format!("{path}.{key}"), out);
        }
    }
}

#[test]
fn every_schema_is_structural() {
    for kind in Kind::ALL {
        let value = serde_json::to_value(crd::crd(kind)).unwrap();
        let schema = value
            .pointer("/spec/versions/0/schema/openAPIV3Schema")
            .unwrap();
        let mut errors = Vec::new();
        structural_errors(schema, kind.name(), &mut errors);
        assert!(errors.is_empty(), "{kind}: {errors:#?}");
        assert_eq!(value["spec"]["group"], kind.group());
        assert_eq!(value["spec"]["names"]["plural"], kind.plural());
        assert_eq!(value["spec"]["scope"], "Namespaced");
    }
}
