//! `meshctl proxy-status`: which version of its config each proxy runs.

use std::io::Write;

use anyhow::{Context, Result, bail};
use mesh_api::sync::{ProxyStatus, SyncState};

use crate::Format;

/// The resource types, as the `Type/` prefix of resource keys and as
/// column headings.
const TYPES: [(&str, &str); 3] = [
    ("Workload", "WORKLOAD"),
    ("Destination", "DESTINATIONS"),
    ("Cluster", "CLUSTERS"),
];

pub fn proxy_status(
    pilot: &str,
    proxy: Option<&str>,
    output: Format,
    out: &mut dyn Write,
) -> Result<()> {
    let body = crate::pilot::get(pilot, "/debug/syncz")?;
    let mut proxies: Vec<ProxyStatus> = serde_json::from_slice(&body)
        .with_context(|| format!("pilot at {pilot} sent an unreadable /debug/syncz"))?;
    proxies.sort_by(|a, b| a.proxy.cmp(&b.proxy));
    if let Some(name) = proxy {
        proxies.retain(|p| p.proxy == name || p.workload == name);
        if proxies.is_empty() {
            bail!("no proxy named {name:?} is connected to pilot at {pilot}");
        }
    }
    match output {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, &proxies)?;
            writeln!(out)?;
        }
        Format::Text if proxy.is_some() => {
            for p in &proxies {
                detail(p, out)?;
            }
        }
        Format::Text => table(&proxies, out)?,
    }
    Ok(())
}

/// One row per proxy; after the table, every rejection with its error.
fn table(proxies: &[ProxyStatus], out: &mut dyn Write) -> Result<()> {
    let mut rows = vec![vec![
        "PROXY".to_string(),
        "WORKLOAD".into(),
        "MODE".into(),
        "STATE".into(),
    ]];
    rows[0].extend(TYPES.iter().map(|(_, h)| h.to_string()));
    rows[0].push("VERSION".into());
    for p in proxies {
        let mut row = vec![
            p.proxy.clone(),
            p.workload.clone(),
            p.mode.clone(),
            p.state.to_string(),
        ];
        for (ty, _) in TYPES {
            let n = p
                .resources
                .keys()
                .filter(|k| k.strip_prefix(ty).is_some_and(|r| r.starts_with('/')))
                .count();
            row.push(match p.state_of(Some(ty)) {
                None => "NOT SENT".into(),
                Some(s) => format!("{s} ({n})"),
            });
        }
        row.push(p.proxy_version.clone());
        rows.push(row);
    }
    write_rows(&rows, out)?;
    if proxies.is_empty() {
        writeln!(out, "(no proxies connected)")?;
    }
    for p in proxies {
        for (name, r) in &p.resources {
            if let Some(err) = &r.nack {
                writeln!(out, "{} rejected {name} version {}: {err}", p.proxy, r.sent)?;
            }
        }
    }
    Ok(())
}

/// Every resource of one proxy.
fn detail(p: &ProxyStatus, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "Proxy {} ({} {}, version {}): {}",
        p.proxy, p.workload, p.mode, p.proxy_version, p.state
    )?;
    let mut rows = vec![vec![
        "RESOURCE".to_string(),
        "SENT".into(),
        "ACKNOWLEDGED".into(),
        "STATE".into(),
    ]];
    for (name, r) in &p.resources {
        let state = r.state();
        rows.push(vec![
            name.clone(),
            if r.sent.is_empty() {
                "(removed)".into()
            } else {
                r.sent.clone()
            },
            r.acked.clone().unwrap_or_else(|| "-".into()),
            match (&r.nack, state) {
                (Some(err), SyncState::Nacked) => format!("NACKED: {err}"),
                _ => state.to_string(),
            },
        ]);
    }
    write_rows(&rows, out)
}

pub(crate) fn write_rows(rows: &[Vec<String>], out: &mut dyn Write) -> Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}
