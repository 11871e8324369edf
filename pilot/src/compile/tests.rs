use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_api::model::{OutboundPolicy, Protocol, RouteAction};

use super::*;
use crate::source::Files;

/// Inputs from YAML, read the way the files source reads them.
pub(crate) fn inputs(yaml: &str) -> Inputs {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mesh-pilot-compile-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in.yaml"), yaml).unwrap();
    let loaded = Files {
        path: dir.clone(),
        interval: std::time::Duration::from_secs(1),
    }
    .load()
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(loaded.errors, Vec::<String>::new());
    loaded.inputs
}

const REVIEWS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.0.0.9
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: web}]
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: shop}
spec: {address: 10.1.0.1, ports: {web: 19080}, labels: {app: reviews, version: v1}}
---
apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: shop}
spec: {address: 10.1.0.2, ports: {web: 19081}, labels: {app: reviews, version: v2}}
---
apiVersion: networking.mesh.dev/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: RANDOM}}
"#;

fn svc<'a>(i: &'a Inputs, host: &str) -> &'a Service {
    i.service_by_host(host).expect("service")
}

#[test]
fn without_a_virtual_service_a_destination_goes_to_its_default_cluster() {
    let i = inputs(REVIEWS);
    let s = svc(&i, "reviews.shop.svc.cluster.local");
    let d = destination(&i, s, &s.ports[0]);
    assert_eq!(d.protocol, Protocol::Http);
    assert_eq!(
        d.addresses,
        vec!["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
    );
    let RouteAction::Forward(to) = &d.http[0].action else {
        panic!("forward")
    };
    assert_eq!(
        to[0].cluster,
        "outbound|9080||reviews.shop.svc.cluster.local"
    );
    assert_eq!(d.tcp[0].clusters[0].cluster, to[0].cluster);
}

#[test]
fn weighted_subsets_become_weighted_clusters_with_the_route_settings() {
    let i = inputs(&format!(
        "{REVIEWS}---\n{}",
        r#"apiVersion: networking.mesh.dev/v1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  selector: {mesh: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /gw}, gateways: [shop/public]}]
    route: [{destination: {host: reviews, subset: v1}}]
  - timeout: 2s
    route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#
    ));
    let s = svc(&i, "reviews.shop.svc.cluster.local");
    let d = destination(&i, s, &s.ports[0]);
    // The gateway-only route is not a sidecar's.
    assert_eq!(d.http.len(), 2);
    assert!(d.http[0].fault.is_some());
    let RouteAction::Forward(to) = &d.http[1].action else {
        panic!("forward")
    };
    let got: Vec<_> = to.iter().map(|w| (w.cluster.as_str(), w.weight)).collect();
    assert_eq!(
        got,
        vec![
            ("outbound|9080|v1|reviews.shop.svc.cluster.local", 80),
            ("outbound|9080|v2|reviews.shop.svc.cluster.local", 20)
        ]
    );
    assert_eq!(d.http[1].timeout.map(|t| t.as_std().as_secs()), Some(2));
}

#[test]
fn clusters_hold_their_subset_endpoints_and_merged_policies() {
    let i = inputs(REVIEWS);
    let all = cluster(
        &i,
        "outbound|9080||reviews.shop.svc.cluster.local",
        &MeshSettings::default(),
    );
    let addrs: Vec<String> = all
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    assert_eq!(addrs, vec!["10.1.0.1:19080", "10.1.0.2:19081"]);
    assert_eq!(all.service, "reviews.shop.svc.cluster.local");
    // Port-level settings win over the top level…
    let lb = |c: &Cluster| format!("{:?}", c.load_balancer.as_ref().and_then(|l| l.simple));
    assert_eq!(lb(&all), "Some(LeastRequest)");
    let v2 = cluster(
        &i,
        "outbound|9080|v2|reviews.shop.svc.cluster.local",
        &MeshSettings::default(),
    );
    assert_eq!(v2.endpoints.len(), 1);
    assert_eq!(v2.endpoints[0].address.to_string(), "10.1.0.2:19081");
    assert_eq!(
        v2.endpoints[0].workload.as_deref(),
        Some("reviews-v2"),
        "the workload's own name"
    );
    // …and a subset's policy over both.
    assert_eq!(lb(&v2), "Some(Random)");
    // Unknown subsets and hosts are empty clusters, not errors.
    assert!(
        cluster(
            &i,
            "outbound|9080|v9|reviews.shop.svc.cluster.local",
            &MeshSettings::default()
        )
        .endpoints
        .is_empty()
    );
    assert!(
        cluster(
            &i,
            "outbound|80||nowhere.example.com",
            &MeshSettings::default()
        )
        .endpoints
        .is_empty()
    );
}

#[test]
fn a_workload_gets_the_ports_of_the_services_that_select_it() {
    let i = inputs(&format!(
        "{REVIEWS}---\n{}",
        r#"apiVersion: networking.mesh.dev/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"#
    ));
    let node = NodeInfo {
        workload: "reviews-v1".into(),
        namespace: "shop".into(),
        labels: [("app", "reviews"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        service_account: "reviews".into(),
        ..Default::default()
    };
    let w = workload(&i, &node, &MeshSettings::default());
    assert_eq!(w.inbound.ports.len(), 1);
    assert_eq!(w.inbound.ports[0].port, 19080, "named targetPort resolved");
    assert_eq!(
        w.inbound.ports[0].service.as_deref(),
        Some("reviews.shop.svc.cluster.local")
    );
    assert_eq!(w.workload.canonical_revision, "v1");
    assert_eq!(w.outbound_policy, OutboundPolicy::RegistryOnly);
    assert!(w.gateway_listeners.is_empty());
}

#[test]
fn a_gateway_serves_the_virtual_services_bound_to_it() {
    let i = inputs(&format!(
        "{REVIEWS}---\n{}",
        r#"apiVersion: networking.mesh.dev/v1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  selector: {mesh: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.mesh.dev/v1
kind: VirtualService
metadata: {name: front, namespace: shop}
spec:
  hosts: ["shop.example.com"]
  gateways: [public]
  http:
  - match: [{uri: {prefix: /reviews}}]
    route: [{destination: {host: reviews, subset: v1}}]
"#
    ));
    let node = NodeInfo {
        workload: "ingressgateway".into(),
        namespace: "mesh-system".into(),
        labels: [("mesh".to_string(), "ingressgateway".to_string())].into(),
        gateway: true,
        ..Default::default()
    };
    let w = workload(&i, &node, &MeshSettings::default());
    assert_eq!(w.gateway_listeners.len(), 1);
    let l = &w.gateway_listeners[0];
    assert_eq!((l.port, l.protocol), (8080, Protocol::Http));
    assert_eq!(l.virtual_hosts[0].hosts, vec!["shop.example.com"]);
    let RouteAction::Forward(to) = &l.virtual_hosts[0].routes[0].action else {
        panic!("forward")
    };
    assert_eq!(
        to[0].cluster,
        "outbound|9080|v1|reviews.shop.svc.cluster.local"
    );
    // A proxy the Gateway does not select gets no listeners.
    let other = NodeInfo {
        gateway: true,
        ..node.clone()
    };
    let other = NodeInfo {
        labels: Default::default(),
        ..other
    };
    assert!(
        workload(&i, &other, &MeshSettings::default())
            .gateway_listeners
            .is_empty()
    );
}

#[test]
fn endpoints_with_a_sidecar_carry_its_identity_and_tls_policy_follows_the_rule() {
    let i = inputs(&format!(
        "{REVIEWS}---\n{}",
        r#"apiVersion: networking.mesh.dev/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: shop}
spec:
  address: 10.1.0.3
  ports: {web: 19082}
  labels: {app: reviews, version: v3, security.mesh.dev/tlsMode: mesh}
  serviceAccount: bookinfo-reviews
---
apiVersion: networking.mesh.dev/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 8443}
      tls: {mode: SIMPLE, sni: ratings.example.com}
"#
    ));
    let mesh = MeshSettings {
        trust_domain: "corp.example".into(),
        ..Default::default()
    };
    let c = cluster(&i, "outbound|9080||reviews.shop.svc.cluster.local", &mesh);
    let ids: Vec<_> = c.endpoints.iter().map(|e| e.identity.as_deref()).collect();
    assert_eq!(
        ids,
        vec![
            None,
            None,
            Some("spiffe://corp.example/ns/shop/sa/bookinfo-reviews")
        ]
    );
    assert_eq!(c.tls, None, "automatic mTLS: no DestinationRule tls");
    let mode = |port: u16| {
        cluster(
            &i,
            &cluster_name(port, "", "ratings.shop.svc.cluster.local"),
            &mesh,
        )
        .tls
        .map(|t| t.mode)
    };
    use mesh_api::networking::ClientTlsMode;
    assert_eq!(mode(9080), Some(ClientTlsMode::IstioMutual));
    assert_eq!(mode(8443), Some(ClientTlsMode::Simple));
}

#[test]
fn peer_authentication_goes_from_workload_to_namespace_to_mesh() {
    let pa = |ns: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: security.mesh.dev/v1\nkind: PeerAuthentication\n\
             metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
        )
    };
    let node = |ns: &str, app: &str| NodeInfo {
        workload: format!("{app}-1"),
        namespace: ns.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        service_account: app.into(),
        ..Default::default()
    };
    let mode = |yaml: &str, ns: &str, app: &str| {
        let w = workload(&inputs(yaml), &node(ns, app), &MeshSettings::default());
        (w.inbound.mtls, w.inbound.port_mtls)
    };
    let none = BTreeMap::new();
    // Nothing: unset (the proxy takes PERMISSIVE).
    assert_eq!(mode("", "shop", "reviews"), (MtlsMode::Unset, none.clone()));
    assert_eq!(model::Inbound::default().mtls_for(80), MtlsMode::Permissive);
    let mesh_strict = pa("mesh-system", "default", "{mtls: {mode: STRICT}}");
    assert_eq!(mode(&mesh_strict, "shop", "reviews").0, MtlsMode::Strict);
    // A namespace overrides the mesh; a policy for the workload overrides
    // both, and an UNSET mode inherits.
    let ns_permissive = pa("shop", "default", "{mtls: {mode: PERMISSIVE}}");
    let yaml = format!("{mesh_strict}{ns_permissive}");
    assert_eq!(mode(&yaml, "shop", "reviews").0, MtlsMode::Permissive);
    assert_eq!(mode(&yaml, "other", "reviews").0, MtlsMode::Strict);
    let wl = pa(
        "shop",
        "reviews",
        "{selector: {matchLabels: {app: reviews}}, mtls: {mode: UNSET}, portLevelMtls: {8080: {mode: DISABLE}, 9090: {mode: UNSET}}}",
    );
    let yaml = format!("{mesh_strict}{ns_permissive}{wl}");
    let (m, ports) = mode(&yaml, "shop", "reviews");
    assert_eq!(m, MtlsMode::Permissive);
    assert_eq!(
        ports,
        BTreeMap::from([(8080, MtlsMode::Disable), (9090, MtlsMode::Permissive)])
    );
    // Another app in the namespace is not selected.
    assert_eq!(mode(&yaml, "shop", "ratings"), (MtlsMode::Permissive, none));
}

#[test]
fn security_policies_apply_by_root_namespace_namespace_selector_and_target_ref() {
    let ap = |ns: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: security.mesh.dev/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
        )
    };
    let yaml = format!(
        "{REVIEWS}---\n{}{}{}{}{}{}{}",
        ap(
            "mesh-system",
            "mesh-deny",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}"
        ),
        ap(
            "mesh-system",
            "all-reviews",
            "{selector: {matchLabels: {app: reviews}}, action: AUDIT, rules: [{}]}"
        ),
        ap("shop", "ns-wide", "{}"),
        ap(
            "shop",
            "v2-only",
            "{selector: {matchLabels: {version: v2}}, rules: [{}]}"
        ),
        ap(
            "shop",
            "by-service",
            "{targetRef: {kind: Service, group: '', name: reviews}, action: DENY, rules: [{to: [{operation: {paths: ['/admin']}}]}]}"
        ),
        ap("other", "elsewhere", "{}"),
        "apiVersion: security.mesh.dev/v1\nkind: RequestAuthentication\n\
         metadata: {name: jwt, namespace: shop}\n\
         spec: {selector: {matchLabels: {app: reviews}}, jwtRules: [{issuer: https://issuer.example, jwksUri: https://issuer.example/jwks}]}\n",
    );
    let i = inputs(&yaml);
    let names = |app: &str, version: &str, ns: &str| {
        let node = NodeInfo {
            workload: format!("{app}-{version}"),
            namespace: ns.into(),
            labels: [("app", app), ("version", version)]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            service_account: app.into(),
            ..Default::default()
        };
        let w = workload(&i, &node, &MeshSettings::default());
        let names: Vec<String> = w
            .inbound
            .authorization
            .iter()
            .map(|p| format!("{} {:?} {}", p.name, p.action, p.rules.len()))
            .collect();
        (names, w.inbound.jwt_rules.len())
    };
    let (v1, jwt) = names("reviews", "v1", "shop");
    assert_eq!(
        v1,
        [
            "mesh-system/all-reviews Audit 1",
            "mesh-system/mesh-deny Deny 1",
            "shop/by-service Deny 1",
            "shop/ns-wide Allow 0",
        ]
    );
    assert_eq!(jwt, 1);
    let (v2, _) = names("reviews", "v2", "shop");
    assert!(v2.contains(&"shop/v2-only Allow 1".to_string()), "{v2:?}");
    // Another namespace: only the mesh-wide policies and its own.
    let (other, jwt) = names("ratings", "v1", "other");
    assert_eq!(
        other,
        ["mesh-system/mesh-deny Deny 1", "other/elsewhere Allow 0"]
    );
    assert_eq!(jwt, 0);
}
