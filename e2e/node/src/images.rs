//! Images are this project's binaries: one table maps an image to the
//! program it would run, and an image with no entry is an error the pod
//! reports (`ErrImagePull`), never something else run in its place.

use std::path::{Path, PathBuf};

/// What an image runs: its entrypoint (program and leading arguments) and
/// the programs it contains (what a container's `command` may name).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub entrypoint: Vec<String>,
    pub programs: Vec<&'static str>,
}

/// The table: image repository (without registry or tag) → binary and
/// arguments.
const TABLE: &[(&str, &str, &[&str])] = &[
    ("mesh/proxy", "mesh-proxy", &[]),
    ("mesh/pilot", "mesh-pilot", &[]),
    ("mesh/injector", "mesh-injector", &[]),
    (
        "mesh/examples-bookinfo-productpage",
        "mesh-sample",
        &["productpage"],
    ),
    (
        "mesh/examples-bookinfo-details",
        "mesh-sample",
        &["details"],
    ),
    (
        "mesh/examples-bookinfo-reviews",
        "mesh-sample",
        &["reviews"],
    ),
    (
        "mesh/examples-bookinfo-ratings",
        "mesh-sample",
        &["ratings"],
    ),
    ("mesh/examples-callme", "mesh-sample", &["callme"]),
    ("mesh/examples-caller", "mesh-sample", &["caller"]),
];

/// `registry.example:5000/mesh/proxy:0.1.0@sha256:…` → `mesh/proxy`.
pub fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    // A tag is a colon after the last slash.
    let image = match (image.rfind(':'), image.rfind('/')) {
        (Some(c), Some(s)) if c > s => &image[..c],
        (Some(c), None) => &image[..c],
        _ => image,
    };
    match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest
        }
        _ => image,
    }
}

pub fn lookup(image: &str, bin_dir: &Path) -> Result<Image, String> {
    let repo = repository(image);
    let (_, program, args) = TABLE.iter().find(|(r, _, _)| *r == repo).ok_or_else(|| {
        format!("image {image:?} is not known to this node: no binary maps to repository {repo:?}")
    })?;
    let mut entrypoint = vec![bin_dir.join(program).to_string_lossy().into_owned()];
    entrypoint.extend(args.iter().map(|a| a.to_string()));
    Ok(Image {
        entrypoint,
        programs: vec![program],
    })
}

/// The program a container's `command[0]` names: one of the image's own
/// binaries (by name or any path ending in it), else a host program (the
/// images share the host's `/usr`, e.g. `sh` or `cat` in exec probes).
pub fn program(image: &Image, bin_dir: &Path, name: &str) -> Result<PathBuf, String> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if image.programs.contains(&base) {
        return Ok(bin_dir.join(base));
    }
    if name.contains('/') {
        if Path::new(name).is_file() {
            return Ok(PathBuf::from(name));
        }
        return Err(format!("{name}: no such file in the image"));
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    path.split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name}: executable file not found in $PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_drop_registry_tag_and_digest() {
        assert_eq!(repository("mesh/proxy:0.1.0"), "mesh/proxy");
        assert_eq!(repository("localhost:5000/mesh/proxy:0.1.0"), "mesh/proxy");
        assert_eq!(repository("ghcr.io/mesh/pilot@sha256:00"), "mesh/pilot");
        assert_eq!(repository("mesh/examples-callme"), "mesh/examples-callme");
        assert_eq!(repository("nginx"), "nginx");
    }

    #[test]
    fn unknown_images_are_refused_with_the_repository() {
        let e = lookup("nginx:1.27", Path::new("/bin")).unwrap_err();
        assert!(e.contains("\"nginx\""), "{e}");
        let i = lookup("mesh/examples-bookinfo-reviews:latest", Path::new("/b")).unwrap();
        assert_eq!(i.entrypoint, ["/b/mesh-sample", "reviews"]);
        assert_eq!(
            program(&i, Path::new("/b"), "/usr/local/bin/mesh-sample").unwrap(),
            Path::new("/b/mesh-sample")
        );
    }
}
