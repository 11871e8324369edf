//! `mesh-node launch SPEC`: the first process of a container. Started by
//! `ip netns exec <pod>`, so it is in the pod's network namespace and in a
//! mount namespace of its own; it bind-mounts the pod's volumes at their
//! paths, takes the container's user, group and working directory, and
//! becomes the container's program.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use nix::mount::{MsFlags, mount};
use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub working_dir: Option<PathBuf>,
}

/// Never returns on success (the process becomes the program).
pub fn launch(spec_file: &std::path::Path) -> anyhow::Error {
    match run(spec_file) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn run(spec_file: &std::path::Path) -> anyhow::Result<std::convert::Infallible> {
    use anyhow::Context;
    let text = std::fs::read(spec_file).with_context(|| format!("{}", spec_file.display()))?;
    let spec: Spec = serde_json::from_slice(&text).context("container spec")?;
    for m in &spec.mounts {
        if m.source.is_dir() {
            std::fs::create_dir_all(&m.target)
        } else {
            if let Some(parent) = m.target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&m.target)
                .map(|_| ())
        }
        .with_context(|| format!("mount point {}", m.target.display()))?;
        mount(
            Some(&m.source),
            &m.target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("mount {} at {}", m.source.display(), m.target.display()))?;
        if m.read_only {
            mount(
                None::<&str>,
                &m.target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .with_context(|| format!("read-only {}", m.target.display()))?;
        }
    }
    if let Some(dir) = &spec.working_dir {
        std::fs::create_dir_all(dir).ok();
        std::env::set_current_dir(dir).with_context(|| format!("workingDir {}", dir.display()))?;
    }
    if let Some(gid) = spec.gid.or(spec.uid) {
        setgroups(&[]).context("setgroups")?;
        setgid(Gid::from_raw(gid)).context("setgid")?;
    }
    if let Some(uid) = spec.uid {
        setuid(Uid::from_raw(uid)).context("setuid")?;
    }
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("the container has no command"))?;
    let e = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .exec();
    Err(anyhow::anyhow!("exec {program}: {e}"))
}
