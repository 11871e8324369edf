use super::*;

fn policies(yaml: &str) -> Authz {
    let list: Vec<AuthorizationRules> = serde_yaml::from_str(yaml).unwrap();
    Authz::new(&list).unwrap()
}

const CALLER: &str = "spiffe://cluster.local/ns/default/sa/productpage";

struct Req {
    principal: Option<&'static str>,
    source: &'static str,
    port: u16,
    host: &'static str,
    method: &'static str,
    path: &'static str,
    headers: HeaderMap,
    auth: Option<Claims>,
    tcp: bool,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            principal: Some(CALLER),
            source: "10.0.0.1:40000",
            port: 9080,
            host: "reviews",
            method: "GET",
            path: "/",
            headers: HeaderMap::new(),
            auth: None,
            tcp: false,
        }
    }
}

impl Req {
    fn denied_by(&self, a: &Authz) -> Option<String> {
        let source: SocketAddr = self.source.parse().unwrap();
        let attrs = Attrs {
            source,
            remote_ip: source.ip(),
            destination: SocketAddr::new("10.0.0.9".parse().unwrap(), self.port),
            principal: self.principal,
            sni: None,
            http: (!self.tcp).then_some(HttpAttrs {
                host: self.host,
                method: self.method,
                path: self.path,
                headers: &self.headers,
                auth: self.auth.as_ref(),
            }),
        };
        a.decide(&attrs).denied_by.map(|s| s.to_string())
    }
}

#[test]
fn no_policy_allows_and_an_allow_policy_without_rules_denies_everything() {
    assert!(policies("[]").is_empty());
    assert_eq!(Req::default().denied_by(&policies("[]")), None);
    let nothing = policies("- {name: default/allow-nothing, action: ALLOW}");
    assert_eq!(
        Req::default().denied_by(&nothing).as_deref(),
        Some(NO_ALLOW_MATCH)
    );
    // A DENY policy without rules matches nothing.
    let noop = policies("- {name: default/deny-nothing, action: DENY}");
    assert_eq!(Req::default().denied_by(&noop), None);
    // One empty rule matches everything.
    let all = policies("- {name: default/allow-all, action: ALLOW, rules: [{}]}");
    assert_eq!(Req::default().denied_by(&all), None);
}

#[test]
fn deny_is_checked_before_allow() {
    let a = policies(
        r#"
- name: default/allow-all
  action: ALLOW
  rules: [{}]
- name: default/no-admin
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#,
    );
    let admin = Req {
        path: "/admin/users",
        ..Default::default()
    };
    assert_eq!(admin.denied_by(&a).as_deref(), Some("default/no-admin"));
    assert_eq!(Req::default().denied_by(&a), None);
}

#[test]
fn sources_match_principals_namespaces_and_ip_blocks_with_not_forms() {
    let a = policies(
        r#"
- name: default/from-productpage
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/productpage"]}
  - from:
    - source: {namespaces: ["monitoring"], notIpBlocks: ["10.9.0.0/16"]}
"#,
    );
    assert_eq!(Req::default().denied_by(&a), None);
    let plaintext = Req {
        principal: None,
        ..Default::default()
    };
    assert!(plaintext.denied_by(&a).is_some());
    let prom = Req {
        principal: Some("spiffe://cluster.local/ns/monitoring/sa/prometheus"),
        ..Default::default()
    };
    assert_eq!(prom.denied_by(&a), None);
    let prom_blocked = Req {
        principal: Some("spiffe://cluster.local/ns/monitoring/sa/prometheus"),
        source: "10.9.3.4:5000",
        ..Default::default()
    };
    assert!(prom_blocked.denied_by(&a).is_some());

    // The usual "deny anything unauthenticated".
    let strict = policies(
        r#"
- name: mesh-system/require-mtls
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
"#,
    );
    assert!(plaintext.denied_by(&strict).is_some());
    assert_eq!(Req::default().denied_by(&strict), None);

    // serviceAccounts name the principal's namespace and account.
    let sa = policies(
        r#"
- name: default/by-account
  action: ALLOW
  rules: [{from: [{source: {serviceAccounts: ["productpage", "other/reviews"]}}]}]
"#,
    );
    assert_eq!(Req::default().denied_by(&sa), None);
    let other = Req {
        principal: Some("spiffe://cluster.local/ns/other/sa/productpage"),
        ..Default::default()
    };
    assert!(other.denied_by(&sa).is_some());
}

#[test]
fn operations_match_hosts_without_case_ports_methods_and_paths() {
    let a = policies(
        r#"
- name: default/api
  action: ALLOW
  rules:
  - to:
    - operation:
        hosts: ["*.example.com", "reviews"]
        ports: ["9080"]
        methods: ["GET", "HEAD"]
        paths: ["/api/*", "*.json", "/health"]
        notPaths: ["/api/private*"]
"#,
    );
    let ok = |host, method, path| {
        Req {
            host,
            method,
            path,
            ..Default::default()
        }
        .denied_by(&a)
        .is_none()
    };
    assert!(ok("reviews", "GET", "/api/books"));
    assert!(ok("WWW.Example.COM", "HEAD", "/x/data.json"));
    assert!(ok("REVIEWS", "GET", "/health"));
    assert!(
        !ok("reviews", "get", "/health"),
        "methods are case-sensitive"
    );
    assert!(!ok("reviews", "POST", "/health"));
    assert!(!ok("reviews", "GET", "/HEALTH"), "paths are case-sensitive");
    assert!(!ok("reviews", "GET", "/api/private/keys"));
    assert!(!ok("example.com", "GET", "/health"));
    let other_port = Req {
        path: "/health",
        port: 9090,
        ..Default::default()
    };
    assert!(other_port.denied_by(&a).is_some());
}

#[test]
fn when_conditions_read_headers_claims_and_connection_attributes() {
    let a = policies(
        r#"
- name: default/conds
  action: ALLOW
  rules:
  - when:
    - {key: "request.headers[x-tenant]", values: ["blue*"]}
    - {key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.0.0.66"]}
    - {key: destination.port, values: ["9080"]}
    - {key: "request.auth.claims[groups]", values: ["admins"]}
    - {key: "request.auth.claims[realm][role]", values: ["owner"]}
    - {key: request.auth.principal, values: ["https://issuer.example/*"]}
    - {key: source.namespace, values: ["default"]}
"#,
    );
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "blue-1".parse().unwrap());
    let claims = Claims {
        principal: "https://issuer.example/alice".into(),
        payload: serde_json::from_str(
            r#"{"groups": ["users", "admins"], "realm": {"role": "owner"}}"#,
        )
        .unwrap(),
    };
    let good = Req {
        headers: headers.clone(),
        auth: Some(claims.clone()),
        ..Default::default()
    };
    assert_eq!(good.denied_by(&a), None);
    let no_token = Req {
        headers: headers.clone(),
        ..Default::default()
    };
    assert!(no_token.denied_by(&a).is_some());
    let excluded_ip = Req {
        headers: headers.clone(),
        auth: Some(claims.clone()),
        source: "10.0.0.66:1234",
        ..Default::default()
    };
    assert!(excluded_ip.denied_by(&a).is_some());
    let wrong_tenant = Req {
        auth: Some(claims),
        ..Default::default()
    };
    assert!(wrong_tenant.denied_by(&a).is_some());
}

#[test]
fn tcp_fails_closed_on_http_only_fields() {
    // ALLOW: a rule that needs HTTP never matches a TCP connection.
    let allow = policies(
        r#"
- name: default/get-only
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"#,
    );
    let tcp = Req {
        tcp: true,
        ..Default::default()
    };
    assert!(tcp.denied_by(&allow).is_some());
    // DENY: the HTTP-only part is dropped, so the rule matches more.
    let deny = policies(
        r#"
- name: default/no-post-from-default
  action: DENY
  rules: [{from: [{source: {namespaces: ["default"]}}], to: [{operation: {methods: ["POST"]}}]}]
"#,
    );
    assert!(tcp.denied_by(&deny).is_some());
    let elsewhere = Req {
        tcp: true,
        principal: Some("spiffe://cluster.local/ns/other/sa/x"),
        ..Default::default()
    };
    assert_eq!(elsewhere.denied_by(&deny), None);
    // Port rules apply to TCP as written.
    let ports = policies(
        r#"
- name: default/db
  action: ALLOW
  rules: [{to: [{operation: {ports: ["5432"]}}]}]
"#,
    );
    assert!(tcp.denied_by(&ports).is_some());
    let db = Req {
        tcp: true,
        port: 5432,
        ..Default::default()
    };
    assert_eq!(db.denied_by(&ports), None);
}

#[test]
fn audit_marks_without_deciding() {
    let a = policies(
        r#"
- name: default/audit-admin
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"#,
    );
    let source: SocketAddr = "10.0.0.1:1".parse().unwrap();
    let headers = HeaderMap::new();
    let d = a.decide(&Attrs {
        source,
        remote_ip: source.ip(),
        destination: source,
        principal: None,
        sni: None,
        http: Some(HttpAttrs {
            host: "h",
            method: "GET",
            path: "/admin",
            headers: &headers,
            auth: None,
        }),
    });
    assert_eq!(d.denied_by, None);
    assert_eq!(d.audited_by.as_deref(), Some("default/audit-admin"));
}

#[test]
fn bad_values_are_refused_with_the_field() {
    let list: Vec<AuthorizationRules> = serde_yaml::from_str(
        r#"
- name: default/bad
  rules: [{from: [{source: {ipBlocks: ["10.0.0.0/8", "nope"]}}]}]
"#,
    )
    .unwrap();
    let e = Authz::new(&list).unwrap_err();
    assert!(
        e.contains("default/bad") && e.contains("rules[0].from[0]") && e.contains("nope"),
        "{e}"
    );
}

#[test]
fn paths_are_normalized_once() {
    let cases = [
        ("/", Ok("/")),
        ("/a/b", Ok("/a/b")),
        ("//admin", Ok("/admin")),
        ("/a//b///c/", Ok("/a/b/c/")),
        ("/%2e%2e/admin", Ok("/admin")),
        ("/a/%2E/b", Ok("/a/b")),
        ("/a/b/../../../admin", Ok("/admin")),
        ("/a/./b/.", Ok("/a/b/")),
        ("/a/..", Ok("/")),
        ("/%61dmin", Ok("/admin")),
        ("/caf%c3%a9", Ok("/caf%C3%A9")),
        ("/a%20b", Ok("/a%20b")),
        ("/.well-known/x", Ok("/.well-known/x")),
        ("/admin%2F", Err(PathError::EncodedSlash)),
        ("/admin%2fx", Err(PathError::EncodedSlash)),
        ("/a%5Cb", Err(PathError::EncodedSlash)),
        ("/a\\b", Err(PathError::Backslash)),
        ("/a%zz", Err(PathError::BadEscape)),
        ("/a%2", Err(PathError::BadEscape)),
        ("*", Ok("*")),
    ];
    for (input, want) in cases {
        let got = normalize_path(input).map(|c| c.into_owned());
        assert_eq!(got, want.map(str::to_string), "{input}");
        // Normalizing is idempotent.
        if let Ok(p) = &got {
            assert_eq!(normalize_path(p).unwrap(), p.as_str(), "{input}");
        }
    }
    // Already-normal paths are not copied.
    assert!(matches!(normalize_path("/api/v1/x"), Ok(Cow::Borrowed(_))));
}
