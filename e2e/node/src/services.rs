//! Kubernetes Services for the test cluster, programmed in the host's network
//! namespace the way kube-proxy's `iptables` mode programs a node.
//!
//! Pods are network namespaces routed from the host, so every packet a pod sends
//! to a ClusterIP enters the host (nat `PREROUTING`, then filter `FORWARD`), and
//! so does every connection a host process opens to one, such as the
//! kube-apiserver calling a webhook (nat and filter `OUTPUT`).
//!
//! # Why the host rewrites, not each pod
//!
//! A meshed pod's sidecar capture (`mesh-proxy init`) redirects the app's
//! outbound TCP to the proxy inside the pod, and the proxy routes by the
//! connection's original destination: it must read the ClusterIP there, as it
//! does on a real node, where kube-proxy rewrites packets only after they have
//! left the pod. Rewriting inside the pod would hand the proxy an endpoint's
//! address instead. So the DNAT happens here, once, in the host's namespace.
//!
//! # Chains
//!
//! * nat `MESHK8S-SERVICES` (jumped to from `PREROUTING` and `OUTPUT`): for each
//!   TCP or UDP port of each Service with an IPv4 ClusterIP, one DNAT rule per
//!   ready endpoint, matching `-d CLUSTERIP/32 -p PROTO --dport PORT`. The i-th
//!   of n rules (counting from 0) is taken with probability `1/(n-i)` and the last
//!   always, so each endpoint gets an equal share, as kube-proxy spreads them. A
//!   port with a `nodePort` gets the same rules again for `-d NODE_IP/32 --dport
//!   NODEPORT`, once per node IP.
//! * nat `MESHK8S-POSTROUTING` (from `POSTROUTING`): hairpin. A pod reaching its
//!   own Service can be sent to itself; its reply would then stay inside the pod
//!   and never be translated back. For each endpoint address, a packet with that
//!   address as both source and destination (which only a hairpin produces) is
//!   SNATed to the first node IP, so the reply returns through the host. With no
//!   node IPs it is MASQUERADEd.
//! * filter `MESHK8S-REJECT` (from `INPUT` and `OUTPUT`, and from
//!   `MESHK8S-FORWARD`): a port whose Service has no ready endpoint. The `nat`
//!   table cannot REJECT, so these packets pass nat untouched, still addressed to
//!   the ClusterIP (or node IP), and are refused here with
//!   `--reject-with icmp-port-unreachable`, which a TCP client sees as "connection
//!   refused" at once instead of a hang. `FORWARD` catches pods, `OUTPUT` host
//!   processes, `INPUT` pods calling a node port.
//! * filter `MESHK8S-FORWARD` (from `FORWARD`): packets from pod to pod are
//!   accepted (DNATed Service traffic among them, since filter sees the rewritten
//!   destination), and so are replies to pods; then come the refusals above; then
//!   everything else from a pod and everything still addressed to the service
//!   CIDR is dropped. No pod reaches anything beyond the host through it.
//!
//! Traffic to a ClusterIP port no Service has is not DNATed either: it follows
//! the host's `SERVICE_CIDR dev <dummy>` route, which discards it.
//!
//! # Applying
//!
//! [`rules`] computes `iptables-restore --noflush` input without side effects.
//! Each chain is declared (`:CHAIN - [0:0]`) and flushed (`-F CHAIN`) before it
//! is refilled, so applying replaces the chains' contents and touches nothing
//! else. Everything is sorted (Services by namespace, name and port; endpoints by
//! address), so equal inputs give byte-equal text, whatever order the watches
//! delivered them in; [`Programmer`] uses that to restore only when something
//! changed.
//!
//! The jumps from the built-in chains cannot be written idempotently in restore
//! format. [`hooks`] adds them (and creates the chains) once, each after a check
//! (`-C` for a jump), inserting them first in their chain; [`unhooks`] deletes
//! them and the chains again. Commands run through a [`Runner`]: [`System`]
//! spawns them, tests record them.

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeSet;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// nat: the DNAT rules of every Service port with ready endpoints.
pub const SERVICES_CHAIN: &str = "MESHK8S-SERVICES";
/// nat: the hairpin SNAT rules.
pub const POSTROUTING_CHAIN: &str = "MESHK8S-POSTROUTING";
/// filter: what may be forwarded for pods.
pub const FORWARD_CHAIN: &str = "MESHK8S-FORWARD";
/// filter: the refusals for Service ports without ready endpoints.
pub const REJECT_CHAIN: &str = "MESHK8S-REJECT";

const NAT_CHAINS: [&str; 2] = [SERVICES_CHAIN, POSTROUTING_CHAIN];
const FILTER_CHAINS: [&str; 2] = [FORWARD_CHAIN, REJECT_CHAIN];

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `-w` waits for the xtables lock, which every network namespace shares, rather
/// than failing while a pod's capture is being installed.
const IPTABLES: [&str; 2] = ["iptables", "-w"];
const RESTORE: [&str; 3] = ["iptables-restore", "-w", "--noflush"];

/// Longest text the comment match takes (256 bytes with its terminating NUL).
const COMMENT_MAX: usize = 255;

/// The cluster's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The pods' addresses; the node IPs are in it too.
    pub pod_cidr: Ipv4Net,
    /// The ClusterIPs' range.
    pub service_cidr: Ipv4Net,
    /// Addresses of the host that node ports are served on, in the given order.
    /// The first one is also the source of hairpin traffic.
    pub node_ips: Vec<Ipv4Addr>,
}

/// The `iptables-restore --noflush` input that makes the chains of the module
/// documentation exactly what `services` and `slices` need.
///
/// Pure and deterministic: the order of `services` and `slices` does not matter.
pub fn rules(layout: &Layout, services: &[Service], slices: &[EndpointSlice]) -> String {
    let ports = service_ports(services, slices);
    let mut nat = Vec::new();
    let mut refusals = Vec::new();
    for port in &ports {
        for (address, number) in port.destinations(&layout.node_ips) {
            let matched = port.match_spec(address, number);
            if port.backends.is_empty() {
                refusals.push(reject_rule(port, &matched));
            } else {
                nat.extend(dnat_rules(port, &matched));
            }
        }
    }
    nat.extend(hairpin_rules(layout, &ports));
    let mut filter = forward_rules(layout);
    filter.extend(refusals);
    let mut text = table("nat", &NAT_CHAINS, &nat);
    text.push_str(&table("filter", &FILTER_CHAINS, &filter));
    text
}

// ---------------------------------------------------------------------------
// From API objects to Service ports and their backends
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// TCP when unset, as the API defaults it; `None` for SCTP and anything else.
    fn parse(protocol: Option<&str>) -> Option<Self> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Where a ready endpoint receives a Service port's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Backend {
    ip: Ipv4Addr,
    port: u16,
}

/// One port of one Service, with its ready endpoints sorted by address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Port<'a> {
    namespace: &'a str,
    name: &'a str,
    /// Empty when the port is unnamed.
    port_name: &'a str,
    protocol: Protocol,
    cluster_ip: Ipv4Addr,
    port: u16,
    node_port: Option<u16>,
    backends: Vec<Backend>,
}

impl Port<'_> {
    /// The order of the rules: namespace, name, then port.
    fn key(&self) -> (&str, &str, u16, Protocol, &str) {
        (
            self.namespace,
            self.name,
            self.port,
            self.protocol,
            self.port_name,
        )
    }

    /// `ns/name:port`, or `ns/name` for an unnamed port, as kube-proxy names it.
    fn label(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// The ClusterIP and port, then each node IP with the node port, if any.
    fn destinations(&self, node_ips: &[Ipv4Addr]) -> Vec<(Ipv4Addr, u16)> {
        let mut destinations = vec![(self.cluster_ip, self.port)];
        if let Some(node_port) = self.node_port {
            destinations.extend(node_ips.iter().map(|ip| (*ip, node_port)));
        }
        destinations
    }

    /// The match part of a rule for packets to `address:number`.
    fn match_spec(&self, address: Ipv4Addr, number: u16) -> String {
        format!(
            "-d {address}/32 -p {} --dport {number}",
            self.protocol.flag()
        )
    }
}

/// Every TCP and UDP port of `services`, with its ready endpoints, sorted.
fn service_ports<'a>(services: &'a [Service], slices: &'a [EndpointSlice]) -> Vec<Port<'a>> {
    let mut ports: Vec<Port<'a>> = services
        .iter()
        .flat_map(frontends)
        .map(|mut port| {
            port.backends = backends(&port, slices);
            port
        })
        .collect();
    ports.sort_by(|a, b| a.key().cmp(&b.key()));
    ports
}

/// The ports of a Service that has an IPv4 ClusterIP, without backends yet.
/// Headless and ExternalName Services have none.
fn frontends(service: &Service) -> Vec<Port<'_>> {
    let (Some(name), Some(spec)) = (service.metadata.name.as_deref(), service.spec.as_ref()) else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let Some(cluster_ip) = cluster_ipv4(spec) else {
        return Vec::new();
    };
    let namespace = namespace_of(&service.metadata);
    spec.ports
        .iter()
        .flatten()
        .filter_map(|port| frontend(namespace, name, cluster_ip, port))
        .collect()
}

fn frontend<'a>(
    namespace: &'a str,
    name: &'a str,
    cluster_ip: Ipv4Addr,
    port: &'a ServicePort,
) -> Option<Port<'a>> {
    Some(Port {
        namespace,
        name,
        port_name: port.name.as_deref().unwrap_or_default(),
        protocol: Protocol::parse(port.protocol.as_deref())?,
        cluster_ip,
        port: port_number(port.port)?,
        node_port: port.node_port.and_then(port_number),
        backends: Vec::new(),
    })
}

/// The first IPv4 address of `clusterIP` and `clusterIPs`; `None` (headless) and
/// an empty value parse as none.
fn cluster_ipv4(spec: &ServiceSpec) -> Option<Ipv4Addr> {
    spec.cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .find_map(|ip| ip.parse().ok())
}

/// A namespaced object's namespace, `default` when unset, for Services and
/// EndpointSlices alike.
fn namespace_of(metadata: &ObjectMeta) -> &str {
    metadata.namespace.as_deref().unwrap_or("default")
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

/// The ready endpoints of `port` in its IPv4 EndpointSlices, sorted, each once.
fn backends(port: &Port<'_>, slices: &[EndpointSlice]) -> Vec<Backend> {
    let backends: BTreeSet<Backend> = slices
        .iter()
        .filter(|slice| belongs_to(slice, port.namespace, port.name))
        .filter_map(|slice| Some((slice, slice_port(slice, port)?)))
        .flat_map(|(slice, number)| {
            slice
                .endpoints
                .iter()
                .flatten()
                .filter(|endpoint| is_ready(endpoint))
                .filter_map(endpoint_ip)
                .map(move |ip| Backend { ip, port: number })
        })
        .collect();
    backends.into_iter().collect()
}

fn belongs_to(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.address_type == "IPv4"
        && namespace_of(&slice.metadata) == namespace
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .is_some_and(|service| service == name)
}

/// The number the slice gives for `port`: the slice port of the same name (unset
/// and empty being the same) and protocol.
fn slice_port(slice: &EndpointSlice, port: &Port<'_>) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|candidate| {
            candidate.name.as_deref().unwrap_or_default() == port.port_name
                && Protocol::parse(candidate.protocol.as_deref()) == Some(port.protocol)
        })
        .and_then(|candidate| candidate.port)
        .and_then(port_number)
}

/// Not known to be unready, and not terminating.
fn is_ready(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    conditions.and_then(|c| c.ready) != Some(false)
        && conditions.and_then(|c| c.terminating) != Some(true)
}

/// The endpoint's first address, which stands for all of them.
fn endpoint_ip(endpoint: &Endpoint) -> Option<Ipv4Addr> {
    endpoint.addresses.first()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

fn rule(chain: &str, spec: &str) -> String {
    format!("-A {chain} {spec}")
}

/// The DNAT rules spreading `matched` over the port's backends.
fn dnat_rules(port: &Port<'_>, matched: &str) -> Vec<String> {
    let comment = quote(&port.label());
    let count = port.backends.len();
    port.backends
        .iter()
        .enumerate()
        .map(|(index, backend)| {
            let statistic = match count - index {
                1 => String::new(),
                left => format!(
                    " -m statistic --mode random --probability {}",
                    probability(left)
                ),
            };
            let spec = format!(
                "{matched} -m comment --comment {comment}{statistic} -j DNAT --to-destination {}:{}",
                backend.ip, backend.port
            );
            rule(SERVICES_CHAIN, &spec)
        })
        .collect()
}

/// The chance of taking one of the `left` remaining backends: `1/left`, written
/// with 10 decimals as kube-proxy writes it.
fn probability(left: usize) -> String {
    format!("{:.10}", 1.0 / left as f64)
}

fn reject_rule(port: &Port<'_>, matched: &str) -> String {
    let comment = quote(&format!("{} has no endpoints", port.label()));
    rule(
        REJECT_CHAIN,
        &format!(
            "{matched} -m comment --comment {comment} -j REJECT --reject-with icmp-port-unreachable"
        ),
    )
}

/// SNAT for packets from an endpoint to itself, which only a hairpin produces.
fn hairpin_rules(layout: &Layout, ports: &[Port<'_>]) -> Vec<String> {
    let target = match layout.node_ips.first() {
        Some(ip) => format!("-j SNAT --to-source {ip}"),
        None => "-j MASQUERADE".to_owned(),
    };
    let addresses: BTreeSet<Ipv4Addr> = ports
        .iter()
        .flat_map(|port| port.backends.iter().map(|backend| backend.ip))
        .collect();
    addresses
        .iter()
        .map(|ip| {
            rule(
                POSTROUTING_CHAIN,
                &format!("-s {ip}/32 -d {ip}/32 {target}"),
            )
        })
        .collect()
}

/// `MESHK8S-FORWARD`, refusals included through `MESHK8S-REJECT`.
fn forward_rules(layout: &Layout) -> Vec<String> {
    let pods = layout.pod_cidr.trunc();
    let services = layout.service_cidr.trunc();
    [
        format!("-s {pods} -d {pods} -j ACCEPT"),
        format!("-d {pods} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        format!("-j {REJECT_CHAIN}"),
        format!("-s {pods} -j DROP"),
        format!("-d {services} -j DROP"),
    ]
    .iter()
    .map(|spec| rule(FORWARD_CHAIN, spec))
    .collect()
}

/// One `*table ... COMMIT` block that declares, flushes and refills `chains`.
fn table(name: &str, chains: &[&str], rules: &[String]) -> String {
    let mut lines = vec![format!("*{name}")];
    lines.extend(chains.iter().map(|chain| format!(":{chain} - [0:0]")));
    lines.extend(chains.iter().map(|chain| format!("-F {chain}")));
    lines.extend(rules.iter().cloned());
    lines.push("COMMIT".to_owned());
    lines.join("\n") + "\n"
}

/// `text` as one double-quoted `iptables-restore` word: characters other than
/// letters, digits, space and `-._:/` become `_`, so no quote, backslash or line
/// break can end the word or the line, and it is cut to what the comment match
/// takes.
fn quote(text: &str) -> String {
    let safe: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " -._:/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(COMMENT_MAX)
        .collect();
    format!("\"{safe}\"")
}

// ---------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------

/// A jump from a built-in chain into one of ours.
struct Jump {
    table: &'static str,
    chain: &'static str,
    target: &'static str,
}

const JUMPS: [Jump; 6] = [
    Jump {
        table: "nat",
        chain: "PREROUTING",
        target: SERVICES_CHAIN,
    },
    Jump {
        table: "nat",
        chain: "OUTPUT",
        target: SERVICES_CHAIN,
    },
    Jump {
        table: "nat",
        chain: "POSTROUTING",
        target: POSTROUTING_CHAIN,
    },
    Jump {
        table: "filter",
        chain: "FORWARD",
        target: FORWARD_CHAIN,
    },
    Jump {
        table: "filter",
        chain: "OUTPUT",
        target: REJECT_CHAIN,
    },
    Jump {
        table: "filter",
        chain: "INPUT",
        target: REJECT_CHAIN,
    },
];

/// Our chains with their tables, in declaration order.
fn chains() -> impl Iterator<Item = (&'static str, &'static str)> {
    let nat = NAT_CHAINS.into_iter().map(|chain| ("nat", chain));
    let filter = FILTER_CHAINS.into_iter().map(|chain| ("filter", chain));
    nat.chain(filter)
}

/// `iptables -w -t TABLE ARGS...`.
fn iptables(table: &str, args: &[&str]) -> Vec<String> {
    IPTABLES
        .iter()
        .chain(&["-t", table])
        .chain(args)
        .map(|arg| (*arg).to_owned())
        .collect()
}

impl Jump {
    fn command(&self, operation: &str) -> Vec<String> {
        iptables(self.table, &[operation, self.chain, "-j", self.target])
    }
}

/// (check, install) pairs: the install is needed only when its check fails.
/// Chains come first, so the jumps to them can be added before the first
/// restore.
fn hook_pairs() -> Vec<(Vec<String>, Vec<String>)> {
    let chains = chains().map(|(table, chain)| {
        (
            iptables(table, &["-S", chain]),
            iptables(table, &["-N", chain]),
        )
    });
    let jumps = JUMPS
        .iter()
        .map(|jump| (jump.command("-C"), jump.command("-I")));
    chains.chain(jumps).collect()
}

/// `sh -c 'CHECK >/dev/null 2>&1 || INSTALL'`. Every word is one of this
/// module's constants, none needs quoting.
fn check_then(check: &[String], install: &[String]) -> Vec<String> {
    let script = format!(
        "{} >/dev/null 2>&1 || {}",
        check.join(" "),
        install.join(" ")
    );
    vec!["sh".to_owned(), "-c".to_owned(), script]
}

/// The one-time setup, as commands to run in order, each of which succeeds
/// whether or not an earlier run already did its work: each creates one of our
/// chains unless `-S CHAIN` finds it, or puts one jump first in its built-in
/// chain (`-I`) unless `-C` finds it there.
pub fn hooks() -> Vec<Vec<String>> {
    hook_pairs()
        .iter()
        .map(|(check, install)| check_then(check, install))
        .collect()
}

/// What undoes [`hooks`] at shutdown: `-D` for each jump, then `-F` and `-X` for
/// each chain. A command whose jump or chain is already gone fails (exit code
/// 1); the rest still do their part, so all are run and such failures ignored.
pub fn unhooks() -> Vec<Vec<String>> {
    let deletes = JUMPS.iter().rev().map(|jump| jump.command("-D"));
    let flushes = chains().map(|(table, chain)| iptables(table, &["-F", chain]));
    let removals = chains().map(|(table, chain)| iptables(table, &["-X", chain]));
    deletes.chain(flushes).chain(removals).collect()
}

// ---------------------------------------------------------------------------
// Applying
// ---------------------------------------------------------------------------

/// The restore command, `iptables-restore -w --noflush`, fed [`rules`].
fn restore_command() -> Vec<String> {
    RESTORE.iter().map(|arg| (*arg).to_owned()).collect()
}

/// Applies [`rules`], skipping the restore when the text is the one applied
/// last.
#[derive(Debug, Default)]
pub struct Programmer {
    /// The text of the last successful restore.
    last: Option<String>,
}

impl Programmer {
    /// Restores the rules for `services` and `slices` unless they are what was
    /// applied last; returns whether it restored. After a failure the next sync
    /// restores whatever it computes.
    pub fn sync(
        &mut self,
        runner: &mut impl Runner,
        layout: &Layout,
        services: &[Service],
        slices: &[EndpointSlice],
    ) -> Result<bool, RunError> {
        let text = rules(layout, services, slices);
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        self.last = None;
        runner.run(&restore_command(), Some(&text))?;
        tracing::debug!(
            lines = text.lines().count(),
            "programmed the Services' iptables rules"
        );
        self.last = Some(text);
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Why a command failed. Each message names the command.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command line was empty.
    #[error("no command to run")]
    Empty,

    /// It could not be started, fed or waited for.
    #[error("could not run `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },

    /// It ran and did not succeed.
    #[error("`{command}` failed ({}): {stderr}", status(*.code))]
    Failed {
        command: String,
        /// Exit code; `None` if killed by a signal.
        code: Option<i32>,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

fn status(code: Option<i32>) -> String {
    code.map_or_else(
        || "killed by a signal".to_owned(),
        |code| format!("exit code {code}"),
    )
}

/// Runs commands. [`System`] spawns them; tests record them.
pub trait Runner {
    /// Runs `argv`, feeding it `stdin` if given; succeeds if it exits with 0.
    fn run(&mut self, argv: &[String], stdin: Option<&str>) -> Result<(), RunError>;
}

/// Spawns each command, with standard input piped when there is some, standard
/// output discarded and standard error kept for the error.
#[derive(Debug, Default, Clone, Copy)]
pub struct System;

impl Runner for System {
    fn run(&mut self, argv: &[String], stdin: Option<&str>) -> Result<(), RunError> {
        let (program, args) = argv.split_first().ok_or(RunError::Empty)?;
        let command = argv.join(" ");
        let io_error = |source| RunError::Io {
            command: command.clone(),
            source,
        };
        let child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error)?;
        let output = wait_feeding_stdin(child, stdin).map_err(io_error)?;
        if output.status.success() {
            return Ok(());
        }
        Err(RunError::Failed {
            command,
            code: output.status.code(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Waits for `child`, writing `stdin` from a second thread so that a child that
/// writes much before reading all its input cannot deadlock against us.
fn wait_feeding_stdin(
    mut child: std::process::Child,
    stdin: Option<&str>,
) -> io::Result<std::process::Output> {
    let pipe = child.stdin.take();
    std::thread::scope(|scope| {
        let writer = pipe
            .zip(stdin)
            .map(|(mut pipe, text)| scope.spawn(move || pipe.write_all(text.as_bytes())));
        let output = child.wait_with_output()?;
        if let Some(writer) = writer {
            let written = writer
                .join()
                .map_err(|_| io::Error::other("the stdin writer thread panicked"))?;
            // A child that exits early closes the pipe; its exit status says why.
            match written {
                Err(error) if error.kind() != io::ErrorKind::BrokenPipe => return Err(error),
                _ => {}
            }
        }
        Ok(output)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn layout() -> Layout {
        Layout {
            pod_cidr: "10.247.0.0/16".parse().expect("a CIDR"),
            service_cidr: "10.248.0.0/16".parse().expect("a CIDR"),
            node_ips: vec![Ipv4Addr::new(10, 247, 0, 1), Ipv4Addr::new(10, 247, 0, 2)],
        }
    }

    fn service(namespace: &str, name: &str, spec: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": { "namespace": namespace, "name": name },
            "spec": spec,
        }))
        .expect("a valid Service")
    }

    /// A ClusterIP Service with `ports`.
    fn cluster_ip(namespace: &str, name: &str, ip: &str, ports: Value) -> Service {
        service(namespace, name, json!({ "clusterIP": ip, "ports": ports }))
    }

    fn slice(namespace: &str, service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
        slice_of_type(namespace, service, "IPv4", ports, endpoints)
    }

    fn slice_of_type(
        namespace: &str,
        service: &str,
        address_type: &str,
        ports: Value,
        endpoints: Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {
                "namespace": namespace,
                "name": format!("{service}-abcde"),
                "labels": { SERVICE_NAME_LABEL: service },
            },
            "addressType": address_type,
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("a valid EndpointSlice")
    }

    fn ready(ip: &str) -> Value {
        json!({ "addresses": [ip], "conditions": { "ready": true } })
    }

    /// The `-A <chain> ...` lines of restore text.
    fn chain_lines<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        text.lines()
            .filter(|line| line.starts_with(&prefix))
            .collect()
    }

    fn web() -> (Service, EndpointSlice) {
        (
            cluster_ip("shop", "web", "10.248.0.10", json!([{ "port": 80 }])),
            slice(
                "shop",
                "web",
                json!([{ "port": 8080, "protocol": "TCP" }]),
                json!([ready("10.247.1.3"), ready("10.247.1.2")]),
            ),
        )
    }

    #[test]
    fn whole_text_for_one_service_with_endpoints_and_one_without() {
        let (web, web_slice) = web();
        let idle = cluster_ip(
            "shop",
            "idle",
            "10.248.0.11",
            json!([{ "name": "dns", "port": 53, "protocol": "UDP" }]),
        );
        let text = rules(&layout(), &[web, idle], &[web_slice]);
        let expected = [
            "*nat",
            ":MESHK8S-SERVICES - [0:0]",
            ":MESHK8S-POSTROUTING - [0:0]",
            "-F MESHK8S-SERVICES",
            "-F MESHK8S-POSTROUTING",
            "-A MESHK8S-SERVICES -d 10.248.0.10/32 -p tcp --dport 80 -m comment --comment \"shop/web\" \
             -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.247.1.2:8080",
            "-A MESHK8S-SERVICES -d 10.248.0.10/32 -p tcp --dport 80 -m comment --comment \"shop/web\" \
             -j DNAT --to-destination 10.247.1.3:8080",
            "-A MESHK8S-POSTROUTING -s 10.247.1.2/32 -d 10.247.1.2/32 -j SNAT --to-source 10.247.0.1",
            "-A MESHK8S-POSTROUTING -s 10.247.1.3/32 -d 10.247.1.3/32 -j SNAT --to-source 10.247.0.1",
            "COMMIT",
            "*filter",
            ":MESHK8S-FORWARD - [0:0]",
            ":MESHK8S-REJECT - [0:0]",
            "-F MESHK8S-FORWARD",
            "-F MESHK8S-REJECT",
            "-A MESHK8S-FORWARD -s 10.247.0.0/16 -d 10.247.0.0/16 -j ACCEPT",
            "-A MESHK8S-FORWARD -d 10.247.0.0/16 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A MESHK8S-FORWARD -j MESHK8S-REJECT",
            "-A MESHK8S-FORWARD -s 10.247.0.0/16 -j DROP",
            "-A MESHK8S-FORWARD -d 10.248.0.0/16 -j DROP",
            "-A MESHK8S-REJECT -d 10.248.0.11/32 -p udp --dport 53 -m comment \
             --comment \"shop/idle:dns has no endpoints\" -j REJECT --reject-with icmp-port-unreachable",
            "COMMIT",
        ];
        assert_eq!(text, expected.join("\n") + "\n");
    }

    #[test]
    fn two_endpoints_get_one_half_then_the_rest() {
        let (web, web_slice) = web();
        let text = rules(&layout(), &[web], &[web_slice]);
        let dnat = chain_lines(&text, SERVICES_CHAIN);
        assert_eq!(dnat.len(), 2);
        assert!(dnat[0].contains(" -m statistic --mode random --probability 0.5000000000 "));
        assert!(!dnat[1].contains("statistic"));
        assert!(chain_lines(&text, REJECT_CHAIN).is_empty());
    }

    #[test]
    fn three_endpoints_get_a_third_then_a_half_then_the_rest() {
        let service = cluster_ip("a", "b", "10.248.0.5", json!([{ "port": 80 }]));
        let endpoints = json!([
            ready("10.247.1.1"),
            ready("10.247.1.2"),
            ready("10.247.1.3")
        ]);
        let slices = [slice("a", "b", json!([{ "port": 80 }]), endpoints)];
        let text = rules(&layout(), &[service], &slices);
        let probabilities: Vec<Option<&str>> = chain_lines(&text, SERVICES_CHAIN)
            .iter()
            .map(|line| {
                line.split_once("--probability ")
                    .and_then(|(_, rest)| rest.split(' ').next())
            })
            .collect();
        assert_eq!(
            probabilities,
            [Some("0.3333333333"), Some("0.5000000000"), None]
        );
    }

    #[test]
    fn unready_and_terminating_endpoints_are_left_out() {
        let service = cluster_ip("a", "b", "10.248.0.5", json!([{ "port": 80 }]));
        let endpoints = json!([
            { "addresses": ["10.247.1.1"], "conditions": { "ready": false } },
            { "addresses": ["10.247.1.2"], "conditions": { "ready": true, "terminating": true } },
            { "addresses": ["10.247.1.3"] },
            ready("10.247.1.4"),
        ]);
        let slices = [slice("a", "b", json!([{ "port": 8080 }]), endpoints)];
        let text = rules(&layout(), &[service], &slices);
        let dnat = chain_lines(&text, SERVICES_CHAIN);
        assert_eq!(dnat.len(), 2, "{text}");
        assert!(dnat[0].ends_with("--to-destination 10.247.1.3:8080"));
        assert!(dnat[1].ends_with("--to-destination 10.247.1.4:8080"));
        assert!(!text.contains("10.247.1.1"));
        assert!(!text.contains("10.247.1.2"));
    }

    #[test]
    fn only_unready_endpoints_means_refused() {
        let service = cluster_ip("a", "b", "10.248.0.5", json!([{ "port": 80 }]));
        let endpoints = json!([{ "addresses": ["10.247.1.1"], "conditions": { "ready": false } }]);
        let slices = [slice("a", "b", json!([{ "port": 8080 }]), endpoints)];
        let text = rules(&layout(), &[service], &slices);
        assert!(chain_lines(&text, SERVICES_CHAIN).is_empty());
        assert!(chain_lines(&text, POSTROUTING_CHAIN).is_empty());
        assert_eq!(
            chain_lines(&text, REJECT_CHAIN),
            [
                "-A MESHK8S-REJECT -d 10.248.0.5/32 -p tcp --dport 80 -m comment \
              --comment \"a/b has no endpoints\" -j REJECT --reject-with icmp-port-unreachable"
            ]
        );
        // The nat table never REJECTs.
        let nat = text.split("*filter").next().unwrap_or_default();
        assert!(!nat.contains("REJECT"));
    }

    #[test]
    fn named_ports_are_matched_by_name() {
        let service = cluster_ip(
            "a",
            "b",
            "10.248.0.5",
            json!([{ "name": "http", "port": 80 }, { "name": "metrics", "port": 9090 }]),
        );
        let slices = [slice(
            "a",
            "b",
            json!([{ "name": "metrics", "port": 9091 }, { "name": "http", "port": 8080 }]),
            json!([ready("10.247.1.1")]),
        )];
        let text = rules(&layout(), &[service], &slices);
        assert_eq!(
            chain_lines(&text, SERVICES_CHAIN),
            [
                "-A MESHK8S-SERVICES -d 10.248.0.5/32 -p tcp --dport 80 -m comment \
                 --comment \"a/b:http\" -j DNAT --to-destination 10.247.1.1:8080",
                "-A MESHK8S-SERVICES -d 10.248.0.5/32 -p tcp --dport 9090 -m comment \
                 --comment \"a/b:metrics\" -j DNAT --to-destination 10.247.1.1:9091",
            ]
        );
    }

    #[test]
    fn unset_and_empty_port_names_are_the_same() {
        let service = cluster_ip("a", "b", "10.248.0.5", json!([{ "name": "", "port": 80 }]));
        let slices = [slice(
            "a",
            "b",
            json!([{ "port": 8080 }]),
            json!([ready("10.247.1.1")]),
        )];
        let text = rules(&layout(), &[service], &slices);
        assert_eq!(chain_lines(&text, SERVICES_CHAIN).len(), 1, "{text}");
    }

    #[test]
    fn a_port_the_slice_lacks_is_refused() {
        let service = cluster_ip(
            "a",
            "b",
            "10.248.0.5",
            json!([{ "name": "http", "port": 80 }]),
        );
        let slices = [slice(
            "a",
            "b",
            json!([{ "name": "grpc", "port": 8080 }]),
            json!([ready("10.247.1.1")]),
        )];
        let text = rules(&layout(), &[service], &slices);
        assert!(chain_lines(&text, SERVICES_CHAIN).is_empty());
        assert_eq!(chain_lines(&text, REJECT_CHAIN).len(), 1);
    }

    #[test]
    fn headless_external_name_and_ipv6_services_are_ignored() {
        let services = [
            cluster_ip("a", "headless", "None", json!([{ "port": 80 }])),
            cluster_ip("a", "empty", "", json!([{ "port": 80 }])),
            service("a", "unset", json!({ "ports": [{ "port": 80 }] })),
            service(
                "a",
                "external",
                json!({ "type": "ExternalName", "externalName": "example.com" }),
            ),
            cluster_ip("a", "six", "fd00::10", json!([{ "port": 80 }])),
        ];
        let slices = [slice(
            "a",
            "headless",
            json!([{ "port": 80 }]),
            json!([ready("10.247.1.1")]),
        )];
        let text = rules(&layout(), &services, &slices);
        assert_eq!(text, rules(&layout(), &[], &[]));
        assert!(chain_lines(&text, SERVICES_CHAIN).is_empty());
        assert!(chain_lines(&text, REJECT_CHAIN).is_empty());
    }

    #[test]
    fn dual_stack_service_uses_its_ipv4_cluster_ip() {
        let service = service(
            "a",
            "b",
            json!({
                "clusterIP": "fd00::10",
                "clusterIPs": ["fd00::10", "10.248.0.5"],
                "ports": [{ "port": 80 }],
            }),
        );
        let text = rules(&layout(), &[service], &[]);
        assert!(chain_lines(&text, REJECT_CHAIN)[0].contains("-d 10.248.0.5/32 "));
    }

    #[test]
    fn node_ports_get_rules_per_node_ip() {
        let service = service(
            "a",
            "b",
            json!({
                "type": "NodePort",
                "clusterIP": "10.248.0.5",
                "ports": [{ "port": 80, "nodePort": 30080 }],
            }),
        );
        let slices = [slice(
            "a",
            "b",
            json!([{ "port": 8080 }]),
            json!([ready("10.247.1.1")]),
        )];
        let text = rules(&layout(), std::slice::from_ref(&service), &slices);
        assert_eq!(
            chain_lines(&text, SERVICES_CHAIN),
            [
                "-A MESHK8S-SERVICES -d 10.248.0.5/32 -p tcp --dport 80 -m comment \
                 --comment \"a/b\" -j DNAT --to-destination 10.247.1.1:8080",
                "-A MESHK8S-SERVICES -d 10.247.0.1/32 -p tcp --dport 30080 -m comment \
                 --comment \"a/b\" -j DNAT --to-destination 10.247.1.1:8080",
                "-A MESHK8S-SERVICES -d 10.247.0.2/32 -p tcp --dport 30080 -m comment \
                 --comment \"a/b\" -j DNAT --to-destination 10.247.1.1:8080",
            ]
        );
        // Without endpoints, the node ports are refused too.
        let text = rules(&layout(), &[service], &[]);
        let refused = chain_lines(&text, REJECT_CHAIN);
        assert_eq!(refused.len(), 3);
        assert!(refused[1].starts_with("-A MESHK8S-REJECT -d 10.247.0.1/32 -p tcp --dport 30080 "));
        assert!(refused[2].starts_with("-A MESHK8S-REJECT -d 10.247.0.2/32 -p tcp --dport 30080 "));
    }

    #[test]
    fn udp_is_programmed_and_sctp_skipped() {
        let service = cluster_ip(
            "kube-system",
            "dns",
            "10.248.0.53",
            json!([
                { "name": "dns", "port": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
                { "name": "sig", "port": 99, "protocol": "SCTP" },
            ]),
        );
        let slices = [slice(
            "kube-system",
            "dns",
            json!([
                { "name": "dns", "port": 5353, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 5354, "protocol": "TCP" },
                { "name": "sig", "port": 99, "protocol": "SCTP" },
            ]),
            json!([ready("10.247.1.1")]),
        )];
        let text = rules(&layout(), &[service], &slices);
        assert_eq!(
            chain_lines(&text, SERVICES_CHAIN),
            [
                "-A MESHK8S-SERVICES -d 10.248.0.53/32 -p tcp --dport 53 -m comment \
                 --comment \"kube-system/dns:dns-tcp\" -j DNAT --to-destination 10.247.1.1:5354",
                "-A MESHK8S-SERVICES -d 10.248.0.53/32 -p udp --dport 53 -m comment \
                 --comment \"kube-system/dns:dns\" -j DNAT --to-destination 10.247.1.1:5353",
            ]
        );
        assert!(!text.contains("sctp") && !text.contains(":sig"));
    }

    #[test]
    fn only_matching_ipv4_slices_of_the_same_namespace_count() {
        let service = cluster_ip("a", "b", "10.248.0.5", json!([{ "port": 80 }]));
        let ports = || json!([{ "port": 8080 }]);
        let slices = [
            slice("other", "b", ports(), json!([ready("10.247.9.1")])),
            slice("a", "c", ports(), json!([ready("10.247.9.2")])),
            slice_of_type("a", "b", "IPv6", ports(), json!([ready("fd00::1")])),
            slice(
                "a",
                "b",
                ports(),
                json!([ready("not-an-ip"), ready("10.247.1.1")]),
            ),
        ];
        let text = rules(&layout(), &[service], &slices);
        assert_eq!(
            chain_lines(&text, SERVICES_CHAIN),
            [
                "-A MESHK8S-SERVICES -d 10.248.0.5/32 -p tcp --dport 80 -m comment \
              --comment \"a/b\" -j DNAT --to-destination 10.247.1.1:8080"
            ]
        );
    }

    #[test]
    fn endpoints_spread_over_slices_are_merged_once_each() {
        let service = cluster_ip("a", "b", "10.248.0.5", json!([{ "port": 80 }]));
        let ports = || json!([{ "port": 8080 }]);
        let slices = [
            slice("a", "b", ports(), json!([ready("10.247.1.2")])),
            slice(
                "a",
                "b",
                ports(),
                json!([ready("10.247.1.1"), ready("10.247.1.2")]),
            ),
        ];
        let text = rules(&layout(), &[service], &slices);
        let dnat = chain_lines(&text, SERVICES_CHAIN);
        assert_eq!(dnat.len(), 2);
        assert!(dnat[0].ends_with("10.247.1.1:8080"));
        assert!(dnat[1].ends_with("10.247.1.2:8080"));
    }

    #[test]
    fn input_order_does_not_change_the_text() {
        let services = [
            cluster_ip(
                "b",
                "z",
                "10.248.0.1",
                json!([{ "name": "y", "port": 90 }, { "name": "x", "port": 80 }]),
            ),
            cluster_ip("a", "z", "10.248.0.2", json!([{ "port": 80 }])),
            cluster_ip("a", "y", "10.248.0.3", json!([{ "port": 80 }])),
        ];
        let slices = [
            slice(
                "a",
                "y",
                json!([{ "port": 1 }]),
                json!([ready("10.247.1.9"), ready("10.247.1.1")]),
            ),
            slice(
                "b",
                "z",
                json!([{ "name": "x", "port": 2 }, { "name": "y", "port": 3 }]),
                json!([ready("10.247.1.5")]),
            ),
        ];
        let text = rules(&layout(), &services, &slices);
        let mut reversed_services = services.to_vec();
        reversed_services.reverse();
        let mut reversed_slices = slices.to_vec();
        reversed_slices.reverse();
        assert_eq!(rules(&layout(), &reversed_services, &reversed_slices), text);
        let order: Vec<&str> = chain_lines(&text, SERVICES_CHAIN)
            .iter()
            .chain(&chain_lines(&text, REJECT_CHAIN))
            .filter_map(|line| line.split('"').nth(1))
            .collect();
        assert_eq!(
            order,
            ["a/y", "a/y", "b/z:x", "b/z:y", "a/z has no endpoints"]
        );
    }

    #[test]
    fn comments_are_quoted_and_cleaned() {
        assert_eq!(quote("ns/name:http"), "\"ns/name:http\"");
        assert_eq!(quote("a\"b\\c\nd e"), "\"a_b_c_d e\"");
        assert_eq!(quote(&"x".repeat(400)).len(), COMMENT_MAX + 2);
        let service = cluster_ip("a", "b\" -j ACCEPT", "10.248.0.5", json!([{ "port": 80 }]));
        let text = rules(&layout(), &[service], &[]);
        let refused = chain_lines(&text, REJECT_CHAIN);
        assert!(refused[0].contains("--comment \"a/b_ -j ACCEPT has no endpoints\" -j REJECT"));
    }

    #[test]
    fn hairpin_falls_back_to_masquerade_without_node_ips() {
        let (web, web_slice) = web();
        let layout = Layout {
            node_ips: Vec::new(),
            ..layout()
        };
        let text = rules(&layout, &[web], &[web_slice]);
        assert_eq!(
            chain_lines(&text, POSTROUTING_CHAIN),
            [
                "-A MESHK8S-POSTROUTING -s 10.247.1.2/32 -d 10.247.1.2/32 -j MASQUERADE",
                "-A MESHK8S-POSTROUTING -s 10.247.1.3/32 -d 10.247.1.3/32 -j MASQUERADE",
            ]
        );
    }

    #[test]
    fn cidrs_are_written_as_networks() {
        let layout = Layout {
            pod_cidr: "10.247.3.4/16".parse().expect("a CIDR"),
            ..layout()
        };
        let text = rules(&layout, &[], &[]);
        assert!(text.contains("-A MESHK8S-FORWARD -s 10.247.0.0/16 -d 10.247.0.0/16 -j ACCEPT\n"));
    }

    /// Records every command; fails each with the exit code `fail` gives it.
    struct Recorder {
        calls: Vec<(Vec<String>, Option<String>)>,
        fail: fn(&[String]) -> Option<i32>,
    }

    impl Recorder {
        fn new(fail: fn(&[String]) -> Option<i32>) -> Self {
            Self {
                calls: Vec::new(),
                fail,
            }
        }
    }

    impl Runner for Recorder {
        fn run(&mut self, argv: &[String], stdin: Option<&str>) -> Result<(), RunError> {
            self.calls.push((argv.to_vec(), stdin.map(str::to_owned)));
            match (self.fail)(argv) {
                None => Ok(()),
                code => Err(RunError::Failed {
                    command: argv.join(" "),
                    code,
                    stderr: "iptables-restore: line 7 failed".to_owned(),
                }),
            }
        }
    }

    #[test]
    fn programmer_applies_once_for_equal_input_and_again_after_a_change() {
        let (web, web_slice) = web();
        let mut runner = Recorder::new(|_| None);
        let mut programmer = Programmer::default();
        let services = [web];
        let slices = [web_slice];
        let sync =
            |programmer: &mut Programmer, runner: &mut Recorder, slices: &[EndpointSlice]| {
                programmer
                    .sync(runner, &layout(), &services, slices)
                    .expect("the recorder succeeds")
            };
        assert!(sync(&mut programmer, &mut runner, &slices));
        assert!(!sync(&mut programmer, &mut runner, &slices));
        assert_eq!(runner.calls.len(), 1);
        let (argv, stdin) = &runner.calls[0];
        assert_eq!(argv, &["iptables-restore", "-w", "--noflush"]);
        assert_eq!(
            stdin.as_deref(),
            Some(rules(&layout(), &services, &slices).as_str())
        );

        // The endpoints go away: the port is refused instead.
        assert!(sync(&mut programmer, &mut runner, &[]));
        assert!(!sync(&mut programmer, &mut runner, &[]));
        assert_eq!(runner.calls.len(), 2);
        let text = runner.calls[1].1.as_deref();
        assert!(text.is_some_and(|text| text.contains("-j REJECT")));
        assert_eq!(programmer.last.as_deref(), text);
    }

    #[test]
    fn programmer_retries_after_a_failed_restore() {
        let mut failing = Recorder::new(|_| Some(1));
        let mut programmer = Programmer::default();
        let error = programmer
            .sync(&mut failing, &layout(), &[], &[])
            .expect_err("the restore fails");
        assert_eq!(
            error.to_string(),
            "`iptables-restore -w --noflush` failed (exit code 1): iptables-restore: line 7 failed"
        );
        assert_eq!(programmer.last, None);
        let mut runner = Recorder::new(|_| None);
        assert!(
            programmer
                .sync(&mut runner, &layout(), &[], &[])
                .expect("applies")
        );
        assert_eq!(runner.calls.len(), 1);
    }

    fn joined(commands: &[Vec<String>]) -> Vec<String> {
        commands.iter().map(|argv| argv.join(" ")).collect()
    }

    #[test]
    fn hooks_check_before_creating_each_chain_and_inserting_each_jump() {
        let expected = [
            "-t nat -S MESHK8S-SERVICES >/dev/null 2>&1 || iptables -w -t nat -N MESHK8S-SERVICES",
            "-t nat -S MESHK8S-POSTROUTING >/dev/null 2>&1 || iptables -w -t nat -N MESHK8S-POSTROUTING",
            "-t filter -S MESHK8S-FORWARD >/dev/null 2>&1 || iptables -w -t filter -N MESHK8S-FORWARD",
            "-t filter -S MESHK8S-REJECT >/dev/null 2>&1 || iptables -w -t filter -N MESHK8S-REJECT",
            "-t nat -C PREROUTING -j MESHK8S-SERVICES >/dev/null 2>&1 \
             || iptables -w -t nat -I PREROUTING -j MESHK8S-SERVICES",
            "-t nat -C OUTPUT -j MESHK8S-SERVICES >/dev/null 2>&1 \
             || iptables -w -t nat -I OUTPUT -j MESHK8S-SERVICES",
            "-t nat -C POSTROUTING -j MESHK8S-POSTROUTING >/dev/null 2>&1 \
             || iptables -w -t nat -I POSTROUTING -j MESHK8S-POSTROUTING",
            "-t filter -C FORWARD -j MESHK8S-FORWARD >/dev/null 2>&1 \
             || iptables -w -t filter -I FORWARD -j MESHK8S-FORWARD",
            "-t filter -C OUTPUT -j MESHK8S-REJECT >/dev/null 2>&1 \
             || iptables -w -t filter -I OUTPUT -j MESHK8S-REJECT",
            "-t filter -C INPUT -j MESHK8S-REJECT >/dev/null 2>&1 \
             || iptables -w -t filter -I INPUT -j MESHK8S-REJECT",
        ]
        .map(|script| format!("sh -c iptables -w {script}"));
        assert_eq!(joined(&hooks()), expected);
        assert!(hooks().iter().all(|argv| argv.len() == 3));
    }

    #[test]
    fn unhooks_delete_the_jumps_then_the_chains() {
        let expected = [
            "-t filter -D INPUT -j MESHK8S-REJECT",
            "-t filter -D OUTPUT -j MESHK8S-REJECT",
            "-t filter -D FORWARD -j MESHK8S-FORWARD",
            "-t nat -D POSTROUTING -j MESHK8S-POSTROUTING",
            "-t nat -D OUTPUT -j MESHK8S-SERVICES",
            "-t nat -D PREROUTING -j MESHK8S-SERVICES",
            "-t nat -F MESHK8S-SERVICES",
            "-t nat -F MESHK8S-POSTROUTING",
            "-t filter -F MESHK8S-FORWARD",
            "-t filter -F MESHK8S-REJECT",
            "-t nat -X MESHK8S-SERVICES",
            "-t nat -X MESHK8S-POSTROUTING",
            "-t filter -X MESHK8S-FORWARD",
            "-t filter -X MESHK8S-REJECT",
        ]
        .map(|args| format!("iptables -w {args}"));
        assert_eq!(joined(&unhooks()), expected);
    }

    /// A scratch directory holding a stand-in `iptables` that logs its arguments
    /// and answers every check (`-C`, `-S`) with `check_code`.
    struct FakeIptables {
        dir: std::path::PathBuf,
    }

    impl FakeIptables {
        fn new(tag: &str, check_code: i32) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("mesh-node-services-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            let script = format!(
                "#!/bin/sh\necho \"$*\" >> '{log}'\n\
                 case \" $* \" in *' -C '*|*' -S '*) exit {check_code};; esac\nexit 0\n",
                log = dir.join("log").display()
            );
            let fake = dir.join("iptables");
            std::fs::write(&fake, script).expect("the fake is written");
            Self { dir }
        }

        /// `hooks()` with `iptables` replaced by the fake.
        fn hooks(&self) -> Vec<Vec<String>> {
            let fake = format!("sh {}", self.dir.join("iptables").display());
            hooks()
                .into_iter()
                .map(|mut argv| {
                    if let Some(script) = argv.last_mut() {
                        *script = script.replace("iptables", &fake);
                    }
                    argv
                })
                .collect()
        }

        fn log(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("log"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    impl Drop for FakeIptables {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn hooks_install_what_is_missing_and_nothing_twice() {
        let fresh = FakeIptables::new("fresh", 1);
        for command in fresh.hooks() {
            System.run(&command, None).expect("installs");
        }
        let log = fresh.log();
        assert_eq!(log.len(), 20, "{log:?}");
        assert_eq!(log[0], "-w -t nat -S MESHK8S-SERVICES");
        assert_eq!(log[1], "-w -t nat -N MESHK8S-SERVICES");
        assert_eq!(log[8], "-w -t nat -C PREROUTING -j MESHK8S-SERVICES");
        assert_eq!(log[9], "-w -t nat -I PREROUTING -j MESHK8S-SERVICES");

        let hooked = FakeIptables::new("hooked", 0);
        for command in hooked.hooks() {
            System.run(&command, None).expect("nothing to do");
        }
        let log = hooked.log();
        assert_eq!(log.len(), 10, "{log:?}");
        assert!(
            log.iter()
                .all(|line| line.contains(" -C ") || line.contains(" -S "))
        );
    }

    #[test]
    fn system_feeds_stdin_and_reports_failures() {
        let argv = |args: &[&str]| args.iter().map(|arg| (*arg).to_owned()).collect::<Vec<_>>();
        System
            .run(
                &argv(&["sh", "-c", "test \"$(cat)\" = '*nat'"]),
                Some("*nat\n"),
            )
            .expect("stdin reaches the command");
        let error = System
            .run(&argv(&["sh", "-c", "echo bad line >&2; exit 3"]), None)
            .expect_err("fails");
        assert_eq!(
            error.to_string(),
            "`sh -c echo bad line >&2; exit 3` failed (exit code 3): bad line"
        );
        let missing = System
            .run(&argv(&["mesh-node-no-such-binary"]), None)
            .expect_err("missing");
        assert!(matches!(missing, RunError::Io { .. }), "{missing}");
        assert!(matches!(System.run(&[], None), Err(RunError::Empty)));
    }
}
