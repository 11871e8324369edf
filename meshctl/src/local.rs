//! The local mesh (`meshctl demo`) as other commands find it: a state file
//! under `$MESH_HOME` (default `~/.mesh`) naming its pilot and its config
//! directory, and `apply`, `delete` and `get` against it. Config lives as
//! one file per resource in the directory pilot's files source watches.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mesh_api::analysis::{self, Source};
use mesh_api::convert::{Output, convert};
use mesh_api::load::{Item, disposition};
use mesh_api::validate::Severity;
use mesh_api::{Kind, Resource, ResourceKey};
use serde::{Deserialize, Serialize};

/// What a running local mesh writes for other commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    /// The directory pilot reads.
    pub config: PathBuf,
    /// Pilot's status port (HOST:PORT).
    pub status: String,
    pub xds: String,
    /// The ingress gateway (HOST:PORT).
    pub gateway: String,
    /// Each proxy's admin address (HOST:PORT) by workload name.
    #[serde(default)]
    pub admin: std::collections::BTreeMap<String, String>,
}

/// `$MESH_HOME`, or `~/.mesh`.
pub fn home() -> PathBuf {
    match std::env::var_os("MESH_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".mesh"),
    }
}

pub fn state_path() -> PathBuf {
    home().join("demo").join("state.json")
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The running local mesh, if any (a state file left by one that died is
/// ignored).
pub fn find() -> Option<State> {
    let text = std::fs::read_to_string(state_path()).ok()?;
    let state: State = serde_json::from_str(&text).ok()?;
    alive(state.pid).then_some(state)
}

fn require() -> Result<State> {
    find().ok_or_else(|| {
        anyhow::anyhow!(
            "no local mesh is running (start one with `meshctl demo`; state is kept in {})",
            state_path().display()
        )
    })
}

/// Pilot's status address: the flag or `MESH_PILOT`, else the local mesh's,
/// else the default.
pub fn pilot_addr(given: Option<String>) -> String {
    given
        .or_else(|| find().map(|s| s.status))
        .unwrap_or_else(|| crate::pilot::DEFAULT_ADDR.to_string())
}

/// The file that holds one resource.
pub fn resource_file(dir: &Path, key: &ResourceKey) -> PathBuf {
    dir.join(format!(
        "{}.{}.{}.yaml",
        key.kind.plural(),
        key.namespace,
        key.name
    ))
}

/// Writes a resource as its own file (atomically: pilot never reads half
/// of it). Says whether it was created, changed or unchanged.
pub fn write_resource(dir: &Path, r: &Resource) -> Result<&'static str> {
    let path = resource_file(dir, &r.key());
    let yaml = serde_yaml::to_string(r)?;
    let before = std::fs::read_to_string(&path).ok();
    if before.as_deref() == Some(yaml.as_str()) {
        return Ok("unchanged");
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, &yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(if before.is_some() {
        "configured"
    } else {
        "created"
    })
}

/// `kind.group/name`, as kubectl prints it.
fn display(key: &ResourceKey) -> String {
    let group = key.kind.api_version().split('/').next().unwrap_or_default();
    format!(
        "{}.{group}/{}",
        key.kind.name().to_ascii_lowercase(),
        key.name
    )
}

/// `meshctl apply -f`: validates the resources together with the config
/// already applied (so a route may name a subset defined earlier), then
/// writes them; if anything in them is invalid nothing is written.
/// Documents that are not mesh config are reported and skipped.
pub fn apply(sources: &[Source], out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let state = require()?;
    let docs = analysis::parse_sources(sources);
    for d in &docs {
        if let Item::Other {
            api_version, kind, ..
        } = &d.item
            && disposition(api_version, kind) == mesh_api::load::Disposition::Foreign
        {
            writeln!(
                err,
                "{}: skipped {api_version} {kind}: the local mesh runs its own workloads",
                d.origin
            )?;
        }
    }
    let (converted, _) = convert(docs.clone());
    let keys: Vec<ResourceKey> = converted
        .iter()
        .filter_map(|c| match &c.item {
            Output::Resource(r) => Some(r.key()),
            _ => None,
        })
        .collect();
    if keys.is_empty()
        && !converted
            .iter()
            .any(|c| matches!(c.item, Output::Invalid(_)))
    {
        bail!("no mesh resources found");
    }
    // What is applied already, except what these replace.
    let replaced: Vec<PathBuf> = keys
        .iter()
        .map(|k| resource_file(&state.config, k))
        .collect();
    let existing: Vec<Source> = analysis::read_path(&state.config)
        .with_context(|| format!("reading {}", state.config.display()))?
        .into_iter()
        .filter(|s| !replaced.iter().any(|p| Path::new(&s.name) == p))
        .collect();
    let mut all = analysis::parse_sources(&existing);
    all.extend(docs);
    let result = analysis::analyze(all);
    let given: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    let mine: Vec<_> = result
        .findings
        .iter()
        .filter(|f| given.contains(&f.file.as_str()))
        .collect();
    let errors = mine
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    for f in &mine {
        writeln!(err, "{f}")?;
    }
    if errors > 0 {
        bail!("{errors} error(s); nothing was applied");
    }
    let mut expect = Vec::new();
    for r in result.resources.iter().filter(|r| keys.contains(&r.key())) {
        let what = write_resource(&state.config, r)?;
        writeln!(out, "{} {what}", display(&r.key()))?;
        expect.push((r.key(), Some(r.to_json()["spec"].clone())));
    }
    wait_served(&state, &expect, err)
}

/// Waits (5 s at most) until pilot serves what was written: each resource
/// with its spec, or gone. Proxies get it within milliseconds after.
fn wait_served(
    state: &State,
    expect: &[(ResourceKey, Option<serde_json::Value>)],
    err: &mut dyn Write,
) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Ok(body) = crate::pilot::get(&state.status, "/debug/configz")
            && let Ok(all) = serde_json::from_slice::<serde_json::Value>(&body)
        {
            let served = all["config"].as_array().cloned().unwrap_or_default();
            let find = |k: &ResourceKey| {
                served.iter().find(|r| {
                    r["kind"] == k.kind.name()
                        && r["metadata"]["name"] == k.name.as_str()
                        && r["metadata"]["namespace"] == k.namespace.as_str()
                })
            };
            if expect
                .iter()
                .all(|(k, spec)| find(k).map(|r| &r["spec"]) == spec.as_ref())
            {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            writeln!(
                err,
                "warning: pilot at {} does not serve the change yet; its log says why",
                state.status
            )?;
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `meshctl delete -f`: removes the resources the files name.
pub fn delete(sources: &[Source], out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let state = require()?;
    let docs = analysis::parse_sources(sources);
    let (converted, _) = convert(docs);
    let mut missing = 0;
    let mut any = false;
    let mut expect = Vec::new();
    for c in converted {
        let Output::Resource(r) = c.item else {
            continue;
        };
        any = true;
        let key = r.key();
        match std::fs::remove_file(resource_file(&state.config, &key)) {
            Ok(()) => {
                writeln!(out, "{} deleted", display(&key))?;
                expect.push((key, None));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing += 1;
                writeln!(err, "error: {} not found", display(&key))?;
            }
            Err(e) => return Err(e).context(format!("deleting {}", display(&key))),
        }
    }
    if !any {
        bail!("no mesh resources found");
    }
    wait_served(&state, &expect, err)?;
    if missing > 0 {
        bail!("{missing} resource(s) not found");
    }
    Ok(())
}

/// How `get` prints.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GetFormat {
    Table,
    Yaml,
    Json,
}

/// `meshctl get KIND [NAME]`: what pilot serves, from `/debug/configz`.
pub fn get(
    pilot: &str,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    format: GetFormat,
    out: &mut dyn Write,
) -> Result<()> {
    let Some(kind) = Kind::lookup(kind) else {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
        bail!(
            "unknown resource type {kind:?}; one of: {}",
            known.join(", ")
        );
    };
    let body = crate::pilot::get(pilot, "/debug/configz")?;
    let all: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("pilot at {pilot} sent an unreadable /debug/configz"))?;
    let items: Vec<&serde_json::Value> = all["config"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["kind"] == kind.name())
        .filter(|r| namespace.is_none_or(|ns| r["metadata"]["namespace"] == ns))
        .filter(|r| name.is_none_or(|n| r["metadata"]["name"] == n))
        .collect();
    if let Some(n) = name
        && items.is_empty()
    {
        bail!("{} {n:?} not found", kind.name());
    }
    match format {
        GetFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &items)?;
            writeln!(out)?;
        }
        GetFormat::Yaml => {
            for (i, r) in items.iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                out.write_all(serde_yaml::to_string(r)?.as_bytes())?;
            }
        }
        GetFormat::Table => {
            if items.is_empty() {
                writeln!(out, "No {} found.", kind.plural())?;
                return Ok(());
            }
            let heads = columns(kind);
            let mut rows = vec![
                ["NAMESPACE", "NAME"]
                    .into_iter()
                    .chain(heads)
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            ];
            for r in items {
                let mut row = vec![
                    r["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string(),
                    r["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ];
                row.extend(cells(kind, &r["spec"]));
                rows.push(row);
            }
            crate::status::write_rows(&rows, out)?;
        }
    }
    Ok(())
}

/// Columns `get` shows for a kind, after namespace and name.
fn columns(kind: Kind) -> Vec<&'static str> {
    match kind {
        Kind::VirtualService => vec!["GATEWAYS", "HOSTS"],
        Kind::DestinationRule => vec!["HOST", "SUBSETS"],
        Kind::ServiceEntry => vec!["HOSTS"],
        _ => vec![],
    }
}

fn cells(kind: Kind, spec: &serde_json::Value) -> Vec<String> {
    let list = |v: &serde_json::Value, field: Option<&str>| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| match field {
                        Some(f) => x[f].as_str(),
                        None => x.as_str(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    match kind {
        Kind::VirtualService => vec![list(&spec["gateways"], None), list(&spec["hosts"], None)],
        Kind::DestinationRule => vec![
            spec["host"].as_str().unwrap_or_default().to_string(),
            list(&spec["subsets"], Some("name")),
        ],
        Kind::ServiceEntry => vec![list(&spec["hosts"], None)],
        _ => vec![],
    }
}
