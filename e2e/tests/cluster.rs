//! The cluster itself: real kube-apiserver, etcd, controller-manager and
//! scheduler, with `mesh-node` running the pods. A Deployment becomes
//! Available, its Service reaches both replicas by ClusterIP and by DNS,
//! pods are replaced, readiness takes a pod out of the EndpointSlice, what
//! the node cannot run is refused with a reason, and a deleted namespace
//! leaves no process or network namespace behind.
//!
//! Runs as root with Go installed (`scripts/test.sh`); says why it is
//! skipped otherwise.

use std::time::{Duration, Instant};

use mesh_e2e::cluster::{Cluster, pod_netns, unavailable};
use serde_json::Value;

const APPS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: callme-ready, namespace: default}
data: {ready: "yes"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: callme, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: callme}}
  template:
    metadata: {labels: {app: callme}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: callme
        image: mesh/examples-callme:latest
        env: [{name: VERSION, value: v1}]
        ports: [{name: http, containerPort: 8091}]
        readinessProbe:
          httpGet: {path: /callme/ping, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: callme, namespace: default}
spec:
  selector: {app: callme}
  ports: [{name: http, port: 8091, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: callme-headless, namespace: default}
spec:
  clusterIP: None
  selector: {app: callme}
  ports: [{name: http, port: 8091}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  containers:
  - name: caller
    image: mesh/examples-caller:latest
    env:
    - {name: CALLME_URL, value: "http://callme:8091"}
    - {name: MY_NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: READY_FLAG, valueFrom: {configMapKeyRef: {name: callme-ready, key: ready}}}
    readinessProbe:
      tcpSocket: {port: 8090}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {name: flaky, namespace: default, labels: {app: callme}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: callme
    image: mesh/examples-callme:latest
    env: [{name: VERSION, value: flaky}]
    ports: [{name: http, containerPort: 8091}]
    volumeMounts: [{name: flag, mountPath: /etc/flag, readOnly: true}]
    readinessProbe:
      exec: {command: [grep, -qx, "yes", /etc/flag/ready]}
      periodSeconds: 1
      failureThreshold: 2
  volumes:
  - {name: flag, configMap: {name: callme-ready}}
"#;

fn pod_ips(c: &Cluster, selector: &str) -> Vec<String> {
    let pods = c.json(&["get", "pods", "-n", "default", "-l", selector]);
    let mut ips: Vec<String> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["status"]["podIP"].as_str().map(String::from))
        .collect();
    ips.sort();
    ips
}

/// The ready endpoint addresses of a Service's EndpointSlices.
fn ready_endpoints(c: &Cluster, svc: &str) -> Vec<String> {
    let slices = c.json(&[
        "get",
        "endpointslices",
        "-n",
        "default",
        "-l",
        &format!("kubernetes.io/service-name={svc}"),
    ]);
    let mut ips: Vec<String> = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] != Value::Bool(false))
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    ips.sort();
    ips
}

fn curl(c: &Cluster, pod: &str, url: &str) -> Result<String, String> {
    c.in_pod(
        "default",
        pod,
        &["curl", "-sS", "--fail", "--max-time", "3", url],
    )
}

#[test]
fn the_cluster_runs_pods_services_and_dns() {
    if let Some(why) = unavailable() {
        if std::env::var_os("MESH_E2E_NAMESPACES").is_some() {
            panic!("MESH_E2E_NAMESPACES is set but the cluster cannot run here: {why}");
        }
        println!("skipped: {why}");
        return;
    }
    let c = Cluster::up();
    let nodes = c.kubectl(&["get", "nodes", "-o", "wide"]);
    println!("{nodes}");
    assert!(
        nodes.contains("node-1") && nodes.contains("node-2"),
        "{nodes}"
    );

    // A Deployment of the sample app with 2 replicas becomes Available.
    let t = Instant::now();
    c.apply(APPS);
    c.kubectl(&[
        "rollout",
        "status",
        "deployment/callme",
        "-n",
        "default",
        "--timeout=120s",
    ]);
    println!(
        "deployment available {:.1} s after apply",
        t.elapsed().as_secs_f64()
    );
    c.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "pod/flaky",
        "-n",
        "default",
        "--timeout=60s",
    ]);

    // Its EndpointSlice lists both pod IPs (and the flaky pod, ready too).
    let pods = pod_ips(&c, "app=callme");
    assert_eq!(pods.len(), 3, "{pods:?}");
    c.wait(
        "the EndpointSlice to list every ready pod",
        Duration::from_secs(30),
        || {
            let eps = ready_endpoints(&c, "callme");
            if eps == pods {
                Ok(())
            } else {
                Err(format!("{eps:?}, pods {pods:?}"))
            }
        },
    );

    // The client reaches it by ClusterIP, full DNS name and short name.
    let cluster_ip = c.kubectl(&[
        "get",
        "svc",
        "callme",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert!(cluster_ip.starts_with("10.248."), "{cluster_ip}");
    for url in [
        format!("http://{cluster_ip}:8091/callme/ping"),
        "http://callme.default.svc.cluster.local:8091/callme/ping".to_string(),
        "http://callme:8091/callme/ping".to_string(),
    ] {
        let body = curl(&c, "client", &url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(body.starts_with("callme-service:"), "{url}: {body}");
    }
    // Both replicas answer through the ClusterIP (DNAT spreads the calls).
    let mut versions = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let b = curl(
            &c,
            "client",
            &format!("http://{cluster_ip}:8091/callme/ping"),
        )
        .expect("callme");
        versions.insert(b);
    }
    assert!(versions.len() >= 2, "one backend only: {versions:?}");
    // The app itself resolves the short name through its resolv.conf.
    let client_ip = pod_ips(&c, "app=client").pop().expect("client IP");
    let body = curl(
        &c,
        "client",
        &format!("http://{client_ip}:8090/caller/ping"),
    )
    .expect("caller");
    assert!(body.contains("callme-service:"), "{body}");
    // Headless: the ready pods' addresses.
    let headless = c
        .in_pod(
            "default",
            "client",
            &["getent", "ahostsv4", "callme-headless"],
        )
        .expect("getent");
    for ip in &pods {
        assert!(headless.contains(ip.as_str()), "{ip} not in {headless}");
    }
    // The API server through the kubernetes Service, and the env vars.
    let version = curl(&c, "client", "https://kubernetes.default.svc:443/version");
    assert!(
        matches!(&version, Err(e) if e.contains("certificate"))
            || version.as_ref().is_ok_and(|v| v.contains("v1.37")),
        "{version:?}"
    );
    let client = c.json(&["get", "pod", "client", "-n", "default"]);
    let pid = client["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("mesh-node://"))
        .expect("containerID")
        .to_string();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    for want in [
        "KUBERNETES_SERVICE_HOST=10.248.0.1".to_string(),
        "KUBERNETES_SERVICE_PORT=443".into(),
        "CALLME_SERVICE_HOST=".into(),
        format!("MY_IP={client_ip}"),
        "READY_FLAG=yes".into(),
    ] {
        assert!(
            environ.contains(&want),
            "{want} not in the client's environment: {environ}"
        );
    }
    assert!(environ.contains("MY_NODE=node-"), "{environ}");
    // The ServiceAccount admission's projected volume holds a token the
    // API server issued for this pod.
    let uid = client["metadata"]["uid"].as_str().expect("uid");
    let vols = c
        .state
        .join(format!("node/pods/default_client_{uid}/volumes"));
    let api_access = std::fs::read_dir(&vols)
        .expect("volumes")
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kube-api-access-")
        })
        .expect("kube-api-access volume");
    let token = std::fs::read_to_string(api_access.path().join("token")).expect("token");
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    assert!(
        api_access.path().join("ca.crt").exists() && api_access.path().join("namespace").exists()
    );

    // A failing readiness probe takes a pod out of the EndpointSlice.
    let flaky_ip = c.kubectl(&[
        "get",
        "pod",
        "flaky",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    c.kubectl(&[
        "patch",
        "configmap",
        "callme-ready",
        "-n",
        "default",
        "-p",
        r#"{"data":{"ready":"no"}}"#,
    ]);
    c.wait(
        "the flaky pod to leave the EndpointSlice",
        Duration::from_secs(40),
        || {
            let eps = ready_endpoints(&c, "callme");
            if eps.contains(&flaky_ip) {
                Err(format!("{eps:?}"))
            } else {
                Ok(())
            }
        },
    );
    let ready = c.kubectl(&[
        "get",
        "pod",
        "flaky",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(ready, "False");
    let describe = c.kubectl(&["describe", "pod", "flaky", "-n", "default"]);
    assert!(describe.contains("Readiness probe failed"), "{describe}");
    c.kubectl(&[
        "delete",
        "pod",
        "flaky",
        "-n",
        "default",
        "--wait=true",
        "--timeout=30s",
    ]);

    // A pod deleted is replaced, and traffic continues.
    let victim = c.json(&["get", "pods", "-n", "default", "-l", "app=callme"])["items"][0]["metadata"]["name"]
        .as_str()
        .expect("a callme pod")
        .to_string();
    let victim_uid = c.kubectl(&[
        "get",
        "pod",
        &victim,
        "-n",
        "default",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    c.kubectl(&["delete", "pod", &victim, "-n", "default", "--wait=false"]);
    let mut ok = 0;
    let mut failed = vec![];
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        match curl(&c, "client", "http://callme:8091/callme/ping") {
            Ok(_) => ok += 1,
            Err(e) => failed.push(e),
        }
    }
    println!(
        "during the replacement: {ok} answered, {} failed",
        failed.len()
    );
    assert!(
        failed.len() <= 2,
        "traffic stopped while a pod was replaced: {failed:?}"
    );
    c.kubectl(&[
        "rollout",
        "status",
        "deployment/callme",
        "-n",
        "default",
        "--timeout=60s",
    ]);
    c.wait(
        "the deleted pod's namespace to go",
        Duration::from_secs(30),
        || {
            let path = format!("/run/netns/{}", pod_netns(&victim_uid));
            if std::path::Path::new(&path).exists() {
                Err(path)
            } else {
                Ok(())
            }
        },
    );
    assert_eq!(pod_ips(&c, "app=callme").len(), 2);
    for _ in 0..10 {
        curl(&c, "client", "http://callme:8091/callme/ping").expect("callme after the replacement");
    }

    // What the node cannot run is refused with a reason.
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: no-image, namespace: default}
spec:
  containers: [{name: web, image: "nginx:1.27"}]
---
apiVersion: v1
kind: Pod
metadata: {name: host-net, namespace: default}
spec:
  hostNetwork: true
  containers: [{name: app, image: mesh/examples-callme:latest}]
"#,
    );
    c.wait(
        "no-image to report ErrImagePull",
        Duration::from_secs(30),
        || {
            let p = c.json(&["get", "pod", "no-image", "-n", "default"]);
            let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
            if w["reason"] == "ErrImagePull"
                && w["message"].as_str().is_some_and(|m| m.contains("nginx"))
            {
                Ok(())
            } else {
                Err(p["status"].to_string())
            }
        },
    );
    c.wait(
        "host-net to fail as unsupported",
        Duration::from_secs(30),
        || {
            let p = c.json(&["get", "pod", "host-net", "-n", "default"]);
            let s = &p["status"];
            if s["phase"] == "Failed"
                && s["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("hostNetwork"))
            {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
    let describe = c.kubectl(&["describe", "pod", "no-image", "-n", "default"]);
    println!("{describe}");
    assert!(
        describe.contains("ErrImagePull") && describe.contains("Failed to pull image"),
        "{describe}"
    );
    println!(
        "{}",
        c.kubectl(&["get", "pods", "-o", "wide", "-n", "default"])
    );

    // Init containers in order, a native sidecar gating the app on its
    // startup probe, users, volumes and the working directory.
    c.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: sidecars, namespace: default}
spec:
  securityContext: {runAsUser: 1337, runAsGroup: 1337}
  initContainers:
  - name: first
    image: mesh/proxy:0.1.0
    command: [sh, -c, "id -u > /tmp/mesh-e2e-work/first"]
    securityContext: {runAsUser: 0}
    volumeMounts: [{name: work, mountPath: /tmp/mesh-e2e-work}]
  - name: helper
    image: mesh/examples-callme:latest
    restartPolicy: Always
    args: [--listen, "0.0.0.0:8092"]
    startupProbe: {httpGet: {path: /callme/ping, port: 8092}, periodSeconds: 1}
  containers:
  - name: app
    image: mesh/examples-callme:latest
    workingDir: /tmp/mesh-e2e-work
    volumeMounts: [{name: work, mountPath: /tmp/mesh-e2e-work, readOnly: true}]
  volumes: [{name: work, emptyDir: {}}]
"#,
    );
    c.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/sidecars",
        "-n",
        "default",
        "--timeout=60s",
    ]);
    let p = c.json(&["get", "pod", "sidecars", "-n", "default"]);
    let inits = &p["status"]["initContainerStatuses"];
    assert_eq!(inits[0]["state"]["terminated"]["exitCode"], 0, "{inits}");
    assert_eq!(
        inits[0]["state"]["terminated"]["reason"], "Completed",
        "{inits}"
    );
    assert!(
        inits[1]["state"]["running"].is_object() && inits[1]["started"] == true,
        "{inits}"
    );
    let app_started = p["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        inits[1]["state"]["running"]["startedAt"]
            .as_str()
            .unwrap_or_default()
            <= app_started.as_str()
    );
    let uid = p["metadata"]["uid"].as_str().expect("uid");
    let first = std::fs::read_to_string(c.state.join(format!(
        "node/pods/default_sidecars_{uid}/volumes/work/first"
    )))
    .expect("the init container's file");
    assert_eq!(first.trim(), "0", "the init container runs as root");
    let pid = p["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("mesh-node://"))
        .expect("containerID")
        .to_string();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        proc_status.lines().any(|l| l.starts_with("Uid:\t1337\t")),
        "{proc_status}"
    );
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    assert_eq!(cwd, std::path::Path::new("/tmp/mesh-e2e-work"));

    // A namespace deleted takes its pods and processes with it.
    c.apply(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: doomed}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: doomed}
spec:
  containers: [{name: app, image: mesh/examples-callme:latest}]
"#,
    );
    c.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/app",
        "-n",
        "doomed",
        "--timeout=60s",
    ]);
    let uid = c.kubectl(&[
        "get",
        "pod",
        "app",
        "-n",
        "doomed",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let pid = c.json(&["get", "pod", "app", "-n", "doomed"])["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("mesh-node://"))
        .expect("containerID")
        .to_string();
    c.kubectl(&["delete", "namespace", "doomed", "--timeout=90s"]);
    let netns = format!("/run/netns/{}", pod_netns(&uid));
    assert!(!std::path::Path::new(&netns).exists(), "{netns} is left");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is left"
    );
}
