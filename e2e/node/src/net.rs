//! A pod's network: its own network namespace with one veth link to the
//! host, routed from the host (a /32 route per pod, the host answering ARP
//! for the pod's gateway), so the API server, other pods and the host reach
//! it and every packet between pods crosses the host's netfilter (where
//! Services are programmed). The steps are pure command lists; `services::Runner`
//! executes them.

use std::net::Ipv4Addr;

/// The gateway every pod's default route names; the host answers ARP for it.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Debug, Clone, PartialEq)]
pub struct PodNet {
    /// The network namespace, `/run/netns/<netns>`.
    pub netns: String,
    /// The host side of the veth pair (at most 15 bytes).
    pub veth: String,
    pub ip: Ipv4Addr,
    /// The node's address: the source of the host's packets to the pod.
    pub node_ip: Ipv4Addr,
}

/// Names from the pod's UID, so a restarted agent finds what it made.
pub fn names(uid: &str) -> (String, String) {
    let short: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    (format!("mk-{short}"), format!("mkv{short}"))
}

pub fn setup(p: &PodNet) -> Vec<Vec<String>> {
    let ns = &p.netns;
    let v = &p.veth;
    let ip = p.ip.to_string();
    let gw = GATEWAY.to_string();
    let cmds: Vec<Vec<&str>> = vec![
        vec!["ip", "netns", "add", ns],
        vec!["ip", "-n", ns, "link", "set", "lo", "up"],
        vec![
            "ip", "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
        vec!["ip", "-n", ns, "addr", "add", &ip, "dev", "eth0"],
        vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
        vec![
            "ip", "-n", ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
        ],
        vec![
            "ip", "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0",
        ],
        vec!["ip", "link", "set", v, "up"],
    ];
    let src = p.node_ip.to_string();
    let mut out: Vec<Vec<String>> = cmds
        .into_iter()
        .map(|c| c.into_iter().map(String::from).collect())
        .collect();
    out.push(
        ["ip", "route", "replace", &ip, "dev", v, "src", &src]
            .into_iter()
            .map(String::from)
            .collect(),
    );
    out
}

/// What the host must set for the veth: proxy ARP for the gateway address.
pub fn sysctls(p: &PodNet) -> Vec<(String, &'static str)> {
    vec![(format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", p.veth), "1")]
}

pub fn teardown(p: &PodNet) -> Vec<Vec<String>> {
    vec![
        vec!["ip".into(), "link".into(), "del".into(), p.veth.clone()],
        vec!["ip".into(), "netns".into(), "del".into(), p.netns.clone()],
    ]
}

/// `/etc/resolv.conf` of a pod in namespace `ns`.
pub fn resolv_conf(ns: &str, domain: &str, dns: Ipv4Addr) -> String {
    format!("search {ns}.svc.{domain} svc.{domain} {domain}\nnameserver {dns}\noptions ndots:5\n")
}

/// `/etc/hosts` of a pod, as the kubelet writes it.
pub fn hosts(ip: Ipv4Addr, hostname: &str, fqdn: Option<&str>) -> String {
    let names = match fqdn {
        Some(f) => format!("{f}\t{hostname}"),
        None => hostname.to_string(),
    };
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{names}\n")
}

/// A pod's addresses on one node: the node's CIDR minus network, the first
/// address (kept for the node) and broadcast.
#[derive(Debug)]
pub struct Ipam {
    cidr: ipnet::Ipv4Net,
    used: std::collections::BTreeSet<Ipv4Addr>,
}

impl Ipam {
    pub fn new(cidr: ipnet::Ipv4Net) -> Ipam {
        Ipam {
            cidr,
            used: Default::default(),
        }
    }

    pub fn take(&mut self) -> Option<Ipv4Addr> {
        let ip = self
            .cidr
            .hosts()
            .skip(1)
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        Some(ip)
    }

    pub fn give_back(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limits() {
        let (ns, veth) = names("6f1c2a9e-0b7d-4c3e-9a51-3f0e8d2b1c4a");
        assert_eq!(ns, "mk-6f1c2a9e0b7d");
        assert!(veth.len() <= 15, "{veth}");
    }

    #[test]
    fn the_pod_is_routed_from_the_host() {
        let p = PodNet {
            netns: "mk-1".into(),
            veth: "mkv1".into(),
            ip: Ipv4Addr::new(10, 247, 1, 2),
            node_ip: Ipv4Addr::new(10, 247, 0, 1),
        };
        let cmds: Vec<String> = setup(&p).iter().map(|c| c.join(" ")).collect();
        assert!(
            cmds.contains(&"ip -n mk-1 route add default via 169.254.1.1 dev eth0".to_string())
        );
        assert_eq!(
            cmds.last().unwrap(),
            "ip route replace 10.247.1.2 dev mkv1 src 10.247.0.1"
        );
    }

    #[test]
    fn addresses_are_handed_out_once_and_reused_after_return() {
        let mut ipam = Ipam::new("10.247.1.0/30".parse().unwrap());
        let a = ipam.take().unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 247, 1, 2));
        assert_eq!(ipam.take(), None);
        ipam.give_back(a);
        assert_eq!(ipam.take(), Some(a));
    }

    #[test]
    fn resolv_conf_searches_the_pods_namespace_first() {
        let r = resolv_conf("shop", "cluster.local", Ipv4Addr::new(10, 247, 0, 1));
        assert!(r.starts_with("search shop.svc.cluster.local svc.cluster.local cluster.local\n"));
    }
}
