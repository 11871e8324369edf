use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-ca-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn csr(sans: &[SanType]) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans.to_vec();
    let csr = p.serialize_request(&key).unwrap();
    (csr.pem().unwrap(), key)
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn a_root_is_created_once_and_kept() {
    let d = dir("keep");
    let a = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600)).unwrap();
    let b = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600)).unwrap();
    assert_eq!(a.roots(), b.roots());
    assert_eq!(a.roots().len(), 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join(CA_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn only_the_callers_own_identity_is_signed() {
    let d = dir("sign");
    let ca = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600)).unwrap();
    let me = "spiffe://cluster.local/ns/shop/sa/reviews";
    let (pem, _) = csr(&[uri(me)]);
    let chain = ca.sign(&pem, "shop", "reviews", None).unwrap();
    assert_eq!(chain.len(), 1, "a root CA sends no chain above the leaf");
    let (_, der) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
    let issued = der.parse_x509().unwrap();
    let san = issued.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, [format!("URI({me})")]);
    let left =
        issued.validity().not_after.timestamp() - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((3540..=3600).contains(&left), "{left}");
    // Signed by the root.
    let (_, root) = x509_parser::pem::parse_x509_pem(ca.roots()[0].as_bytes()).unwrap();
    let root = root.parse_x509().unwrap();
    issued.verify_signature(Some(root.public_key())).unwrap();
    // Another service account, another trust domain, extra names: refused.
    for sans in [
        vec![uri("spiffe://cluster.local/ns/shop/sa/ratings")],
        vec![uri("spiffe://evil.example/ns/shop/sa/reviews")],
        vec![
            uri(me),
            SanType::DnsName("reviews.shop.svc".try_into().unwrap()),
        ],
        vec![],
    ] {
        let (pem, _) = csr(&sans);
        let e = ca.sign(&pem, "shop", "reviews", None).unwrap_err();
        assert!(matches!(e, CaError::Identity { .. }), "{e}");
    }
    assert!(matches!(
        ca.sign(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "shop",
            "reviews",
            None
        ),
        Err(CaError::Csr(_))
    ));
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn bootstrap_tokens_name_their_workload() {
    let d = dir("tokens");
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("tokens.yaml");
    std::fs::write(
        &f,
        "- {namespace: shop, serviceAccount: reviews, token: 0123456789abcdef0123}\n",
    )
    .unwrap();
    let t = BootstrapTokens::load(&f).unwrap();
    assert_eq!(
        t.authenticate("0123456789abcdef0123").await,
        Ok(("shop".into(), "reviews".into()))
    );
    assert!(t.authenticate("0123456789abcdef0124").await.is_err());
    std::fs::write(
        &f,
        "- {namespace: shop, serviceAccount: reviews, token: short}\n",
    )
    .unwrap();
    assert!(
        BootstrapTokens::load(&f)
            .unwrap_err()
            .to_string()
            .contains("[0].token")
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn kubernetes_tokens_are_checked_by_a_token_review_with_the_mesh_audience() {
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    let (svc, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<bytes::Bytes>>>();
    tokio::spawn(async move {
        while let Some((req, respond)) = handle.next_request().await {
            assert_eq!(
                req.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(review["spec"]["audiences"], serde_json::json!(["mesh-ca"]));
            let status = match review["spec"]["token"].as_str().unwrap() {
                "good" => serde_json::json!({"authenticated": true, "audiences": ["mesh-ca"],
                    "user": {"username": "system:serviceaccount:shop:reviews"}}),
                "other-audience" => serde_json::json!({"authenticated": true, "audiences": ["api"],
                    "user": {"username": "system:serviceaccount:shop:reviews"}}),
                "a-user" => serde_json::json!({"authenticated": true, "audiences": ["mesh-ca"],
                    "user": {"username": "alice@example.com"}}),
                _ => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            let mut out = review.clone();
            out["status"] = status;
            respond.send_response(Response::new(Full::new(bytes::Bytes::from(
                out.to_string(),
            ))));
        }
    });
    let tokens = KubeTokens {
        client: kube::Client::new(svc, "default"),
        audience: "mesh-ca".into(),
    };
    assert_eq!(
        tokens.authenticate("good").await,
        Ok(("shop".into(), "reviews".into()))
    );
    assert!(
        tokens
            .authenticate("other-audience")
            .await
            .unwrap_err()
            .contains("audience")
    );
    assert!(
        tokens
            .authenticate("a-user")
            .await
            .unwrap_err()
            .contains("not a service account")
    );
    assert_eq!(
        tokens.authenticate("forged").await,
        Err("invalid bearer token".into())
    );
}

#[tokio::test]
async fn every_live_namespace_gets_the_root_configmap() {
    use std::collections::BTreeMap;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};

    use crate::registry::Namespace;
    use crate::source::Namespaces;
    let (svc, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<Full<bytes::Bytes>>>();
    let (applied_tx, mut applied) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((req, respond)) = handle.next_request().await {
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let ok =
                |v: serde_json::Value| Response::new(Full::new(bytes::Bytes::from(v.to_string())));
            // The namespaces come from the source's watch: the only calls
            // are the ConfigMap applies.
            assert_eq!(method, "PATCH", "{uri}");
            assert!(
                uri.query().unwrap().contains("fieldManager=mesh-pilot"),
                "{uri}"
            );
            let cm: serde_json::Value = serde_json::from_slice(&body).unwrap();
            applied_tx
                .send((
                    uri.path().to_string(),
                    cm["data"]["root-cert.pem"].as_str().unwrap().to_string(),
                ))
                .unwrap();
            respond.send_response(ok(cm));
        }
    });
    let view = |lists: u64, names: &[&str]| Namespaces {
        live: names
            .iter()
            .map(|n| {
                let ns = Namespace {
                    name: n.to_string(),
                    labels: BTreeMap::new(),
                };
                (n.to_string(), Arc::new(ns))
            })
            .collect(),
        lists,
    };
    let (namespaces, rx) = tokio::sync::watch::channel(Namespaces::default());
    let roots = Arc::new(std::sync::Mutex::new(vec![
        "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n".to_string(),
    ]));
    let current = roots.clone();
    let task = tokio::spawn(distribute_roots(
        kube::Client::new(svc, "default"),
        rx,
        move || current.lock().unwrap().clone(),
        Duration::from_millis(20),
    ));
    let path = |ns: &str| format!("/api/v1/namespaces/{ns}/configmaps/mesh-ca-root-cert");
    let mut next = async |n: usize, want: &str| {
        let mut paths = Vec::new();
        for _ in 0..n {
            let (path, pem) = tokio::time::timeout(Duration::from_secs(10), applied.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(pem.contains(want), "{want}: {pem}");
            paths.push(path);
        }
        paths.sort();
        paths
    };
    // The first list: each live namespace.
    namespaces.send_replace(view(1, &["default", "shop"]));
    assert_eq!(next(2, "ROOT").await, [path("default"), path("shop")]);
    // A new namespace: only it.
    namespaces.send_replace(view(1, &["default", "new", "shop"]));
    assert_eq!(next(1, "ROOT").await, [path("new")]);
    // The roots rotate: every namespace gets the new ones.
    roots
        .lock()
        .unwrap()
        .push("-----BEGIN CERTIFICATE-----\nNEXT\n-----END CERTIFICATE-----\n".into());
    assert_eq!(
        next(3, "NEXT").await,
        [path("default"), path("new"), path("shop")]
    );
    // A relist (`new` went while the watch was away): every live one again.
    namespaces.send_replace(view(2, &["default", "shop"]));
    assert_eq!(next(2, "NEXT").await, [path("default"), path("shop")]);
    task.abort();
}

/// Which of `roots` signed the leaf of `chain`.
fn signer(chain: &[String], roots: &[String]) -> usize {
    let (_, leaf) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    roots
        .iter()
        .position(|r| {
            let (_, root) = x509_parser::pem::parse_x509_pem(r.as_bytes()).unwrap();
            let root = root.parse_x509().unwrap();
            leaf.verify_signature(Some(root.public_key())).is_ok()
        })
        .expect("signed by one of the roots")
}

#[test]
fn a_root_rotates_with_an_overlap_and_a_running_ca_follows() {
    let d = dir("rotate");
    let ca = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600)).unwrap();
    let me = "spiffe://cluster.local/ns/shop/sa/reviews";
    let sign = || {
        ca.sign(&csr(&[uri(me)]).0, "shop", "reviews", None)
            .unwrap()
    };
    let old_root = ca.roots();
    let before = sign();

    // No pause between steps: the CA sees each by the files' inodes, even
    // within one tick of the file-time clock.
    let e = rotate_root(&d, "cluster.local", RotateStep::Activate).unwrap_err();
    assert!(e.to_string().contains("prepare"), "{e}");
    rotate_root(&d, "cluster.local", RotateStep::Prepare).unwrap();
    let both = ca.roots();
    assert_eq!(both.len(), 2);
    assert_eq!(both[0], old_root[0]);
    assert_eq!(signer(&sign(), &both), 0, "still signed by the old root");
    assert!(rotate_root(&d, "cluster.local", RotateStep::Prepare).is_err());

    rotate_root(&d, "cluster.local", RotateStep::Activate).unwrap();
    assert_eq!(ca.roots(), both, "both trusted while certificates renew");
    let after = sign();
    assert_eq!(signer(&after, &both), 1, "the new root signs");
    assert_eq!(signer(&before, &both), 0, "old certificates still verify");

    rotate_root(&d, "cluster.local", RotateStep::Finish).unwrap();
    assert_eq!(ca.roots(), vec![both[1].clone()]);
    assert_eq!(signer(&sign(), &ca.roots()), 0);
    // A restart keeps the new root.
    let again = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600)).unwrap();
    assert_eq!(again.roots(), vec![both[1].clone()]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_key_that_does_not_match_its_certificate_never_signs() {
    let d = dir("mismatch");
    let ca = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600)).unwrap();
    let root = ca.roots();
    // Another key where the CA key was: the running CA keeps its last
    // good state, and loading it fresh fails naming the file.
    std::fs::remove_file(d.join(CA_KEY)).unwrap();
    write_private(
        &d.join(CA_KEY),
        &KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let chain = ca
        .sign(
            &csr(&[uri("spiffe://cluster.local/ns/shop/sa/reviews")]).0,
            "shop",
            "reviews",
            None,
        )
        .unwrap();
    assert_eq!(signer(&chain, &root), 0);
    let e = Ca::load_or_create(&d, "cluster.local", Duration::from_secs(3600))
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not belong"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
