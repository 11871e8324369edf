//! The config corpus: realistic configs that must be clean, and mistakes
//! whose findings must be exactly what each file's `# expect:` lines say.
//! Also: parse → serialize → parse gives the same resources, and whatever
//! conversion prints analyzes clean.

use std::path::{Path, PathBuf};

use mesh_api::analysis::{Source, analyze, parse_sources, read_path};
use mesh_api::convert::{Output, convert};
use mesh_api::load::{Item, parse_stream};
use mesh_api::validate::Severity;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn source(path: &Path, name: &str) -> Source {
    Source {
        name: name.to_string(),
        text: std::fs::read_to_string(path).unwrap(),
    }
}

/// Findings of one self-contained file, without the file name.
fn findings(path: &Path) -> Vec<String> {
    let name = path.file_name().unwrap().to_str().unwrap();
    let analysis = analyze(parse_sources(&[source(path, name)]));
    analysis
        .findings
        .iter()
        .map(|f| {
            let s = f.to_string();
            s.strip_prefix(&format!("{name}:"))
                .unwrap_or(&s)
                .to_string()
        })
        .collect()
}

#[test]
fn invalid_configs_report_exactly_the_expected_findings() {
    let dir = root().join("tests/corpus/invalid");
    let mut failures = Vec::new();
    for path in files(&dir) {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut want: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(str::to_string)
            .collect();
        assert!(
            !want.is_empty(),
            "{} has no # expect: lines",
            path.display()
        );
        let mut have = findings(&path);
        want.sort();
        have.sort();
        if want != have {
            failures.push(format!(
                "{}:\n  missing: {:#?}\n  unexpected: {:#?}",
                path.display(),
                want.iter()
                    .filter(|w| !have.contains(w))
                    .collect::<Vec<_>>(),
                have.iter()
                    .filter(|h| !want.contains(h))
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_configs_are_clean() {
    for path in files(&root().join("tests/corpus/valid")) {
        let found = findings(&path);
        assert!(found.is_empty(), "{}: {found:#?}", path.display());
    }
}

/// The samples, each with the resources it builds on.
fn sample_sets() -> Vec<Vec<PathBuf>> {
    let samples = root().join("../samples");
    let b = samples.join("bookinfo/networking");
    let base = [
        b.join("destination-rule-all.yaml"),
        b.join("bookinfo-gateway.yaml"),
    ];
    let mut sets = vec![
        base.to_vec(),
        vec![b.join("destination-rule-reviews-circuit-breaker.yaml")],
    ];
    for f in files(&b) {
        let name = f.file_name().unwrap().to_str().unwrap();
        if name.starts_with("virtual-service-") {
            sets.push(vec![base[0].clone(), base[1].clone(), f]);
        }
    }
    for f in files(&samples.join("bookinfo/security")) {
        sets.push(vec![f]);
    }
    let c = samples.join("callme/networking");
    sets.push(vec![
        c.join("destination-rule.yaml"),
        c.join("gateway.yaml"),
        c.join("virtual-service-split-faults.yaml"),
    ]);
    sets.push(vec![
        c.join("gateway.yaml"),
        c.join("routerule-legacy.yaml"),
    ]);
    for f in files(&samples.join("istio")) {
        sets.push(vec![f]);
    }
    sets.push(vec![samples.join("bookinfo/platform/bookinfo.yaml")]);
    sets.push(vec![samples.join("callme/platform/callme.yaml")]);
    sets
}

fn read_set(set: &[PathBuf]) -> Vec<Source> {
    set.iter().flat_map(|p| read_path(p).unwrap()).collect()
}

#[test]
fn samples_are_clean() {
    for set in sample_sets() {
        let analysis = analyze(parse_sources(&read_set(&set)));
        let shown: Vec<String> = analysis.findings.iter().map(ToString::to_string).collect();
        assert!(shown.is_empty(), "{set:?}: {shown:#?}");
    }
}

fn all_valid_sources() -> Vec<Vec<Source>> {
    let mut sets: Vec<Vec<Source>> = files(&root().join("tests/corpus/valid"))
        .into_iter()
        .map(|p| read_path(&p).unwrap())
        .collect();
    sets.extend(sample_sets().iter().map(|s| read_set(s)));
    sets
}

#[test]
fn parse_serialize_parse_is_identity() {
    let mut checked = 0;
    for sources in all_valid_sources() {
        let (docs, _) = convert(parse_sources(&sources));
        for doc in docs {
            let Output::Resource(r) = doc.item else {
                continue;
            };
            let yaml = serde_yaml::to_string(&r).unwrap();
            let again = parse_stream("again.yaml", &yaml);
            assert_eq!(again.len(), 1);
            match &again[0].item {
                Item::Resource { resource, .. } => assert_eq!(**resource, *r, "{yaml}"),
                other => panic!("re-reading failed: {other:?}\n{yaml}"),
            }
            // JSON too: the API server and kubectl speak it.
            let json = serde_json::to_string(&r).unwrap();
            let again = parse_stream("again.json", &json);
            match &again[0].item {
                Item::Resource { resource, .. } => assert_eq!(**resource, *r, "{json}"),
                other => panic!("re-reading JSON failed: {other:?}\n{json}"),
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} resources checked");
}

#[test]
fn everything_convert_prints_analyzes_clean() {
    for sources in all_valid_sources() {
        let (docs, _) = convert(parse_sources(&sources));
        let mut text = String::new();
        for doc in docs {
            let yaml = match doc.item {
                Output::Resource(r) => serde_yaml::to_string(&r).unwrap(),
                Output::Other(v) => serde_yaml::to_string(&v).unwrap(),
                Output::Invalid(e) => panic!("{e}"),
            };
            text.push_str("---\n");
            text.push_str(&yaml);
        }
        let analysis = analyze(parse_sources(&[Source {
            name: "converted.yaml".into(),
            text: text.clone(),
        }]));
        let errors: Vec<String> = analysis
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(ToString::to_string)
            .collect();
        assert!(errors.is_empty(), "{errors:#?}\n{text}");
        // Converted output has only the mesh's apiVersions (or foreign ones).
        assert!(!text.contains("istio.io"), "{text}");
    }
}

#[test]
fn legacy_route_rules_merge_by_precedence() {
    let path = root().join("tests/corpus/valid/routerules-precedence.yaml");
    let (docs, warnings) = convert(parse_sources(&[source(&path, "rr.yaml")]));
    let resources: Vec<_> = docs
        .into_iter()
        .filter_map(|d| match d.item {
            Output::Resource(r) => Some(*r),
            _ => None,
        })
        .collect();
    let names: Vec<String> = resources.iter().map(|r| r.key().to_string()).collect();
    assert_eq!(
        names,
        [
            "DestinationRule default/reviews",
            "VirtualService default/reviews",
            "VirtualService default/ratings",
        ]
    );
    let mesh_api::Resource::VirtualService(vs) = &resources[1] else {
        unreachable!()
    };
    let routes: Vec<_> = vs
        .spec
        .http
        .iter()
        .map(|r| r.name.clone().unwrap())
        .collect();
    assert_eq!(routes, ["reviews-jason", "reviews-default"]);
    let jason = &vs.spec.http[0];
    assert_eq!(
        jason.match_[0].uri.as_ref().unwrap().prefix.as_deref(),
        Some("/reviews")
    );
    assert!(jason.match_[0].headers.contains_key("cookie"));
    assert_eq!(jason.route.len(), 2);
    assert_eq!(jason.route[0].destination.subset.as_deref(), Some("v2"));
    assert_eq!(jason.route[0].weight, Some(50));
    assert_eq!(jason.timeout.unwrap().to_string(), "10s");
    assert_eq!(jason.retries.as_ref().unwrap().attempts, 3);
    assert_eq!(jason.mirror.as_ref().unwrap().subset.as_deref(), Some("v3"));
    assert_eq!(
        jason
            .headers
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .add["x-routed-by"],
        "mesh"
    );
    let mesh_api::Resource::DestinationRule(dr) = &resources[0] else {
        unreachable!()
    };
    let subsets: Vec<_> = dr.spec.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(subsets, ["v2", "v3", "v1"]);
    let mesh_api::Resource::VirtualService(ratings) = &resources[2] else {
        unreachable!()
    };
    assert_eq!(ratings.spec.hosts, ["ratings.default.svc.cluster.local"]);
    assert_eq!(
        ratings.spec.http[0]
            .redirect
            .as_ref()
            .unwrap()
            .uri
            .as_deref(),
        Some("/v1/bookRatings")
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn the_seed_route_rule_becomes_weights_and_faults() {
    let path = root().join("../samples/callme/networking/routerule-legacy.yaml");
    let (docs, _) = convert(parse_sources(&[source(&path, "rr.yaml")]));
    let vs = docs
        .into_iter()
        .find_map(|d| match d.item {
            Output::Resource(r) => match *r {
                mesh_api::Resource::VirtualService(vs) => Some(vs),
                _ => None,
            },
            _ => None,
        })
        .unwrap();
    let route = &vs.spec.http[0];
    let split: Vec<_> = route
        .route
        .iter()
        .map(|d| (d.destination.subset.clone().unwrap(), d.weight.unwrap()))
        .collect();
    assert_eq!(split, [("v1".to_string(), 20), ("v2".to_string(), 80)]);
    let fault = route.fault.as_ref().unwrap();
    let delay = fault.delay.as_ref().unwrap();
    assert_eq!(delay.fixed_delay.unwrap().to_string(), "5s");
    assert_eq!(delay.percentage.unwrap().value, 10.0);
    let abort = fault.abort.as_ref().unwrap();
    assert_eq!(abort.http_status, Some(500));
    assert_eq!(abort.percentage.unwrap().value, 10.0);
}
