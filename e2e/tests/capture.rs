//! Transparent capture as in a pod: `mesh-proxy init` installs the iptables
//! rules in a network namespace, the proxy runs there as UID 1337, and an
//! app's plain connections are redirected through it — outbound to a
//! service address (SO_ORIGINAL_DST picks the destination) and inbound from
//! another namespace over a veth link.
//!
//! Needs root, `ip`, iptables, `setpriv` and python3; without them it says
//! so and passes. Addresses exist only inside the namespaces it creates.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_e2e::binary;
use mesh_e2e::netns::{Netns, run, unavailable};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn missing_prerequisite() -> Option<String> {
    if let Some(why) = unavailable() {
        return Some(why);
    }
    let python = Command::new("sh")
        .args(["-c", "command -v python3"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!python).then(|| "python3 is not installed".to_string())
}

/// Runs a Python HTTP client in `ns`; returns the response body or error.
fn fetch(ns: &Netns, url: &str) -> String {
    let script = format!(
        "import urllib.request,sys\ntry:\n  r=urllib.request.urlopen('{url}',timeout=5); sys.stdout.write(r.read().decode())\nexcept Exception as e:\n  sys.stdout.write('ERROR '+str(e))"
    );
    let out = ns.exec("python3").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(ns: &Netns, url: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = fetch(ns, url);
        if got.contains(want) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn captured_traffic_goes_through_the_proxy() {
    if let Some(why) = missing_prerequisite() {
        assert!(
            std::env::var_os("MESH_E2E_NAMESPACES").is_none(),
            "MESH_E2E_NAMESPACES is set but the capture test cannot run: {why}"
        );
        println!("skipping the capture test: {why}");
        return;
    }
    let id = std::process::id();
    let pod = Netns::new(format!("meshcap-pod-{id}"));
    let client = Netns::new(format!("meshcap-cli-{id}"));
    let (veth_pod, veth_cli) = (format!("mcp{id}"), format!("mcc{id}"));
    let (veth_pod, veth_cli) = (
        &veth_pod[..veth_pod.len().min(15)],
        &veth_cli[..veth_cli.len().min(15)],
    );
    run(&[
        "ip", "link", "add", veth_pod, "type", "veth", "peer", "name", veth_cli,
    ]);
    run(&["ip", "link", "set", veth_pod, "netns", &pod.name]);
    run(&["ip", "link", "set", veth_cli, "netns", &client.name]);
    for (ns, dev, addr) in [
        (&pod, veth_pod, "10.201.0.1/24"),
        (&client, veth_cli, "10.201.0.2/24"),
    ] {
        run(&["ip", "-n", &ns.name, "addr", "add", addr, "dev", dev]);
        run(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
    }
    // A "service network" the pod routes out of, as a cluster's ClusterIPs.
    // (A veth pair inside the pod: some kernels lack the dummy driver.)
    run(&[
        "ip", "-n", &pod.name, "link", "add", "svc0", "type", "veth", "peer", "name", "svc1",
    ]);
    run(&["ip", "-n", &pod.name, "link", "set", "svc1", "up"]);
    run(&[
        "ip",
        "-n",
        &pod.name,
        "addr",
        "add",
        "10.96.0.1/16",
        "dev",
        "svc0",
    ]);
    run(&["ip", "-n", &pod.name, "link", "set", "svc0", "up"]);

    // The app: serves on 8000; also the upstream the service routes to.
    let _app = Kill(
        pod.exec("python3")
            .args(["-m", "http.server", "8000", "--bind", "0.0.0.0"])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The init container: the very command the injector writes.
    let proxy_bin = binary("mesh-proxy");
    let proxy_bin = proxy_bin.to_str().unwrap();
    let init = pod
        .exec(proxy_bin)
        .args(["init", "--proxy-uid", "1337", "--proxy-gid", "1337"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "init: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let dir = std::env::temp_dir().join(format!("meshcap-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("proxy.yaml");
    std::fs::write(
        &cfg,
        r#"version: capture
workload: {name: app-v1, namespace: default, labels: {app: app}}
destinations:
- host: reviews.default.svc.cluster.local
  port: 9080
  addresses: [10.96.0.10]
  protocol: HTTP
  http:
  - match: [{uri: {prefix: /direct}}]
    action: {directResponse: {status: 200, body: {string: "answered by the sidecar"}}}
  - action: {forward: [{cluster: reviews}]}
clusters:
- name: reviews
  service: reviews.default.svc.cluster.local
  endpoints: [{address: "127.0.0.1:8000"}]
inbound:
  ports: [{port: 8000, protocol: HTTP}]
  rateLimits:
  - total: {requestsPerSecond: 1000}
"#,
    )
    .unwrap();
    // World-readable so UID 1337 can read it.
    let _ = Command::new("chmod")
        .args(["-R", "a+rX", dir.to_str().unwrap()])
        .status();
    let _proxy = Kill(
        pod.exec("setpriv")
            .args([
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                proxy_bin,
                "--config",
                cfg.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Outbound: the app dials a service address; the sidecar answers.
    let got = wait_for(
        &pod,
        "http://10.96.0.10:9080/direct",
        "answered by the sidecar",
    );
    assert_eq!(got, "answered by the sidecar");
    // ...and forwards the rest to the cluster's endpoint.
    let got = wait_for(&pod, "http://10.96.0.10:9080/", "Directory listing");
    assert!(got.contains("Directory listing"), "{got}");

    // Inbound: another "pod" calls this one; the sidecar's inbound handles
    // it (metrics prove it) and the app answers.
    let got = wait_for(&client, "http://10.201.0.1:8000/", "Directory listing");
    assert!(got.contains("Directory listing"), "{got}");
    let metrics = fetch(&pod, "http://127.0.0.1:15020/stats/prometheus");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")),
        "no inbound request recorded: {metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"source\"")),
        "no outbound request recorded"
    );
    // The proxy's own traffic is not captured again (no loop): the forward
    // above would have hung otherwise. Status ports are reachable directly.
    let ready = fetch(&client, "http://10.201.0.1:15021/healthz/ready");
    assert_eq!(ready, "ready\n");
    let _ = std::fs::remove_dir_all(&dir);
}
