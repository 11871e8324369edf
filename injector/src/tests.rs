use super::*;

fn pod(yaml: &str) -> (ObjectMeta, PodSpec) {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    (
        serde_yaml::from_value(v["metadata"].clone()).unwrap(),
        serde_yaml::from_value(v["spec"].clone()).unwrap(),
    )
}

const APP: &str =
    "metadata: {name: a, labels: {app: a}}\nspec: {containers: [{name: app, image: x}]}";

#[test]
fn the_pod_wins_over_the_namespace_and_system_namespaces_never_inject() {
    let s = Settings::default();
    let ns = |v: &str| BTreeMap::from([(NAMESPACE_LABEL.to_string(), v.to_string())]);
    let none = BTreeMap::new();
    let (m, sp) = pod(APP);
    assert_eq!(decide("shop", &ns("enabled"), &m, &sp, &s), Ok(()));
    assert_eq!(
        decide("shop", &ns("disabled"), &m, &sp, &s),
        Err(Skip::NamespaceDisabled)
    );
    assert_eq!(decide("shop", &none, &m, &sp, &s), Err(Skip::NotEnabled));
    let (on, _) = pod(
        "metadata: {name: a, labels: {sidecar.mesh.dev/inject: 'true'}}\nspec: {containers: []}",
    );
    assert_eq!(decide("shop", &ns("disabled"), &on, &sp, &s), Ok(()));
    let (off, _) = pod(
        "metadata: {name: a, annotations: {sidecar.mesh.dev/inject: 'false'}}\nspec: {containers: []}",
    );
    assert_eq!(
        decide("shop", &ns("enabled"), &off, &sp, &s),
        Err(Skip::PodDisabled)
    );
    // The label beats the annotation.
    let (both, _) = pod(
        "metadata: {name: a, labels: {sidecar.mesh.dev/inject: 'true'}, annotations: {sidecar.mesh.dev/inject: 'false'}}\nspec: {containers: []}",
    );
    assert_eq!(decide("shop", &none, &both, &sp, &s), Ok(()));
    assert_eq!(
        decide("kube-system", &ns("enabled"), &on, &sp, &s),
        Err(Skip::KubeSystem)
    );
    assert_eq!(
        decide("mesh-system", &ns("enabled"), &on, &sp, &s),
        Err(Skip::ControlPlaneNamespace)
    );
    let (hm, hs) = pod("metadata: {name: h}\nspec: {hostNetwork: true, containers: []}");
    assert_eq!(
        decide("shop", &ns("enabled"), &hm, &hs, &s),
        Err(Skip::HostNetwork)
    );
    let (im, is) = inject(&m, &sp, &s, Cluster { minor: 30 }).unwrap();
    assert_eq!(
        decide("shop", &ns("enabled"), &im, &is, &s),
        Err(Skip::AlreadyInjected)
    );
}

#[test]
fn native_and_classic_sidecars() {
    let s = Settings::default();
    let (m, sp) = pod(APP);
    let (meta, spec) = inject(&m, &sp, &s, Cluster { minor: 29 }).unwrap();
    let inits = spec.init_containers.as_ref().unwrap();
    assert_eq!(inits[0].name, INIT_NAME);
    assert_eq!(inits[1].name, PROXY_NAME);
    assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.containers.len(), 1);
    let status: Status =
        serde_json::from_str(&meta.annotations.as_ref().unwrap()[STATUS_ANNOTATION]).unwrap();
    assert!(status.native_sidecar);

    let (_, spec) = inject(&m, &sp, &s, Cluster { minor: 28 }).unwrap();
    assert_eq!(spec.containers[0].name, PROXY_NAME);
    assert!(spec.containers[0].restart_policy.is_none());
    let hold = spec.containers[0].lifecycle.as_ref().unwrap();
    assert_eq!(
        hold.post_start
            .as_ref()
            .unwrap()
            .exec
            .as_ref()
            .unwrap()
            .command
            .as_ref()
            .unwrap()[1],
        "wait"
    );
    // Only the init container may change the network.
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let caps = init
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..])
    );
    let proxy_sc = spec.containers[0].security_context.as_ref().unwrap();
    assert_eq!(proxy_sc.run_as_user, Some(PROXY_UID));
    assert_eq!(proxy_sc.read_only_root_filesystem, Some(true));
    assert_eq!(proxy_sc.allow_privilege_escalation, Some(false));
    assert!(proxy_sc.capabilities.as_ref().unwrap().add.is_none());
}

#[test]
fn bad_annotations_name_the_field() {
    let s = Settings::default();
    for (key, value, want) in [
        (annotation::PROXY_CPU, "lots", "sidecar.mesh.dev/proxyCPU"),
        (
            annotation::EXCLUDE_OUTBOUND_PORTS,
            "80,http",
            "excludeOutboundPorts",
        ),
        (
            annotation::EXCLUDE_OUTBOUND_IP_RANGES,
            "10.0.0.0/99",
            "excludeOutboundIPRanges",
        ),
        (annotation::LOG_LEVEL, "loud", "logLevel"),
    ] {
        let (mut m, sp) = pod(APP);
        m.annotations = Some(BTreeMap::from([(key.to_string(), value.to_string())]));
        let e = inject(&m, &sp, &s, Cluster { minor: 29 }).unwrap_err();
        assert!(e.field.contains(want), "{e}");
    }
    let (m, sp) = pod(
        "metadata: {name: a}\nspec: {containers: [{name: app, image: x, readinessProbe: {httpGet: {port: web}}}]}",
    );
    let e = inject(&m, &sp, &s, Cluster { minor: 29 }).unwrap_err();
    assert_eq!(e.field, "spec.containers[0].readinessProbe.httpGet.port");
}

#[test]
fn http_probes_go_through_the_status_port() {
    let (m, sp) = pod(
        "metadata: {name: a}\nspec: {containers: [{name: web, image: x, ports: [{name: admin, containerPort: 9901}], livenessProbe: {httpGet: {path: /live, port: admin}}, readinessProbe: {tcpSocket: {port: 80}}}]}",
    );
    let (_, spec) = inject(&m, &sp, &Settings::default(), Cluster { minor: 29 }).unwrap();
    let web = spec.containers.iter().find(|c| c.name == "web").unwrap();
    let live = web
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/app-health/web/livez"));
    assert_eq!(live.port, IntOrString::Int(STATUS_PORT));
    assert!(web.readiness_probe.as_ref().unwrap().tcp_socket.is_some());
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    let probers = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MESH_APP_PROBERS")
        .and_then(|e| e.value.clone())
        .unwrap();
    let probers: serde_json::Value = serde_json::from_str(&probers).unwrap();
    assert_eq!(probers["/app-health/web/livez"]["port"], 9901);
    assert_eq!(probers["/app-health/web/livez"]["path"], "/live");
}
