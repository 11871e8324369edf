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
        (
            annotation::PROXY_MEMORY,
            "1.5.5",
            "sidecar.mesh.dev/proxyMemory",
        ),
        (annotation::REWRITE_PROBES, "yes", "rewriteAppHTTPProbers"),
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

fn with_annotations(pairs: &[(&str, &str)]) -> (ObjectMeta, PodSpec) {
    let (mut m, sp) = pod(APP);
    m.annotations = Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    (m, sp)
}

fn init_args(spec: &PodSpec) -> Vec<String> {
    spec.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == INIT_NAME)
        .and_then(|c| c.args.clone())
        .unwrap()
}

fn proxy_of(spec: &PodSpec) -> &Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == PROXY_NAME)
        .unwrap()
}

fn probers_of(spec: &PodSpec) -> serde_json::Value {
    proxy_of(spec)
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MESH_APP_PROBERS")
        .and_then(|e| e.value.as_deref())
        .map(|v| serde_json::from_str(v).unwrap())
        .unwrap_or_default()
}

#[test]
fn the_native_sidecar_waits_for_ready_before_later_containers_start() {
    let (m, sp) = pod(APP);
    let (_, spec) = inject(&m, &sp, &Settings::default(), Cluster { minor: 29 }).unwrap();
    let proxy = proxy_of(&spec);
    let startup = proxy.startup_probe.as_ref().expect("a startup probe");
    let get = startup.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(get.port, IntOrString::Int(READY_PORT));
    assert_eq!(startup.period_seconds, Some(1));
    // At least five minutes before the kubelet gives up on it.
    assert!(startup.period_seconds.unwrap() * startup.failure_threshold.unwrap() >= 300);
    assert!(proxy.readiness_probe.is_some(), "readiness stays");
    // Classic sidecars are held by the postStart hook instead.
    let (_, spec) = inject(&m, &sp, &Settings::default(), Cluster { minor: 28 }).unwrap();
    assert!(proxy_of(&spec).startup_probe.is_none());
}

#[test]
fn capture_annotations_take_exactly_what_mesh_proxy_init_takes() {
    let s = Settings::default();
    let ok = |key: &str, value: &str| {
        let (m, sp) = with_annotations(&[(key, value)]);
        inject(&m, &sp, &s, Cluster { minor: 29 })
            .map(|(_, spec)| init_args(&spec))
            .map_err(|e| e.to_string())
    };
    use annotation::*;
    // `*` only where init captures everything, and only alone.
    assert!(
        ok(INCLUDE_INBOUND_PORTS, "*")
            .unwrap()
            .ends_with(&["--inbound-ports".to_string(), "*".to_string()])
    );
    assert!(
        ok(INCLUDE_OUTBOUND_IP_RANGES, " * ")
            .unwrap()
            .ends_with(&["--outbound-ips".to_string(), "*".to_string()])
    );
    for (key, value, want) in [
        (EXCLUDE_INBOUND_PORTS, "*", "not a port: \"*\""),
        (INCLUDE_OUTBOUND_PORTS, "*", "not a port: \"*\""),
        (EXCLUDE_OUTBOUND_PORTS, "*", "not a port: \"*\""),
        (EXCLUDE_OUTBOUND_IP_RANGES, "*", "not a CIDR: \"*\""),
        (
            INCLUDE_INBOUND_PORTS,
            "*,80",
            "\"*,80\": \"*\" must be the only value",
        ),
        (
            INCLUDE_OUTBOUND_IP_RANGES,
            "10.0.0.0/8,*",
            "\"*\" must be the only value",
        ),
        (EXCLUDE_INBOUND_PORTS, "+80", "not a port: \"+80\""),
        (INCLUDE_INBOUND_PORTS, "80,0", "not a port: \"0\""),
        (EXCLUDE_OUTBOUND_PORTS, "65536", "not a port: \"65536\""),
        (
            EXCLUDE_OUTBOUND_IP_RANGES,
            "10.0.0.1/",
            "not a CIDR: \"10.0.0.1/\"",
        ),
        (
            EXCLUDE_OUTBOUND_IP_RANGES,
            "10.0.0.0/33",
            "prefix length must be 0-32",
        ),
    ] {
        let e = ok(key, value).unwrap_err();
        assert!(
            e.starts_with(&format!("metadata.annotations[{key}]: ")) && e.contains(want),
            "{key}={value}: {e}"
        );
    }
    // What is accepted is passed on in the form init reads back the same.
    let args = ok(EXCLUDE_OUTBOUND_IP_RANGES, "10.1.2.3/8, 169.254.169.254,,").unwrap();
    assert!(
        args.ends_with(&[
            "--exclude-outbound-ips".to_string(),
            "10.0.0.0/8,169.254.169.254/32".to_string()
        ]),
        "{args:?}"
    );
    let args = ok(INCLUDE_INBOUND_PORTS, "").unwrap();
    assert!(
        args.ends_with(&["--inbound-ports".to_string(), String::new()]),
        "an empty list captures nothing: {args:?}"
    );
    let args = ok(EXCLUDE_OUTBOUND_PORTS, " 5432, 6379 ,5432").unwrap();
    assert!(args.ends_with(&["5432,6379".to_string()]), "{args:?}");
}

fn resources(pairs: &[(&str, &str)]) -> Result<ResourceRequirements, String> {
    let (m, sp) = with_annotations(pairs);
    inject(&m, &sp, &Settings::default(), Cluster { minor: 29 })
        .map(|(_, spec)| proxy_of(&spec).resources.clone().unwrap())
        .map_err(|e| e.to_string())
}

fn quantities(m: &Option<BTreeMap<String, Quantity>>) -> Vec<(String, String)> {
    m.iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

#[test]
fn resource_annotations_replace_the_defaults_as_in_istio_and_requests_stay_within_limits() {
    use annotation::*;
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    let d = resources(&[]).unwrap();
    assert_eq!(
        quantities(&d.requests),
        vec![pair("cpu", "10m"), pair("memory", "32Mi")]
    );
    assert_eq!(
        quantities(&d.limits),
        vec![pair("cpu", "2"), pair("memory", "256Mi")]
    );
    // A request above the default limit: the annotations alone give the
    // resources, so no default limit sits below it.
    let r = resources(&[(PROXY_CPU, "3"), (PROXY_MEMORY, "1Gi")]).unwrap();
    assert_eq!(
        quantities(&r.requests),
        vec![pair("cpu", "3"), pair("memory", "1Gi")]
    );
    assert!(r.limits.is_none(), "{r:?}");
    let r = resources(&[(PROXY_MEMORY_LIMIT, "512Mi")]).unwrap();
    assert!(r.requests.is_none());
    assert_eq!(quantities(&r.limits), vec![pair("memory", "512Mi")]);
    let r = resources(&[(PROXY_CPU, "500m"), (PROXY_CPU_LIMIT, "0.5")]).unwrap();
    assert_eq!(quantities(&r.limits), vec![pair("cpu", "0.5")]);
    // A request above its own limit is refused, naming both.
    let e = resources(&[(PROXY_CPU, "1500m"), (PROXY_CPU_LIMIT, "1")]).unwrap_err();
    assert!(
        e.contains("metadata.annotations[sidecar.mesh.dev/proxyCPU]")
            && e.contains("\"1500m\"")
            && e.contains("sidecar.mesh.dev/proxyCPULimit"),
        "{e}"
    );
    let e = resources(&[(PROXY_MEMORY, "1Gi"), (PROXY_MEMORY_LIMIT, "1000Mi")]).unwrap_err();
    assert!(e.contains("proxyMemory]"), "{e}");
    for (key, bad) in [
        (PROXY_CPU, "1.5.5"),
        (PROXY_MEMORY, "-1Mi"),
        (PROXY_CPU_LIMIT, "2 cores"),
        (PROXY_MEMORY_LIMIT, "1GB"),
    ] {
        let e = resources(&[(key, bad)]).unwrap_err();
        assert!(
            e.starts_with(&format!("metadata.annotations[{key}]:")) && e.contains(bad),
            "{e}"
        );
    }
}

#[test]
fn settings_are_checked_too() {
    assert_eq!(Settings::default().validate(), Ok(()));
    let s = Settings {
        proxy_memory: "512Mi".into(),
        proxy_memory_limit: "256Mi".into(),
        ..Default::default()
    };
    let e = s.validate().unwrap_err();
    assert_eq!(e.field, "settings.proxyMemory");
    let s = Settings {
        proxy_cpu: "1.5.5".into(),
        ..Default::default()
    };
    assert_eq!(s.validate().unwrap_err().field, "settings.proxyCPU");
    let (m, sp) = pod(APP);
    assert!(inject(&m, &sp, &s, Cluster { minor: 29 }).is_err());
    let s = Settings {
        log_level: "loud".into(),
        ..Default::default()
    };
    assert_eq!(s.validate().unwrap_err().field, "settings.logLevel");
}

#[test]
fn boolean_annotations_are_true_or_false() {
    use annotation::*;
    for key in [HOLD_APPLICATION, REWRITE_PROBES] {
        for bad in ["yes", "True", "1", ""] {
            let (m, sp) = with_annotations(&[(key, bad)]);
            let e = inject(&m, &sp, &Settings::default(), Cluster { minor: 28 }).unwrap_err();
            assert_eq!(e.field, format!("metadata.annotations[{key}]"));
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }
    let (m, sp) = with_annotations(&[(HOLD_APPLICATION, "false")]);
    let (_, spec) = inject(&m, &sp, &Settings::default(), Cluster { minor: 28 }).unwrap();
    assert!(proxy_of(&spec).lifecycle.is_none());
}

#[test]
fn probes_the_proxy_could_not_forward_are_fixed_or_refused() {
    let (m, sp) = pod(
        "metadata: {name: a}\nspec: {containers: [{name: web, image: x, livenessProbe: {httpGet: {path: healthz, port: 8080}, timeoutSeconds: 0}, readinessProbe: {httpGet: {path: '', port: 8080}}}]}",
    );
    let (_, spec) = inject(&m, &sp, &Settings::default(), Cluster { minor: 29 }).unwrap();
    let probers = probers_of(&spec);
    // As the kubelet asks: a "/" before a path without one.
    assert_eq!(probers["/app-health/web/livez"]["path"], "/healthz");
    assert!(
        probers["/app-health/web/livez"]
            .get("timeoutSeconds")
            .is_none()
    );
    assert_eq!(probers["/app-health/web/readyz"]["path"], "/");
    for port in ["0", "70000", "-1"] {
        let (m, sp) = pod(&format!(
            "metadata: {{name: a}}\nspec: {{containers: [{{name: web, image: x, startupProbe: {{httpGet: {{port: {port}}}}}}}]}}"
        ));
        let e = inject(&m, &sp, &Settings::default(), Cluster { minor: 29 }).unwrap_err();
        assert_eq!(
            e.field, "spec.containers[0].startupProbe.httpGet.port",
            "{e}"
        );
    }
}

#[test]
fn only_true_and_false_choose_as_the_webhook_selectors_do() {
    let s = Settings::default();
    let ns = BTreeMap::from([(NAMESPACE_LABEL.to_string(), "enabled".to_string())]);
    let none = BTreeMap::new();
    for (where_, value) in [
        ("labels", "yes"),
        ("labels", "True"),
        ("annotations", "enabled"),
        ("annotations", "n"),
    ] {
        let (m, sp) = pod(&format!(
            "metadata: {{name: a, {where_}: {{sidecar.mesh.dev/inject: '{value}'}}}}\nspec: {{containers: [{{name: app, image: x}}]}}"
        ));
        assert_eq!(
            decide("shop", &ns, &m, &sp, &s),
            Err(Skip::InvalidInjectValue),
            "{where_} {value}"
        );
        assert_eq!(
            decide("shop", &none, &m, &sp, &s),
            Err(Skip::InvalidInjectValue)
        );
        assert_eq!(candidate(&m, &sp), Err(Skip::InvalidInjectValue));
        // kube-inject leaves it alone too.
        let (im, is) = inject(&m, &sp, &s, Cluster { minor: 29 }).unwrap();
        assert_eq!((im, is), (m, sp));
    }
    assert!(
        Skip::InvalidInjectValue
            .to_string()
            .contains("sidecar.mesh.dev/inject")
    );
    // A valid label decides even when the annotation says otherwise.
    let (m, sp) = pod(
        "metadata: {name: a, labels: {sidecar.mesh.dev/inject: 'false'}, annotations: {sidecar.mesh.dev/inject: 'maybe'}}\nspec: {containers: [{name: app, image: x}]}",
    );
    assert_eq!(decide("shop", &ns, &m, &sp, &s), Err(Skip::PodDisabled));
}

#[test]
fn reinjection_rewrites_only_the_probes_of_containers_added_later() {
    let s = Settings::default();
    for minor in [28, 29] {
        let (m, sp) = pod(
            "metadata: {name: a}\nspec: {containers: [{name: web, image: x, readinessProbe: {httpGet: {path: /ready, port: 8080}}}]}",
        );
        let cluster = Cluster { minor };
        let (m1, mut s1) = inject(&m, &sp, &s, cluster).unwrap();
        assert_eq!(
            inject(&m1, &s1, &s, cluster).unwrap(),
            (m1.clone(), s1.clone())
        );
        // A later webhook adds a container with HTTP probes.
        let late: Container = serde_yaml::from_str(
            "{name: late, image: y, ports: [{name: h, containerPort: 9000}], livenessProbe: {httpGet: {path: /live, port: h}}, readinessProbe: {exec: {command: [x]}}}",
        )
        .unwrap();
        s1.containers.push(late);
        let (m2, s2) = inject(&m1, &s1, &s, cluster).unwrap();
        assert_eq!(m2, m1, "metadata unchanged");
        let late = s2.containers.iter().find(|c| c.name == "late").unwrap();
        let live = late
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/app-health/late/livez"));
        assert_eq!(live.port, IntOrString::Int(STATUS_PORT));
        assert!(late.readiness_probe.as_ref().unwrap().exec.is_some());
        let probers = probers_of(&s2);
        assert_eq!(probers["/app-health/late/livez"]["port"], 9000);
        assert_eq!(probers["/app-health/web/readyz"]["port"], 8080, "kept");
        // The sidecar's own probes are not the app's.
        let proxy = proxy_of(&s2);
        assert_eq!(
            proxy
                .readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .port,
            IntOrString::Int(READY_PORT)
        );
        // Only the new probe and the env changed.
        let mut expect = s1.clone();
        let i = expect
            .containers
            .iter()
            .position(|c| c.name == "late")
            .unwrap();
        expect.containers[i] = late.clone();
        let p = if minor >= 29 {
            &mut expect.init_containers.as_mut().unwrap()[1]
        } else {
            &mut expect.containers[0]
        };
        *p = proxy.clone();
        assert_eq!(s2, expect);
        // Injecting again changes nothing.
        assert_eq!(
            inject(&m2, &s2, &s, cluster).unwrap(),
            (m2.clone(), s2.clone())
        );
        // The same as injecting the pod with the container from the start.
        let mut whole = sp.clone();
        whole.containers.push(s1.containers.last().unwrap().clone());
        assert_eq!(inject(&m, &whole, &s, cluster).unwrap(), (m2, s2));
    }
}

#[test]
fn a_reinjected_pod_without_probers_gets_the_env() {
    let s = Settings::default();
    let (m, sp) = pod(APP);
    let (m1, mut s1) = inject(&m, &sp, &s, Cluster { minor: 29 }).unwrap();
    assert!(probers_of(&s1).is_null());
    s1.containers[0].readiness_probe = Some(Probe {
        http_get: Some(HTTPGetAction {
            port: IntOrString::Int(8080),
            ..Default::default()
        }),
        ..Default::default()
    });
    let (_, s2) = inject(&m1, &s1, &s, Cluster { minor: 29 }).unwrap();
    assert_eq!(probers_of(&s2)["/app-health/app/readyz"]["port"], 8080);
    // An opted-out rewrite stays opted out.
    let mut m3 = m1.clone();
    m3.annotations
        .as_mut()
        .unwrap()
        .insert(annotation::REWRITE_PROBES.into(), "false".into());
    assert_eq!(
        inject(&m3, &s1, &s, Cluster { minor: 29 }).unwrap(),
        (m3.clone(), s1.clone())
    );
}

#[test]
fn fields_the_types_do_not_know_survive_injection() {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "f", "futureMeta": "m"},
        "spec": {
            "futureSpec": {"x": [1, 2]},
            "initContainers": [{"name": "setup", "image": "s", "futureField": true}],
            "containers": [{
                "name": "app", "image": "a", "futureField": 7,
                "readinessProbe": {"httpGet": {"port": 8080, "futureProbe": "p"}},
            }],
        },
    });
    for minor in [28, 29] {
        let (m, sp) = parse_pod(&pod).unwrap();
        let out = inject_pod(&pod, &m, &sp, &Settings::default(), Cluster { minor }).unwrap();
        let p = &out.pod;
        assert_eq!(p["metadata"]["futureMeta"], "m");
        assert_eq!(p["spec"]["futureSpec"], serde_json::json!({"x": [1, 2]}));
        let find = |list: &str, name: &str| {
            p["spec"][list]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(find("initContainers", "setup")["futureField"], true);
        assert!(
            find("initContainers", INIT_NAME)
                .get("futureField")
                .is_none()
        );
        let app = find("containers", "app");
        assert_eq!(app["futureField"], 7);
        assert_eq!(
            app["readinessProbe"]["httpGet"]["path"],
            "/app-health/app/readyz"
        );
        // No op removes anything: injection only adds and rewrites.
        assert!(
            out.patch.iter().all(|op| op["op"] != "remove"
                || op["path"]
                    .as_str()
                    .unwrap()
                    .starts_with("/spec/containers/")),
            "{:#?}",
            out.patch
        );
        // The same as the typed injection, plus the unknown fields.
        let (im, is) = inject(&m, &sp, &Settings::default(), Cluster { minor }).unwrap();
        assert_eq!(parse_pod(p).unwrap(), (im, is));
    }
}

#[test]
fn malformed_documents_are_errors_naming_document_and_field() {
    let s = Settings::default();
    for (doc, want) in [
        (
            "kind: Deployment\nmetadata: {name: web}\nspec: []\n",
            "document 1 (Deployment web): spec: expected a mapping, got a list",
        ),
        (
            "kind: Deployment\nmetadata: {name: web}\nspec: {template: 7}\n",
            "document 1 (Deployment web): spec.template: expected a mapping, got a number",
        ),
        (
            "kind: Deployment\nmetadata: {name: web}\nspec: {replicas: 1}\n",
            "document 1 (Deployment web): spec.template: missing",
        ),
        (
            "kind: CronJob\nmetadata: {name: c}\nspec: {jobTemplate: {spec: 'x'}}\n",
            "document 1 (CronJob c): spec.jobTemplate.spec: expected a mapping, got a string",
        ),
        (
            "kind: Deployment\nspec: {template: {metadata: [], spec: {containers: []}}}\n",
            "document 1 (Deployment ): spec.template.metadata: invalid type",
        ),
        (
            "kind: Job\nmetadata: {name: j}\nspec: {template: {metadata: {}, spec: {containers: 3}}}\n",
            "document 1 (Job j): spec.template.spec: invalid type",
        ),
        (
            "kind: Job\nmetadata: {name: j}\nspec: {template: {metadata: {}}}\n",
            "document 1 (Job j): spec.template.spec: missing",
        ),
        (
            "kind: Pod\nmetadata: {name: x}\n",
            "document 1 (Pod x): spec: missing",
        ),
        (
            "kind: Pod\nmetadata: x\nspec: {}\n",
            "document 1 (Pod ): metadata: invalid type",
        ),
        (
            "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: b}], [7]: x}\n",
            "document 1 (Pod p): not a pod template",
        ),
        (
            "kind: ConfigMap\nmetadata: {name: c}\n---\nkind: Pod\nspec: {containers: [{name: a, image: b]}\n",
            "document 2 (? ?): not YAML",
        ),
    ] {
        let e = inject_documents(doc, &s, Cluster { minor: 29 }).unwrap_err();
        assert!(e.to_string().starts_with(want), "{doc}\n{e}");
    }
    // Documents that are not workloads pass, whatever their shape.
    let odd = "- a\n- b\n---\nplain\n---\nkind: [Deployment]\nspec: []\n";
    let out = inject_documents(odd, &s, Cluster { minor: 29 }).unwrap();
    assert_eq!(out.matches("---").count(), 2, "{out}");
}

#[test]
fn kube_inject_keeps_what_it_does_not_inject() {
    let text = "kind: Pod\nmetadata: {name: h}\nspec: {hostNetwork: true, containers: [{name: a, image: b, futureField: 1}]}\n";
    let out = inject_documents(text, &Settings::default(), Cluster { minor: 29 }).unwrap();
    let want: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    assert_eq!(out, serde_yaml::to_string(&want).unwrap());
    let text = "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: b, futureField: 1}]}\n";
    let out = inject_documents(text, &Settings::default(), Cluster { minor: 29 }).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(v["spec"]["containers"][0]["futureField"], 1);
    assert_eq!(v["spec"]["initContainers"][1]["name"], PROXY_NAME);
}
