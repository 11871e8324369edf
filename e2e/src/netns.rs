//! Pods as network namespaces: a hub namespace routes between them (pilot
//! runs there), each pod has its own namespace joined to the hub by a veth
//! link, its `/etc/hosts` names the services' cluster IPs, and its sidecar's
//! capture is installed by `mesh-proxy init`, as the injector's init
//! container does. Addresses exist only inside these namespaces.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

/// Why namespaces cannot be used here, if they cannot.
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        return Some("not running as root".into());
    }
    for tool in ["ip", "iptables-restore", "setpriv"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    // Root in a container may still be refused namespaces: try one.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let probe = format!(
        "mesh-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
            }
        });
    let _ = Command::new("ip")
        .args(["netns", "del", &probe])
        .stderr(Stdio::null())
        .status();
    match made {
        Ok(()) => None,
        Err(why) => Some(format!("ip netns add is refused: {why}")),
    }
}

pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted when dropped (with its `/etc/netns` files).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A command run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a new thread inside the namespace (sockets it opens
    /// live there); its result arrives when it is done.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let path = format!("/run/netns/{}", self.name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            let _ = tx.send(f());
        });
        rx
    }

    /// Writes `/etc/netns/<name>/hosts`, which `ip netns exec` shows as
    /// `/etc/hosts` to what it runs.
    pub fn hosts(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        std::fs::write(format!("{dir}/hosts"), text).expect("hosts file");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// The hub and its pods. Pod `n` is 10.211.n.2, its hub side 10.211.n.1.
pub struct Network {
    pub hub: Netns,
    pub pods: Vec<Netns>,
    prefix: String,
}

/// The hub's own address: pilot and the test's own apps listen there.
pub const HUB: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);

impl Network {
    pub fn new(prefix: &str) -> Network {
        let hub = Netns::new(format!("{prefix}-hub"));
        run(&[
            "ip",
            "netns",
            "exec",
            &hub.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        // The hub's own address, which every pod's default route reaches.
        run(&[
            "ip",
            "-n",
            &hub.name,
            "addr",
            "add",
            &format!("{HUB}/32"),
            "dev",
            "lo",
        ]);
        Network {
            hub,
            pods: Vec::new(),
            prefix: prefix.to_string(),
        }
    }

    /// Adds a pod; returns its address.
    pub fn pod(&mut self, name: &str) -> IpAddr {
        let n = self.pods.len() + 1;
        let ns = Netns::new(format!("{}-{name}", self.prefix));
        let hub_side = format!("p{n}");
        run(&[
            "ip",
            "-n",
            &self.hub.name,
            "link",
            "add",
            &hub_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ]);
        run(&[
            "ip",
            "-n",
            &self.hub.name,
            "addr",
            "add",
            &format!("10.211.{n}.1/24"),
            "dev",
            &hub_side,
        ]);
        run(&["ip", "-n", &self.hub.name, "link", "set", &hub_side, "up"]);
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("10.211.{n}.2/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &format!("10.211.{n}.1"),
        ]);
        self.pods.push(ns);
        IpAddr::from([10, 211, n as u8, 2])
    }

    pub fn ns(&self, pod: &str) -> &Netns {
        let name = format!("{}-{pod}", self.prefix);
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {pod}"))
    }
}
