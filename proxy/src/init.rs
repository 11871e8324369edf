//! `mesh-proxy init`: traffic capture for the sidecar, the equivalent of Istio's
//! `istio-iptables` (run by `istio-init`).
//!
//! The injected init container runs this as root with `NET_ADMIN` inside the pod's
//! network namespace. It installs `iptables` REDIRECT rules in the `nat` table so
//! that inbound TCP reaches the proxy on `--inbound-port` (Istio: 15006) and
//! outbound TCP reaches it on `--outbound-port` (Istio: 15001).
//!
//! Four chains mirror Istio's: `MESH_INBOUND` (`ISTIO_INBOUND`), `MESH_IN_REDIRECT`
//! (`ISTIO_IN_REDIRECT`), `MESH_OUTPUT` (`ISTIO_OUTPUT`) and `MESH_REDIRECT`
//! (`ISTIO_REDIRECT`). [`rules`] computes the `iptables-restore` input without side
//! effects; [`run`] prints it (`--dry-run`) or applies it.
//!
//! # Applying twice is safe
//!
//! The rules are loaded with `iptables-restore --noflush`, so nothing outside the
//! `MESH_*` chains is touched. Each `MESH_*` chain is declared (`:CHAIN - [0:0]`)
//! and flushed (`-F CHAIN`) before being refilled, so re-running replaces their
//! contents instead of appending.
//!
//! The two jumps in the built-in chains (`-A PREROUTING -p tcp -j MESH_INBOUND`
//! and `-A OUTPUT -p tcp -j MESH_OUTPUT`) cannot be written idempotently in
//! restore format. [`rules`] always includes them: that is what a fresh pod
//! namespace needs, and it keeps the output deterministic. Before restoring,
//! [`run`] checks each jump with `iptables -t nat -C <chain> <rule>` and leaves out
//! the ones that already exist.
//!
//! # Differences from istio-iptables
//!
//! `MESH_OUTPUT` follows the order of `ISTIO_OUTPUT`, including the owner rules
//! grouped per owner (the three UID rules, then the three GID rules). The rules for
//! Istio features this proxy lacks are left out: HBONE (`! --dport 15008`), the
//! inbound passthrough source `127.0.0.6`, DNS capture and TPROXY. Ports are
//! matched one rule each rather than with `-m multiport`, which allows only 15
//! ports per rule.
//!
//! # Backend
//!
//! `--iptables-mode auto` decides once, with the IPv4 `*-save` binaries, and uses
//! the same backend for `ip6tables`.

use mesh_api::capture::{self, Capture, Cidr, ListError};
use std::fmt;
use std::io::{self, Write};
use std::process::{Child, Command, Output, Stdio};

const INBOUND_CHAIN: &str = "MESH_INBOUND";
const IN_REDIRECT_CHAIN: &str = "MESH_IN_REDIRECT";
const OUTPUT_CHAIN: &str = "MESH_OUTPUT";
const REDIRECT_CHAIN: &str = "MESH_REDIRECT";
/// The chains [`rules`] creates and flushes, in the order they are declared.
const MESH_CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// Inbound ports that are never captured, whatever the flags say: the proxy's admin
/// port (15000), the agent's merged metrics (15020), health (15021) and the
/// proxy's Prometheus stats (15090). Istio's injector excludes its status ports the
/// same way, by adding them to `istio-iptables -d`.
const STATUS_PORTS: [u16; 4] = [15000, 15020, 15021, 15090];

const INBOUND_PORT_FLAG: &str = "--inbound-port";
const OUTBOUND_PORT_FLAG: &str = "--outbound-port";
const INBOUND_PORTS_FLAG: &str = "--inbound-ports";
const EXCLUDE_INBOUND_PORTS_FLAG: &str = "--exclude-inbound-ports";
const OUTBOUND_IPS_FLAG: &str = "--outbound-ips";
const EXCLUDE_OUTBOUND_IPS_FLAG: &str = "--exclude-outbound-ips";
const EXCLUDE_OUTBOUND_PORTS_FLAG: &str = "--exclude-outbound-ports";
const INCLUDE_OUTBOUND_PORTS_FLAG: &str = "--include-outbound-ports";

/// Flags of `mesh-proxy init`, the equivalent of `istio-iptables`.
///
/// Lists are comma separated; blanks around items are ignored. In `--inbound-ports`
/// and `--outbound-ips`, `*` (alone) means everything and an empty value means
/// nothing.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// UID of the proxy: traffic from it is never captured (istio-iptables -u).
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,

    /// GID of the proxy: traffic from it is never captured (istio-iptables -g).
    #[arg(long, default_value_t = 1337)]
    pub proxy_gid: u32,

    /// Port that captured outbound TCP is redirected to (istio-iptables -p).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,

    /// Port that captured inbound TCP is redirected to (istio-iptables -z).
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,

    /// Inbound TCP ports to capture: `*` for all, a list like `9080,9090`, or empty
    /// for none (istio-iptables -b).
    #[arg(long, default_value = "*")]
    pub inbound_ports: String,

    /// Inbound TCP ports never to capture (istio-iptables -d). 15000, 15020, 15021
    /// and 15090 are always excluded.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub exclude_inbound_ports: String,

    /// Destination CIDRs whose outbound TCP is captured: `*` for all, a list, or
    /// empty for none (istio-iptables -i). IPv4 and IPv6 may be mixed.
    #[arg(long, default_value = "*")]
    pub outbound_ips: String,

    /// Destination CIDRs never to capture (istio-iptables -x).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub exclude_outbound_ips: String,

    /// Destination ports never to capture (istio-iptables -o).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub exclude_outbound_ports: String,

    /// Destination ports to capture even for excluded CIDRs (istio-iptables -q).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub include_outbound_ports: String,

    /// Also install the rules with ip6tables (Istio: ENABLE_INBOUND_IPV6).
    #[arg(long)]
    pub ipv6: bool,

    /// Print the iptables-restore input instead of applying it (istio-iptables -n).
    #[arg(long)]
    pub dry_run: bool,

    /// Which iptables binaries to use.
    #[arg(long, value_enum, default_value_t = IptablesMode::Auto)]
    pub iptables_mode: IptablesMode,
}

/// Which iptables backend `--iptables-mode` selects.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesMode {
    /// `iptables-legacy-restore` if only the legacy backend already has `nat` rules,
    /// else the first that exists of `iptables-restore`, `iptables-nft-restore`,
    /// `iptables-legacy-restore` (found by running the matching `*-save`).
    Auto,
    /// `iptables-nft-restore` / `ip6tables-nft-restore`.
    Nft,
    /// `iptables-legacy-restore` / `ip6tables-legacy-restore`.
    Legacy,
}

/// The computed capture rules: `iptables-restore --noflush` input for the `nat`
/// table, as Istio's `istio-iptables` would apply them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Input for `iptables-restore`; only IPv4 CIDRs appear in it.
    pub v4: String,
    /// Input for `ip6tables-restore` when `--ipv6` is set; only IPv6 CIDRs appear.
    pub v6: Option<String>,
}

/// Why `mesh-proxy init` failed. Each message names the flag, value or binary at
/// fault.
#[derive(thiserror::Error, Debug)]
pub enum InitError {
    /// A port, alone or in a list, is not 1-65535.
    #[error("{flag}: {value:?} is not a port: must be an integer 1-65535")]
    InvalidPort { flag: &'static str, value: String },

    /// A CIDR in a list cannot be parsed.
    #[error("{flag}: {value:?} is not a CIDR: {reason}")]
    InvalidCidr {
        flag: &'static str,
        value: String,
        reason: String,
    },

    /// `*` appears in a list together with other values.
    #[error("{flag}: {value:?}: \"*\" must be the only value")]
    MixedWildcard { flag: &'static str, value: String },

    /// `--iptables-mode auto` found none of the iptables binaries.
    #[error("--iptables-mode auto: no iptables found (tried {})", tried.join(", "))]
    NoIptables { tried: Vec<String> },

    /// A binary could not be started (missing, not executable, ...).
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },

    /// A binary ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    /// The rules could not be written to standard output.
    #[error("could not write the rules to stdout: {0}")]
    Output(#[source] io::Error),
}

/// Computes and validates the rules without touching the system, like
/// `istio-iptables --dry-run` does.
///
/// The output is deterministic and always contains the `PREROUTING` and `OUTPUT`
/// jumps; see the module documentation for how [`run`] avoids duplicating them.
pub fn rules(args: &InitArgs) -> Result<Rules, InitError> {
    Ok(Plan::new(args)?.rules())
}

/// Runs `mesh-proxy init`: with `--dry-run`, prints [`rules`] to stdout and changes
/// nothing; otherwise picks the iptables backend (`--iptables-mode`) and applies
/// the rules with `iptables-restore --noflush` (and `ip6tables-restore` with
/// `--ipv6`), adding the `PREROUTING`/`OUTPUT` jumps only where they are missing,
/// and prints what it applied for the init container's log.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    run_with(args, &SystemRunner::default(), &mut io::stdout().lock())
}

/// [`run`] with the command runner and output passed in, so tests can observe
/// them or run everything inside a network namespace.
fn run_with(args: &InitArgs, runner: &dyn Runner, out: &mut dyn Write) -> Result<(), InitError> {
    let plan = Plan::new(args)?;
    if args.dry_run {
        return print_dry_run(&plan.rules(), out);
    }
    let backend = Backend::select(args.iptables_mode, runner)?;
    apply(runner, backend, &plan.v4, out)?;
    if let Some(v6) = &plan.v6 {
        apply(runner, backend, v6, out)?;
    }
    Ok(())
}

fn print_dry_run(rules: &Rules, out: &mut dyn Write) -> Result<(), InitError> {
    let mut text = format!("# IPv4: iptables-restore --noflush\n{}", rules.v4);
    if let Some(v6) = &rules.v6 {
        text.push_str(&format!("# IPv6: ip6tables-restore --noflush\n{v6}"));
    }
    out.write_all(text.as_bytes()).map_err(InitError::Output)
}

// ---------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------

/// [`InitArgs`] after validation.
#[derive(Debug, Clone)]
struct Config {
    proxy_uid: u32,
    proxy_gid: u32,
    outbound_port: u16,
    inbound_port: u16,
    inbound_ports: Capture<u16>,
    /// The user's exclusions plus [`STATUS_PORTS`].
    exclude_inbound_ports: Vec<u16>,
    outbound_ips: Capture<Cidr>,
    exclude_outbound_ips: Vec<Cidr>,
    exclude_outbound_ports: Vec<u16>,
    include_outbound_ports: Vec<u16>,
    ipv6: bool,
}

impl Config {
    fn from_args(args: &InitArgs) -> Result<Self, InitError> {
        let mut exclude_inbound_ports = STATUS_PORTS.to_vec();
        exclude_inbound_ports.extend(
            capture::port_list(&args.exclude_inbound_ports)
                .map_err(at(EXCLUDE_INBOUND_PORTS_FLAG))?,
        );
        Ok(Self {
            proxy_uid: args.proxy_uid,
            proxy_gid: args.proxy_gid,
            outbound_port: check_port(OUTBOUND_PORT_FLAG, args.outbound_port)?,
            inbound_port: check_port(INBOUND_PORT_FLAG, args.inbound_port)?,
            inbound_ports: capture::port_capture(&args.inbound_ports)
                .map_err(at(INBOUND_PORTS_FLAG))?,
            exclude_inbound_ports: dedup(exclude_inbound_ports),
            outbound_ips: capture::cidr_capture(&args.outbound_ips)
                .map_err(at(OUTBOUND_IPS_FLAG))?,
            exclude_outbound_ips: capture::cidr_list(&args.exclude_outbound_ips)
                .map_err(at(EXCLUDE_OUTBOUND_IPS_FLAG))?,
            exclude_outbound_ports: capture::port_list(&args.exclude_outbound_ports)
                .map_err(at(EXCLUDE_OUTBOUND_PORTS_FLAG))?,
            include_outbound_ports: capture::port_list(&args.include_outbound_ports)
                .map_err(at(INCLUDE_OUTBOUND_PORTS_FLAG))?,
            ipv6: args.ipv6,
        })
    }
}

/// A list error of the shared parser, named by its flag.
fn at(flag: &'static str) -> impl Fn(ListError) -> InitError {
    move |e| match e {
        ListError::InvalidPort { value } => InitError::InvalidPort { flag, value },
        ListError::InvalidCidr { value, reason } => InitError::InvalidCidr {
            flag,
            value,
            reason,
        },
        ListError::MixedWildcard { value } => InitError::MixedWildcard { flag, value },
    }
}

/// Removes repeated items, keeping the first occurrence and the order.
fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut unique = Vec::with_capacity(items.len());
    for item in items {
        if !unique.contains(&item) {
            unique.push(item);
        }
    }
    unique
}

fn check_port(flag: &'static str, port: u16) -> Result<u16, InitError> {
    if port == 0 {
        return Err(InitError::InvalidPort {
            flag,
            value: port.to_string(),
        });
    }
    Ok(port)
}

/// IP version of a rule set or CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn family_of(cidr: &Cidr) -> Family {
    if cidr.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

// ---------------------------------------------------------------------------
// Rule generation
// ---------------------------------------------------------------------------

/// One `-A <chain> <spec>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    chain: &'static str,
    spec: String,
}

impl Rule {
    fn new(chain: &'static str, spec: impl Into<String>) -> Self {
        Self {
            chain,
            spec: spec.into(),
        }
    }

    /// Arguments of `iptables -t nat -C ...`, which tells whether the rule exists.
    fn check_args(&self) -> Vec<&str> {
        let mut args = vec!["-t", "nat", "-C", self.chain];
        args.extend(self.spec.split_whitespace());
        args
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

/// The `nat` table content for one IP family.
#[derive(Debug, Clone)]
struct NatTable {
    family: Family,
    /// Rules of the `MESH_*` chains.
    rules: Vec<Rule>,
    /// Jumps from the built-in chains into `MESH_*`.
    jumps: Vec<Rule>,
}

impl NatTable {
    fn build(config: &Config, family: Family) -> Self {
        let mut rules = vec![
            Rule::new(
                IN_REDIRECT_CHAIN,
                format!("-p tcp -j REDIRECT --to-ports {}", config.inbound_port),
            ),
            Rule::new(
                REDIRECT_CHAIN,
                format!("-p tcp -j REDIRECT --to-ports {}", config.outbound_port),
            ),
        ];
        rules.extend(inbound_rules(config));
        rules.extend(output_rules(config, family));
        let jumps = vec![
            Rule::new("PREROUTING", format!("-p tcp -j {INBOUND_CHAIN}")),
            Rule::new("OUTPUT", format!("-p tcp -j {OUTPUT_CHAIN}")),
        ];
        Self {
            family,
            rules,
            jumps,
        }
    }

    /// Restore input with every jump, as [`rules`] reports it.
    fn render_all(&self) -> String {
        self.render(&self.jumps)
    }

    /// Restore input with only the given jumps.
    fn render<'a>(&self, jumps: impl IntoIterator<Item = &'a Rule>) -> String {
        let mut lines = vec!["*nat".to_owned()];
        lines.extend(MESH_CHAINS.iter().map(|chain| format!(":{chain} - [0:0]")));
        lines.extend(MESH_CHAINS.iter().map(|chain| format!("-F {chain}")));
        lines.extend(self.rules.iter().map(Rule::to_string));
        lines.extend(jumps.into_iter().map(Rule::to_string));
        lines.push("COMMIT".to_owned());
        lines.join("\n") + "\n"
    }
}

/// `MESH_INBOUND`: never capture excluded ports, then capture all or listed ports
/// (Istio's `ISTIO_INBOUND`).
fn inbound_rules(config: &Config) -> Vec<Rule> {
    let inbound = |spec: String| Rule::new(INBOUND_CHAIN, spec);
    let returns = config
        .exclude_inbound_ports
        .iter()
        .map(|port| inbound(format!("-p tcp --dport {port} -j RETURN")));
    let captures: Vec<Rule> = match &config.inbound_ports {
        Capture::All => vec![inbound(format!("-p tcp -j {IN_REDIRECT_CHAIN}"))],
        Capture::Only(ports) => ports
            .iter()
            .map(|port| inbound(format!("-p tcp --dport {port} -j {IN_REDIRECT_CHAIN}")))
            .collect(),
    };
    returns.chain(captures).collect()
}

/// `MESH_OUTPUT`, in Istio's `ISTIO_OUTPUT` order.
fn output_rules(config: &Config, family: Family) -> Vec<Rule> {
    let output = |spec: String| Rule::new(OUTPUT_CHAIN, spec);
    let of_family = |cidrs: &[Cidr]| -> Vec<Cidr> {
        cidrs
            .iter()
            .copied()
            .filter(|cidr| family_of(cidr) == family)
            .collect()
    };

    let mut rules: Vec<Rule> = config
        .exclude_outbound_ports
        .iter()
        .map(|port| output(format!("-p tcp --dport {port} -j RETURN")))
        .collect();
    rules.extend(owner_rules("--uid-owner", config.proxy_uid, family));
    rules.extend(owner_rules("--gid-owner", config.proxy_gid, family));
    rules.push(output(format!("-d {} -j RETURN", family.loopback())));
    rules.extend(
        config
            .include_outbound_ports
            .iter()
            .map(|port| output(format!("-p tcp --dport {port} -j {REDIRECT_CHAIN}"))),
    );
    rules.extend(
        of_family(&config.exclude_outbound_ips)
            .iter()
            .map(|cidr| output(format!("-d {cidr} -j RETURN"))),
    );
    match &config.outbound_ips {
        Capture::All => rules.push(output(format!("-j {REDIRECT_CHAIN}"))),
        Capture::Only(cidrs) => rules.extend(
            of_family(cidrs)
                .iter()
                .map(|cidr| output(format!("-d {cidr} -j {REDIRECT_CHAIN}"))),
        ),
    }
    rules
}

/// Istio's three rules per proxy UID/GID (`owner` is `--uid-owner` or
/// `--gid-owner`):
///
/// 1. the proxy talking to the pod's own IP over `lo` is inbound traffic for the
///    app: send it through the inbound redirect;
/// 2. the app talking to itself over `lo` is left alone;
/// 3. any other traffic of the proxy is left alone (it is already proxied).
fn owner_rules(owner: &str, id: u32, family: Family) -> [Rule; 3] {
    let loopback = family.loopback();
    [
        format!("-o lo ! -d {loopback} -m owner {owner} {id} -j {IN_REDIRECT_CHAIN}"),
        format!("-o lo -m owner ! {owner} {id} -j RETURN"),
        format!("-m owner {owner} {id} -j RETURN"),
    ]
    .map(|spec| Rule::new(OUTPUT_CHAIN, spec))
}

/// The rules for both families.
#[derive(Debug, Clone)]
struct Plan {
    v4: NatTable,
    v6: Option<NatTable>,
}

impl Plan {
    fn new(args: &InitArgs) -> Result<Self, InitError> {
        let config = Config::from_args(args)?;
        Ok(Self {
            v4: NatTable::build(&config, Family::V4),
            v6: config.ipv6.then(|| NatTable::build(&config, Family::V6)),
        })
    }

    fn rules(&self) -> Rules {
        Rules {
            v4: self.v4.render_all(),
            v6: self.v6.as_ref().map(NatTable::render_all),
        }
    }
}

// ---------------------------------------------------------------------------
// Applying
// ---------------------------------------------------------------------------

/// Which family of iptables binaries to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `iptables`, `iptables-restore`, ...: whatever the system links them to.
    Default,
    Nft,
    Legacy,
}

/// The binaries of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Iptables,
    Save,
    Restore,
}

impl Backend {
    fn select(mode: IptablesMode, runner: &dyn Runner) -> Result<Self, InitError> {
        match mode {
            IptablesMode::Auto => detect_backend(runner),
            IptablesMode::Nft => Ok(Backend::Nft),
            IptablesMode::Legacy => Ok(Backend::Legacy),
        }
    }

    fn binary(self, family: Family, tool: Tool) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let backend = match self {
            Backend::Default => "",
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
        };
        let tool = match tool {
            Tool::Iptables => "",
            Tool::Save => "-save",
            Tool::Restore => "-restore",
        };
        format!("{base}{backend}{tool}")
    }
}

/// `--iptables-mode auto`: legacy if only the legacy backend already has `nat`
/// rules (the node's other components use it), else the first backend whose
/// `*-save` runs, in the order default, nft, legacy.
fn detect_backend(runner: &dyn Runner) -> Result<Backend, InitError> {
    let legacy = nat_rule_count(runner, Backend::Legacy)?;
    let nft = nat_rule_count(runner, Backend::Nft)?;
    if legacy.is_some_and(|rules| rules > 0) && nft.unwrap_or(0) == 0 {
        return Ok(Backend::Legacy);
    }
    if nat_rule_count(runner, Backend::Default)?.is_some() {
        Ok(Backend::Default)
    } else if nft.is_some() {
        Ok(Backend::Nft)
    } else if legacy.is_some() {
        Ok(Backend::Legacy)
    } else {
        let tried = [Backend::Legacy, Backend::Nft, Backend::Default]
            .map(|backend| backend.binary(Family::V4, Tool::Save));
        Err(InitError::NoIptables {
            tried: tried.to_vec(),
        })
    }
}

/// Number of rules `<backend>-save -t nat` shows, or `None` if the binary does not
/// exist. A save that runs but fails counts as no rules.
fn nat_rule_count(runner: &dyn Runner, backend: Backend) -> Result<Option<usize>, InitError> {
    let program = backend.binary(Family::V4, Tool::Save);
    match runner.run(&program, &["-t", "nat"], None) {
        Ok(output) if output.success() => Ok(Some(
            output
                .stdout
                .lines()
                .filter(|line| line.starts_with("-A "))
                .count(),
        )),
        Ok(_) => Ok(Some(0)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(InitError::Spawn { program, source }),
    }
}

/// Restores `table` with `--noflush`, leaving out the jumps that already exist.
fn apply(
    runner: &dyn Runner,
    backend: Backend,
    table: &NatTable,
    out: &mut dyn Write,
) -> Result<(), InitError> {
    let iptables = backend.binary(table.family, Tool::Iptables);
    let mut missing = Vec::new();
    for jump in &table.jumps {
        if !jump_exists(runner, &iptables, jump)? {
            missing.push(jump);
        }
    }
    let text = table.render(missing);
    let restore = backend.binary(table.family, Tool::Restore);
    let output = runner
        .run(&restore, &["--noflush"], Some(&text))
        .map_err(|source| InitError::Spawn {
            program: restore.clone(),
            source,
        })?;
    if !output.success() {
        return Err(output.failure(format!("{restore} --noflush")));
    }
    write!(out, "# applied with {restore} --noflush\n{text}").map_err(InitError::Output)
}

/// `iptables -t nat -C`: exit 0 if the rule exists, 1 if not, 2 if its target
/// chain does not exist yet (so neither does the rule).
fn jump_exists(runner: &dyn Runner, iptables: &str, jump: &Rule) -> Result<bool, InitError> {
    let args = jump.check_args();
    let output = runner
        .run(iptables, &args, None)
        .map_err(|source| InitError::Spawn {
            program: iptables.to_owned(),
            source,
        })?;
    match output.code {
        Some(0) => Ok(true),
        Some(1 | 2) => Ok(false),
        _ => Err(output.failure(format!("{iptables} {}", args.join(" ")))),
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// What a finished command left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CmdOutput {
    /// Exit code; `None` if killed by a signal.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CmdOutput {
    fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn failure(&self, command: String) -> InitError {
        InitError::CommandFailed {
            command,
            status: self.code.map_or_else(
                || "killed by a signal".to_owned(),
                |code| format!("exit code {code}"),
            ),
            stderr: self.stderr.trim().to_owned(),
        }
    }
}

/// Runs external commands. Tests substitute fakes, and the namespace test runs
/// everything through `ip netns exec`.
trait Runner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput>;
}

/// Runs commands for real, each prefixed by `prefix`: empty in production; the
/// namespace test uses `ip netns exec <ns>` (where a missing binary shows up as
/// exit code 255 from `ip` rather than as [`io::ErrorKind::NotFound`]).
#[derive(Debug, Default)]
struct SystemRunner {
    prefix: Vec<String>,
}

impl SystemRunner {
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        command.args(args);
        command
    }
}

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput> {
        let child = self
            .command(program, args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let output = wait_feeding_stdin(child, stdin)?;
        Ok(CmdOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Waits for `child`, writing `stdin` to it from a second thread so that a child
/// which writes a lot before reading all its input cannot deadlock against us.
fn wait_feeding_stdin(mut child: Child, stdin: Option<&str>) -> io::Result<Output> {
    let pipe = child.stdin.take();
    std::thread::scope(|scope| {
        let writer = pipe
            .zip(stdin)
            .map(|(mut pipe, text)| scope.spawn(move || pipe.write_all(text.as_bytes())));
        let output = child.wait_with_output()?;
        if let Some(writer) = writer {
            let written = writer
                .join()
                .map_err(|_| io::Error::other("stdin writer thread panicked"))?;
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
    use clap::Parser;
    use std::cell::RefCell;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitArgs,
    }

    /// Parses flags the way `mesh-proxy init` would.
    fn args(flags: &[&str]) -> InitArgs {
        Cli::try_parse_from(std::iter::once("init").chain(flags.iter().copied()))
            .expect("flags should parse")
            .args
    }

    fn lines(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    /// The `-A <chain> ...` lines of restore or save text.
    fn chain_lines<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        text.lines()
            .filter(|line| line.starts_with(&prefix))
            .collect()
    }

    fn error_message(flags: &[&str]) -> String {
        rules(&args(flags))
            .expect_err("flags should be rejected")
            .to_string()
    }

    const HEADER: [&str; 9] = [
        "*nat",
        ":MESH_INBOUND - [0:0]",
        ":MESH_IN_REDIRECT - [0:0]",
        ":MESH_OUTPUT - [0:0]",
        ":MESH_REDIRECT - [0:0]",
        "-F MESH_INBOUND",
        "-F MESH_IN_REDIRECT",
        "-F MESH_OUTPUT",
        "-F MESH_REDIRECT",
    ];

    fn golden(body: &[&str]) -> String {
        let all: Vec<&str> = HEADER.iter().chain(body).copied().collect();
        lines(&all)
    }

    #[test]
    fn default_rules() {
        let expected = golden(&[
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A MESH_INBOUND -p tcp --dport 15000 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15090 -j RETURN",
            "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
            "-A MESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A MESH_OUTPUT -j MESH_REDIRECT",
            "-A PREROUTING -p tcp -j MESH_INBOUND",
            "-A OUTPUT -p tcp -j MESH_OUTPUT",
            "COMMIT",
        ]);
        let rules = rules(&args(&[])).expect("defaults are valid");
        assert_eq!(rules.v4, expected);
        assert_eq!(rules.v6, None);
    }

    #[test]
    fn all_flags_combined() {
        let flags = [
            "--proxy-uid=1000",
            "--proxy-gid=2000",
            "--outbound-port=16001",
            "--inbound-port=16006",
            "--inbound-ports=9080, 9090",
            "--exclude-inbound-ports=22,9090",
            "--outbound-ips=10.0.0.0/8,fd00::/8,192.168.1.7",
            "--exclude-outbound-ips=10.96.0.0/12,fd00:96::/108",
            "--exclude-outbound-ports=3306,5432",
            "--include-outbound-ports=443",
            "--ipv6",
        ];
        let expected_v4 = golden(&[
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
            "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            "-A MESH_INBOUND -p tcp --dport 15000 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15090 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 22 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 9090 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 9080 -j MESH_IN_REDIRECT",
            "-A MESH_INBOUND -p tcp --dport 9090 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -p tcp --dport 3306 -j RETURN",
            "-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1000 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1000 -j RETURN",
            "-A MESH_OUTPUT -m owner --uid-owner 1000 -j RETURN",
            "-A MESH_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 2000 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo -m owner ! --gid-owner 2000 -j RETURN",
            "-A MESH_OUTPUT -m owner --gid-owner 2000 -j RETURN",
            "-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A MESH_OUTPUT -p tcp --dport 443 -j MESH_REDIRECT",
            "-A MESH_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A MESH_OUTPUT -d 10.0.0.0/8 -j MESH_REDIRECT",
            "-A MESH_OUTPUT -d 192.168.1.7/32 -j MESH_REDIRECT",
            "-A PREROUTING -p tcp -j MESH_INBOUND",
            "-A OUTPUT -p tcp -j MESH_OUTPUT",
            "COMMIT",
        ]);
        let expected_v6 = golden(&[
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
            "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            "-A MESH_INBOUND -p tcp --dport 15000 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 15090 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 22 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 9090 -j RETURN",
            "-A MESH_INBOUND -p tcp --dport 9080 -j MESH_IN_REDIRECT",
            "-A MESH_INBOUND -p tcp --dport 9090 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -p tcp --dport 3306 -j RETURN",
            "-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A MESH_OUTPUT -o lo ! -d ::1/128 -m owner --uid-owner 1000 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1000 -j RETURN",
            "-A MESH_OUTPUT -m owner --uid-owner 1000 -j RETURN",
            "-A MESH_OUTPUT -o lo ! -d ::1/128 -m owner --gid-owner 2000 -j MESH_IN_REDIRECT",
            "-A MESH_OUTPUT -o lo -m owner ! --gid-owner 2000 -j RETURN",
            "-A MESH_OUTPUT -m owner --gid-owner 2000 -j RETURN",
            "-A MESH_OUTPUT -d ::1/128 -j RETURN",
            "-A MESH_OUTPUT -p tcp --dport 443 -j MESH_REDIRECT",
            "-A MESH_OUTPUT -d fd00:96::/108 -j RETURN",
            "-A MESH_OUTPUT -d fd00::/8 -j MESH_REDIRECT",
            "-A PREROUTING -p tcp -j MESH_INBOUND",
            "-A OUTPUT -p tcp -j MESH_OUTPUT",
            "COMMIT",
        ]);
        let rules = rules(&args(&flags)).expect("flags are valid");
        assert_eq!(rules.v4, expected_v4);
        assert_eq!(rules.v6, Some(expected_v6));
    }

    #[test]
    fn ipv6_defaults_use_ipv6_loopback() {
        let rules = rules(&args(&["--ipv6"])).expect("valid");
        let v6 = rules.v6.expect("--ipv6 produces ip6tables rules");
        assert_eq!(
            chain_lines(&v6, "MESH_OUTPUT"),
            [
                "-A MESH_OUTPUT -o lo ! -d ::1/128 -m owner --uid-owner 1337 -j MESH_IN_REDIRECT",
                "-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MESH_OUTPUT -o lo ! -d ::1/128 -m owner --gid-owner 1337 -j MESH_IN_REDIRECT",
                "-A MESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
                "-A MESH_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A MESH_OUTPUT -d ::1/128 -j RETURN",
                "-A MESH_OUTPUT -j MESH_REDIRECT",
            ]
        );
        assert!(!v6.contains("127.0.0.1"));
        // Apart from the loopback address, both families get the same rules.
        assert_eq!(v6.replace("::1/128", "127.0.0.1/32"), rules.v4);
    }

    #[test]
    fn cidrs_go_to_their_own_family_only() {
        let rules = rules(&args(&[
            "--ipv6",
            "--outbound-ips=fd00::/8",
            "--exclude-outbound-ips=10.0.0.0/8",
        ]))
        .expect("valid");
        let v6 = rules.v6.expect("--ipv6");
        // No IPv4 range is captured, so IPv4 outbound is captured nowhere.
        assert!(!rules.v4.contains("-j MESH_REDIRECT\n"));
        assert!(
            rules
                .v4
                .contains("-A MESH_OUTPUT -d 10.0.0.0/8 -j RETURN\n")
        );
        assert!(!rules.v4.contains("fd00"));
        assert!(v6.contains("-A MESH_OUTPUT -d fd00::/8 -j MESH_REDIRECT\n"));
        assert!(!v6.contains("10.0.0.0"));
    }

    #[test]
    fn empty_inbound_ports_capture_no_inbound() {
        let rules = rules(&args(&["--inbound-ports="])).expect("valid");
        assert_eq!(
            chain_lines(&rules.v4, "MESH_INBOUND"),
            [
                "-A MESH_INBOUND -p tcp --dport 15000 -j RETURN",
                "-A MESH_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A MESH_INBOUND -p tcp --dport 15021 -j RETURN",
                "-A MESH_INBOUND -p tcp --dport 15090 -j RETURN",
            ]
        );
        // The jump stays, so a later run with other flags needs no new jump.
        assert!(rules.v4.contains("-A PREROUTING -p tcp -j MESH_INBOUND\n"));
    }

    #[test]
    fn empty_outbound_ips_capture_no_outbound() {
        let rules =
            rules(&args(&["--outbound-ips=", "--include-outbound-ports=443"])).expect("valid");
        let redirects: Vec<_> = chain_lines(&rules.v4, "MESH_OUTPUT")
            .into_iter()
            .filter(|line| line.ends_with("-j MESH_REDIRECT"))
            .collect();
        assert_eq!(
            redirects,
            ["-A MESH_OUTPUT -p tcp --dport 443 -j MESH_REDIRECT"]
        );
    }

    #[test]
    fn status_ports_are_always_excluded() {
        let flag_sets: [&[&str]; 5] = [
            &[],
            &["--inbound-ports=15020,15021,8080"],
            &["--inbound-ports="],
            &["--exclude-inbound-ports=15090,22,15000"],
            &["--ipv6", "--inbound-ports=*", "--exclude-inbound-ports="],
        ];
        for flags in flag_sets {
            let rules = rules(&args(flags)).expect("valid");
            for text in std::iter::once(&rules.v4).chain(&rules.v6) {
                let inbound = chain_lines(text, "MESH_INBOUND");
                for port in STATUS_PORTS {
                    let exclusion = format!("-A MESH_INBOUND -p tcp --dport {port} -j RETURN");
                    let found = inbound.iter().filter(|line| **line == exclusion).count();
                    assert_eq!(found, 1, "{exclusion:?} for {flags:?}");
                    // Exclusions come before any capture.
                    let first_capture = inbound
                        .iter()
                        .position(|line| line.ends_with("-j MESH_IN_REDIRECT"))
                        .unwrap_or(inbound.len());
                    let position = inbound.iter().position(|line| **line == exclusion);
                    assert!(position < Some(first_capture), "{flags:?}");
                }
            }
        }
    }

    #[test]
    fn repeated_list_items_appear_once() {
        let rules = rules(&args(&[
            "--inbound-ports=80,80, 81",
            "--exclude-outbound-ips=10.0.0.0/8,10.1.2.3/8",
        ]))
        .expect("valid");
        assert_eq!(
            chain_lines(&rules.v4, "MESH_INBOUND")[4..],
            [
                "-A MESH_INBOUND -p tcp --dport 80 -j MESH_IN_REDIRECT",
                "-A MESH_INBOUND -p tcp --dport 81 -j MESH_IN_REDIRECT",
            ]
        );
        assert_eq!(rules.v4.matches("-d 10.0.0.0/8 -j RETURN").count(), 1);
    }

    #[test]
    fn cidr_parsing() {
        let parse = |text: &str| Cidr::parse(text).map(|cidr| cidr.to_string());
        assert_eq!(parse("10.0.0.0/8"), Ok("10.0.0.0/8".into()));
        assert_eq!(parse("10.1.2.3/8"), Ok("10.0.0.0/8".into()));
        assert_eq!(parse("10.1.2.3"), Ok("10.1.2.3/32".into()));
        assert_eq!(parse("0.0.0.0/0"), Ok("0.0.0.0/0".into()));
        assert_eq!(parse("1.2.3.4/0"), Ok("0.0.0.0/0".into()));
        assert_eq!(parse("::/0"), Ok("::/0".into()));
        assert_eq!(parse("fd00:1:2::3/48"), Ok("fd00:1:2::/48".into()));
        assert_eq!(parse("2001:db8::1"), Ok("2001:db8::1/128".into()));
        assert_eq!(
            parse("10.0.0.0/33"),
            Err("prefix length must be 0-32".into())
        );
        assert_eq!(parse("::/129"), Err("prefix length must be 0-128".into()));
        assert_eq!(parse("10.0.0.0/"), Err("prefix length must be 0-32".into()));
        assert_eq!(
            parse("10.0.0.0/+8"),
            Err("prefix length must be 0-32".into())
        );
        assert_eq!(
            parse("10.0.0.0/8/8"),
            Err("prefix length must be 0-32".into())
        );
        assert_eq!(
            parse("10.0.0/8"),
            Err("\"10.0.0\" is not an IPv4 or IPv6 address".into())
        );
        assert_eq!(
            parse("fe80::1%eth0/64"),
            Err("\"fe80::1%eth0\" is not an IPv4 or IPv6 address".into())
        );
    }

    #[test]
    fn invalid_values_are_reported_with_their_flag() {
        let cases: [(&[&str], &str); 14] = [
            (
                &["--exclude-outbound-ips=10.0.0.0/33"],
                r#"--exclude-outbound-ips: "10.0.0.0/33" is not a CIDR: prefix length must be 0-32"#,
            ),
            (
                &["--outbound-ips=10.0.0.0/8,fd00::/129"],
                r#"--outbound-ips: "fd00::/129" is not a CIDR: prefix length must be 0-128"#,
            ),
            (
                &["--outbound-ips=example.com"],
                r#"--outbound-ips: "example.com" is not a CIDR: "example.com" is not an IPv4 or IPv6 address"#,
            ),
            (
                &["--exclude-outbound-ips=*"],
                r#"--exclude-outbound-ips: "*" is not a CIDR: "*" is not an IPv4 or IPv6 address"#,
            ),
            (
                &["--exclude-inbound-ports=22,0"],
                r#"--exclude-inbound-ports: "0" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--inbound-ports=9080,70000"],
                r#"--inbound-ports: "70000" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--inbound-ports=http"],
                r#"--inbound-ports: "http" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--exclude-outbound-ports=-1"],
                r#"--exclude-outbound-ports: "-1" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--include-outbound-ports=+443"],
                r#"--include-outbound-ports: "+443" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--inbound-ports=*,80"],
                r#"--inbound-ports: "*,80": "*" must be the only value"#,
            ),
            (
                &["--outbound-ips=10.0.0.0/8,*"],
                r#"--outbound-ips: "10.0.0.0/8,*": "*" must be the only value"#,
            ),
            (
                &["--inbound-port=0"],
                r#"--inbound-port: "0" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--outbound-port=0"],
                r#"--outbound-port: "0" is not a port: must be an integer 1-65535"#,
            ),
            (
                &["--exclude-inbound-ports=8080:8090"],
                r#"--exclude-inbound-ports: "8080:8090" is not a port: must be an integer 1-65535"#,
            ),
        ];
        for (flags, expected) in cases {
            assert_eq!(error_message(flags), expected, "{flags:?}");
        }
    }

    #[test]
    fn out_of_range_ports_are_rejected_by_clap() {
        let error = Cli::try_parse_from(["init", "--inbound-port", "70000"])
            .err()
            .expect("70000 is not a u16");
        assert!(error.to_string().contains("--inbound-port"), "{error}");
    }

    #[test]
    fn iptables_mode_flag() {
        assert_eq!(args(&[]).iptables_mode, IptablesMode::Auto);
        assert_eq!(
            args(&["--iptables-mode=nft"]).iptables_mode,
            IptablesMode::Nft
        );
        assert_eq!(
            args(&["--iptables-mode", "legacy"]).iptables_mode,
            IptablesMode::Legacy
        );
        assert!(Cli::try_parse_from(["init", "--iptables-mode=xtables"]).is_err());
    }

    // -- run() with fake commands -------------------------------------------

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Call {
        program: String,
        args: Vec<String>,
        stdin: Option<String>,
    }

    type Respond = Box<dyn Fn(&str, &[&str]) -> io::Result<CmdOutput>>;

    /// Records every command and answers with `respond`.
    struct FakeRunner {
        calls: RefCell<Vec<Call>>,
        respond: Respond,
    }

    impl FakeRunner {
        fn new(respond: impl Fn(&str, &[&str]) -> io::Result<CmdOutput> + 'static) -> Self {
            Self {
                calls: RefCell::default(),
                respond: Box::new(respond),
            }
        }

        fn programs(&self) -> Vec<String> {
            self.calls
                .borrow()
                .iter()
                .map(|call| call.program.clone())
                .collect()
        }

        fn stdin_of(&self, program: &str) -> Option<String> {
            self.calls
                .borrow()
                .iter()
                .find(|call| call.program == program)
                .and_then(|call| call.stdin.clone())
        }
    }

    impl Runner for FakeRunner {
        fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput> {
            self.calls.borrow_mut().push(Call {
                program: program.to_owned(),
                args: args.iter().map(|arg| (*arg).to_owned()).collect(),
                stdin: stdin.map(str::to_owned),
            });
            (self.respond)(program, args)
        }
    }

    fn exit(code: i32) -> io::Result<CmdOutput> {
        Ok(CmdOutput {
            code: Some(code),
            ..CmdOutput::default()
        })
    }

    fn saved(stdout: &str) -> io::Result<CmdOutput> {
        Ok(CmdOutput {
            code: Some(0),
            stdout: stdout.to_owned(),
            stderr: String::new(),
        })
    }

    fn not_found() -> io::Result<CmdOutput> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }

    const SAVE_WITH_RULES: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE\nCOMMIT\n";
    const SAVE_EMPTY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";

    /// A system where every binary exists, no jump exists yet and saves are empty.
    fn fresh_system(program: &str, args: &[&str]) -> io::Result<CmdOutput> {
        if program.ends_with("-save") {
            saved(SAVE_EMPTY)
        } else if args.contains(&"-C") {
            exit(2)
        } else {
            exit(0)
        }
    }

    #[test]
    fn dry_run_prints_and_executes_nothing() {
        let runner = FakeRunner::new(|program, _| panic!("dry run ran {program}"));
        let mut out = Vec::new();
        let args = args(&["--dry-run", "--ipv6"]);
        run_with(&args, &runner, &mut out).expect("dry run succeeds");
        assert!(runner.calls.borrow().is_empty());
        let expected = rules(&args).expect("valid");
        let v6 = expected.v6.expect("--ipv6");
        let printed = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            printed,
            format!(
                "# IPv4: iptables-restore --noflush\n{}# IPv6: ip6tables-restore --noflush\n{v6}",
                expected.v4
            )
        );
    }

    #[test]
    fn public_run_validates_before_anything_else() {
        let error =
            run(&args(&["--dry-run", "--outbound-ips=10.0.0.0/40"])).expect_err("invalid CIDR");
        assert!(matches!(error, InitError::InvalidCidr { .. }), "{error}");
    }

    #[test]
    fn invalid_flags_fail_before_running_anything() {
        let runner = FakeRunner::new(|program, _| panic!("ran {program}"));
        for dry_run in [true, false] {
            let mut flags = vec!["--exclude-outbound-ports=x"];
            if dry_run {
                flags.push("--dry-run");
            }
            let error =
                run_with(&args(&flags), &runner, &mut Vec::new()).expect_err("invalid port");
            assert!(matches!(error, InitError::InvalidPort { .. }), "{error}");
        }
    }

    #[test]
    fn applies_with_default_binaries_on_a_fresh_system() {
        let runner = FakeRunner::new(fresh_system);
        let args = args(&["--ipv6"]);
        let mut out = Vec::new();
        run_with(&args, &runner, &mut out).expect("applies");
        assert_eq!(
            runner.programs(),
            [
                "iptables-legacy-save",
                "iptables-nft-save",
                "iptables-save",
                "iptables",
                "iptables",
                "iptables-restore",
                "ip6tables",
                "ip6tables",
                "ip6tables-restore",
            ]
        );
        let expected = rules(&args).expect("valid");
        assert_eq!(
            runner.stdin_of("iptables-restore"),
            Some(expected.v4.clone())
        );
        assert_eq!(runner.stdin_of("ip6tables-restore"), expected.v6);
        let calls = runner.calls.borrow();
        assert_eq!(
            calls[3].args,
            [
                "-t",
                "nat",
                "-C",
                "PREROUTING",
                "-p",
                "tcp",
                "-j",
                "MESH_INBOUND"
            ]
        );
        assert_eq!(
            calls[4].args,
            [
                "-t",
                "nat",
                "-C",
                "OUTPUT",
                "-p",
                "tcp",
                "-j",
                "MESH_OUTPUT"
            ]
        );
        assert_eq!(calls[5].args, ["--noflush"]);
        let printed = String::from_utf8(out).expect("utf-8");
        assert!(printed.starts_with("# applied with iptables-restore --noflush\n*nat\n"));
    }

    #[test]
    fn existing_jumps_are_not_added_again() {
        let runner = FakeRunner::new(|program, args| {
            if args.contains(&"PREROUTING") {
                exit(0) // the inbound jump exists, the outbound one does not
            } else {
                fresh_system(program, args)
            }
        });
        run_with(&args(&[]), &runner, &mut Vec::new()).expect("applies");
        let text = runner.stdin_of("iptables-restore").expect("restored");
        assert!(!text.contains("-A PREROUTING"));
        assert!(text.contains("-A OUTPUT -p tcp -j MESH_OUTPUT\n"));
        assert!(text.ends_with("-A OUTPUT -p tcp -j MESH_OUTPUT\nCOMMIT\n"));
    }

    #[test]
    fn auto_mode_prefers_legacy_when_only_legacy_has_rules() {
        let runner = FakeRunner::new(|program, args| match program {
            "iptables-legacy-save" => saved(SAVE_WITH_RULES),
            _ => fresh_system(program, args),
        });
        run_with(&args(&[]), &runner, &mut Vec::new()).expect("applies");
        let programs = runner.programs();
        assert_eq!(programs[..2], ["iptables-legacy-save", "iptables-nft-save"]);
        assert_eq!(
            programs[2..],
            [
                "iptables-legacy",
                "iptables-legacy",
                "iptables-legacy-restore"
            ]
        );
    }

    #[test]
    fn auto_mode_uses_default_binaries_when_both_backends_have_rules() {
        let runner = FakeRunner::new(|program, args| {
            if program.ends_with("-save") {
                saved(SAVE_WITH_RULES)
            } else {
                fresh_system(program, args)
            }
        });
        run_with(&args(&[]), &runner, &mut Vec::new()).expect("applies");
        assert_eq!(
            runner.programs().last().map(String::as_str),
            Some("iptables-restore")
        );
    }

    #[test]
    fn auto_mode_falls_back_to_nft_then_legacy() {
        let without = |missing: &'static [&'static str]| {
            FakeRunner::new(move |program, args| {
                if missing.contains(&program) {
                    not_found()
                } else {
                    fresh_system(program, args)
                }
            })
        };
        let runner = without(&["iptables-save"]);
        run_with(&args(&[]), &runner, &mut Vec::new()).expect("applies");
        assert_eq!(
            runner.programs().last().map(String::as_str),
            Some("iptables-nft-restore")
        );

        let runner = without(&["iptables-save", "iptables-nft-save"]);
        run_with(&args(&[]), &runner, &mut Vec::new()).expect("applies");
        assert_eq!(
            runner.programs().last().map(String::as_str),
            Some("iptables-legacy-restore")
        );
    }

    #[test]
    fn auto_mode_without_any_iptables_names_the_binaries_tried() {
        let runner = FakeRunner::new(|_, _| not_found());
        let error = run_with(&args(&[]), &runner, &mut Vec::new()).expect_err("no iptables");
        assert_eq!(
            error.to_string(),
            "--iptables-mode auto: no iptables found \
             (tried iptables-legacy-save, iptables-nft-save, iptables-save)"
        );
    }

    #[test]
    fn explicit_mode_skips_detection() {
        let runner = FakeRunner::new(fresh_system);
        run_with(
            &args(&["--iptables-mode=nft", "--ipv6"]),
            &runner,
            &mut Vec::new(),
        )
        .expect("applies");
        assert_eq!(
            runner.programs(),
            [
                "iptables-nft",
                "iptables-nft",
                "iptables-nft-restore",
                "ip6tables-nft",
                "ip6tables-nft",
                "ip6tables-nft-restore",
            ]
        );
    }

    #[test]
    fn missing_restore_binary_is_named() {
        let runner = FakeRunner::new(|program, args| match program {
            "iptables-legacy-restore" => not_found(),
            _ => fresh_system(program, args),
        });
        let error = run_with(&args(&["--iptables-mode=legacy"]), &runner, &mut Vec::new())
            .expect_err("missing binary");
        assert!(
            error
                .to_string()
                .starts_with("could not run iptables-legacy-restore: "),
            "{error}"
        );
    }

    #[test]
    fn failed_restore_reports_stderr() {
        let runner = FakeRunner::new(|program, args| match program {
            "iptables-restore" => Ok(CmdOutput {
                code: Some(1),
                stdout: String::new(),
                stderr: "iptables-restore: line 21 failed\n".to_owned(),
            }),
            _ => fresh_system(program, args),
        });
        let error = run_with(&args(&[]), &runner, &mut Vec::new()).expect_err("restore fails");
        assert_eq!(
            error.to_string(),
            "`iptables-restore --noflush` failed (exit code 1): iptables-restore: line 21 failed"
        );
    }

    #[test]
    fn unexpected_check_failure_stops_before_restoring() {
        let runner = FakeRunner::new(|program, args| {
            if args.contains(&"-C") {
                Ok(CmdOutput {
                    code: Some(4),
                    stdout: String::new(),
                    stderr: "Another app is currently holding the xtables lock.".to_owned(),
                })
            } else {
                fresh_system(program, args)
            }
        });
        let error = run_with(&args(&[]), &runner, &mut Vec::new()).expect_err("check fails");
        assert_eq!(
            error.to_string(),
            "`iptables -t nat -C PREROUTING -p tcp -j MESH_INBOUND` failed (exit code 4): \
             Another app is currently holding the xtables lock."
        );
        assert!(
            !runner
                .programs()
                .iter()
                .any(|program| program.ends_with("-restore"))
        );
    }

    #[test]
    fn system_runner_feeds_stdin_and_prefixes_commands() {
        let runner = SystemRunner {
            prefix: vec!["env".to_owned()],
        };
        let output = runner
            .run("cat", &[], Some("*nat\nCOMMIT\n"))
            .expect("env and cat exist");
        assert_eq!(output.code, Some(0));
        assert_eq!(output.stdout, "*nat\nCOMMIT\n");
        let missing = SystemRunner::default()
            .run("mesh-proxy-init-no-such-binary", &[], None)
            .expect_err("does not exist");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    // -- Applying for real, inside a throwaway network namespace --------------

    /// A network namespace that is deleted when dropped, even if the test panics.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn create(name: String) -> Result<Self, String> {
            let output = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .map_err(|error| format!("could not run ip: {error}"))?;
            if !output.status.success() {
                return Err(format!(
                    "`ip netns add {name}` failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            Ok(Self { name })
        }

        /// Runs every command inside the namespace, never on the host.
        fn runner(&self) -> SystemRunner {
            SystemRunner {
                prefix: ["ip", "netns", "exec", &self.name]
                    .map(str::to_owned)
                    .to_vec(),
            }
        }

        /// `<save> -t nat` inside the namespace, without comments.
        fn save(&self, save: &str) -> String {
            let output = self
                .runner()
                .run(save, &["-t", "nat"], None)
                .expect("save runs");
            assert!(output.success(), "{save} failed: {}", output.stderr);
            output
                .stdout
                .lines()
                .filter(|line| !line.starts_with('#'))
                .map(|line| format!("{line}\n"))
                .collect()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let deleted = Command::new("ip")
                .args(["netns", "delete", &self.name])
                .status();
            if !deleted.is_ok_and(|status| status.success()) {
                eprintln!("warning: could not delete network namespace {}", self.name);
            }
        }
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
            })
            .unwrap_or(false)
    }

    fn runs(program: &str, args: &[&str]) -> bool {
        SystemRunner::default()
            .run(program, args, None)
            .is_ok_and(|output| output.success())
    }

    /// Why the namespace test cannot run here, if it cannot.
    fn netns_test_blocker(binaries: &[&str]) -> Option<String> {
        if !is_root() {
            return Some("not running as root".to_owned());
        }
        if !runs("ip", &["netns", "list"]) {
            return Some("`ip netns` is not available".to_owned());
        }
        binaries
            .iter()
            .find(|binary| !runs(binary, &["--version"]))
            .map(|binary| format!("{binary} is not installed"))
    }

    /// Applies the rules twice in a new namespace with `mode`, checks them with
    /// `<prefix>-save` / `ip6<prefix>-save`, then re-applies with other flags.
    fn apply_in_namespace(mode: &str, suffix: &str) {
        let save4 = format!("iptables{suffix}-save");
        let save6 = format!("ip6tables{suffix}-save");
        let restore4 = format!("iptables{suffix}-restore");
        let restore6 = format!("ip6tables{suffix}-restore");
        let iptables4 = format!("iptables{suffix}");
        let iptables6 = format!("ip6tables{suffix}");
        let needed = [&save4, &save6, &restore4, &restore6, &iptables4, &iptables6];
        let needed: Vec<&str> = needed.iter().map(|name| name.as_str()).collect();
        if let Some(reason) = netns_test_blocker(&needed) {
            println!("skipping the network namespace test ({mode}): {reason}");
            return;
        }
        let name = format!("meshinit-test-{}{suffix}", std::process::id());
        let ns = match Netns::create(name) {
            Ok(ns) => ns,
            Err(reason) => {
                println!("skipping the network namespace test ({mode}): {reason}");
                return;
            }
        };
        let runner = ns.runner();
        let mode_flag = format!("--iptables-mode={mode}");
        let flags = [
            mode_flag.as_str(),
            "--ipv6",
            "--exclude-inbound-ports=22",
            "--exclude-outbound-ips=10.96.0.0/12,fd00:96::/108",
            "--include-outbound-ports=8443",
        ];
        let init_args = args(&flags);
        assert!(
            chain_lines(&ns.save(&save4), "OUTPUT").is_empty(),
            "the new namespace should start without nat rules"
        );

        run_with(&init_args, &runner, &mut io::sink()).expect("first apply");
        let first_v4 = ns.save(&save4);
        let first_v6 = ns.save(&save6);
        assert_saved_rules(&first_v4, "127.0.0.1/32", "10.96.0.0/12");
        assert_saved_rules(&first_v6, "::1/128", "fd00:96::/108");

        run_with(&init_args, &runner, &mut io::sink()).expect("second apply");
        assert_eq!(
            ns.save(&save4),
            first_v4,
            "applying twice changed the rules"
        );
        assert_eq!(
            ns.save(&save6),
            first_v6,
            "applying twice changed the rules"
        );

        // Other flags replace the chain contents instead of adding to them.
        let narrower = args(&[mode_flag.as_str(), "--inbound-ports=9080"]);
        run_with(&narrower, &runner, &mut io::sink()).expect("third apply");
        let third_v4 = ns.save(&save4);
        assert_eq!(
            chain_lines(&third_v4, "MESH_INBOUND")[4..],
            ["-A MESH_INBOUND -p tcp -m tcp --dport 9080 -j MESH_IN_REDIRECT"]
        );
        assert_eq!(chain_lines(&third_v4, "PREROUTING").len(), 1);
        assert_eq!(
            chain_lines(&third_v4, "MESH_OUTPUT").last(),
            Some(&"-A MESH_OUTPUT -j MESH_REDIRECT")
        );
    }

    /// Checks `iptables-save` output (which reorders matches canonically) for the
    /// rules of [`apply_in_namespace`].
    fn assert_saved_rules(saved: &str, loopback: &str, excluded: &str) {
        assert_eq!(
            chain_lines(saved, "PREROUTING"),
            ["-A PREROUTING -p tcp -j MESH_INBOUND"]
        );
        assert_eq!(
            chain_lines(saved, "OUTPUT"),
            ["-A OUTPUT -p tcp -j MESH_OUTPUT"]
        );
        assert_eq!(
            chain_lines(saved, "MESH_IN_REDIRECT"),
            ["-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"]
        );
        assert_eq!(
            chain_lines(saved, "MESH_REDIRECT"),
            ["-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001"]
        );
        assert_eq!(
            chain_lines(saved, "MESH_INBOUND"),
            [
                "-A MESH_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT",
            ]
        );
        let expected_output = [
            format!(
                "-A MESH_OUTPUT ! -d {loopback} -o lo -m owner --uid-owner 1337 -j MESH_IN_REDIRECT"
            ),
            "-A MESH_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN".to_owned(),
            "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN".to_owned(),
            format!(
                "-A MESH_OUTPUT ! -d {loopback} -o lo -m owner --gid-owner 1337 -j MESH_IN_REDIRECT"
            ),
            "-A MESH_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN".to_owned(),
            "-A MESH_OUTPUT -m owner --gid-owner 1337 -j RETURN".to_owned(),
            format!("-A MESH_OUTPUT -d {loopback} -j RETURN"),
            "-A MESH_OUTPUT -p tcp -m tcp --dport 8443 -j MESH_REDIRECT".to_owned(),
            format!("-A MESH_OUTPUT -d {excluded} -j RETURN"),
            "-A MESH_OUTPUT -j MESH_REDIRECT".to_owned(),
        ];
        assert_eq!(chain_lines(saved, "MESH_OUTPUT"), expected_output);
    }

    #[test]
    fn applies_in_a_network_namespace() {
        apply_in_namespace("auto", "");
    }

    #[test]
    fn applies_in_a_network_namespace_with_legacy_iptables() {
        apply_in_namespace("legacy", "-legacy");
    }
}
