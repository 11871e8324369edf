//! The real-cluster harness: `e2e/cluster/up.sh` (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from the Kubernetes
//! modules, and `mesh-node` running pods), kubectl against it, and
//! `down.sh` when the test is done.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Why the cluster cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if let Some(why) = crate::netns::unavailable() {
        return Some(why);
    }
    let go = Command::new("sh")
        .args(["-c", "command -v go"])
        .stdout(Stdio::null())
        .status();
    if !go.is_ok_and(|s| s.success()) {
        return Some("go is not installed (the control plane is built from Go modules)".into());
    }
    None
}

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub state: PathBuf,
}

impl Cluster {
    /// Starts the cluster (building what is missing); panics with the
    /// script's output when it fails.
    pub fn up() -> Cluster {
        let state = root().join("target/cluster/state");
        let script = root().join("e2e/cluster");
        let _ = Command::new("bash").arg(script.join("down.sh")).status();
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(script.join("up.sh"))
            .env("MESH_CLUSTER_STATE", &state)
            // The suite builds the workspace's binaries before it runs.
            .env("MESH_CLUSTER_SKIP_CARGO", "1")
            .stdin(Stdio::null())
            .output()
            .expect("up.sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{text}");
        let cluster = Cluster {
            kubeconfig: state.join("admin.kubeconfig"),
            state,
        };
        if !out.status.success() {
            cluster.dump();
            panic!("e2e/cluster/up.sh failed");
        }
        println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());
        cluster
    }

    /// kubectl's output; panics naming the command when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args, None).unwrap_or_else(|e| {
            self.dump();
            panic!("kubectl {}: {e}", args.join(" "))
        })
    }

    pub fn apply(&self, yaml: &str) -> String {
        self.try_kubectl(&["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| {
                self.dump();
                panic!("kubectl apply: {e}\n{yaml}")
            })
    }

    pub fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new(root().join("target/cluster/bin/kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).expect("kubectl JSON")
    }

    /// Polls `f` until it gives Some, or panics with `what` and the last
    /// value seen after `timeout`.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            match f() {
                Ok(v) => return v,
                Err(last) if Instant::now() > deadline => {
                    self.dump();
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// A command in a pod's network namespace (and its resolv.conf and
    /// hosts), as `kubectl exec` would run it.
    pub fn in_pod(&self, ns: &str, pod: &str, argv: &[&str]) -> Result<String, String> {
        let uid = self.kubectl(&[
            "get",
            "pod",
            "-n",
            ns,
            pod,
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        let netns = pod_netns(&uid);
        let out = Command::new("ip")
            .args(["netns", "exec", &netns])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{argv:?} in {ns}/{pod}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// What a failing test needs to see: pods, events, and the last lines
    /// of every log.
    pub fn dump(&self) {
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            match self.try_kubectl(args, None) {
                Ok(t) => println!("$ kubectl {}\n{t}", args.join(" ")),
                Err(e) => println!("$ kubectl {}: {e}", args.join(" ")),
            }
        }
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for f in {0}/logs/*.log $(find {0}/node/pods -name '*.log' 2>/dev/null); do echo \"--- $f\"; tail -n 25 \"$f\"; done",
                self.state.display()
            ))
            .status();
    }
}

/// The network namespace `mesh-node` gives the pod with this UID.
pub fn pod_netns(uid: &str) -> String {
    let short: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("mk-{short}")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = Command::new("bash")
            .arg(root().join("e2e/cluster/down.sh"))
            .env("MESH_CLUSTER_STATE", &self.state)
            .status();
    }
}
