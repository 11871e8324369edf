//! `meshctl analyze`: read files, convert, validate, and report every
//! finding with where it came from.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::convert::{Converted, Output, convert};
use crate::load::{Disposition, Document, Item, disposition, parse_stream};
use crate::resource::{Resource, ResourceKey};
use crate::validate::{Severity, validate_all};

/// One finding of an analysis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// `Kind namespace/name`, when the finding is about a resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Field path, when the finding is about a field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub message: String,
}

impl fmt::Display for Finding {
    /// `vs.yaml:12: error: VirtualService default/reviews: spec.http[1].route: weights must add up to 100, got 90`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)?;
        if let Some(c) = self.column {
            write!(f, ":{c}")?;
        }
        write!(f, ": {}: ", self.severity)?;
        if let Some(r) = &self.resource {
            write!(f, "{r}: ")?;
        }
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// The result of analyzing a set of documents.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    pub findings: Vec<Finding>,
    /// The valid mesh resources found (converted where needed).
    pub resources: Vec<Resource>,
}

impl Analysis {
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }
}

/// A file's name (as the user gave it) and its text.
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Reads `path`: a file, or every `.yaml`/`.yml`/`.json` file below a
/// directory (sorted, so the order is stable).
pub fn read_path(path: &Path) -> std::io::Result<Vec<Source>> {
    let mut files = Vec::new();
    if path.is_dir() {
        collect(path, &mut files)?;
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
            Ok(Source {
                name: f.display().to_string(),
                text,
            })
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses every source into documents, in order.
pub fn parse_sources(sources: &[Source]) -> Vec<Document> {
    sources
        .iter()
        .flat_map(|s| parse_stream(&s.name, &s.text))
        .collect()
}

/// Analyzes documents: unreadable documents, unsupported kinds, conversion
/// notes that change meaning, and every validation problem of the resources
/// alone and as a set. Kubernetes objects (Services, Deployments, …) are
/// not the mesh's to judge and are skipped.
pub fn analyze(docs: Vec<Document>) -> Analysis {
    let mut findings = Vec::new();
    let unsupported: Vec<_> = docs
        .iter()
        .filter_map(|d| match &d.item {
            Item::Other {
                api_version, kind, ..
            } if disposition(api_version, kind) == Disposition::Unsupported => Some(Finding {
                severity: Severity::Warning,
                file: d.origin.file.clone(),
                line: d.origin.line,
                column: None,
                resource: None,
                path: None,
                message: format!("{api_version} {kind} is not supported by the mesh"),
            }),
            _ => None,
        })
        .collect();
    let has_route_rules = docs.iter().any(|d| matches!(d.item, Item::RouteRule(_)));
    let (converted, warnings) = convert(docs);
    findings.extend(unsupported);
    if has_route_rules {
        // Conversion notes about RouteRules change meaning: show them.
        findings.extend(
            warnings
                .into_iter()
                .filter(|w| w.message.starts_with("RouteRule "))
                .map(|w| Finding {
                    severity: Severity::Warning,
                    file: w.origin.file,
                    line: w.origin.line,
                    column: None,
                    resource: None,
                    path: None,
                    message: w.message,
                }),
        );
    }
    let mut resources = Vec::new();
    let mut origins: HashMap<ResourceKey, (String, usize)> = HashMap::new();
    for Converted { origin, item } in converted {
        match item {
            Output::Resource(r) => {
                if let Some((file, line)) = origins.get(&r.key()) {
                    findings.push(Finding {
                        severity: Severity::Error,
                        file: origin.file,
                        line: origin.line,
                        column: None,
                        resource: Some(r.key().to_string()),
                        path: None,
                        message: format!(
                            "defined again (first at {file}:{line}); only one applies"
                        ),
                    });
                    continue;
                }
                origins.insert(r.key(), (origin.file.clone(), origin.line));
                resources.push(*r);
            }
            Output::Invalid(e) => findings.push(Finding {
                severity: Severity::Error,
                file: e.file,
                line: e.line,
                column: Some(e.column),
                resource: None,
                path: None,
                message: e.message,
            }),
            Output::Other(_) => {}
        }
    }
    for p in validate_all(&resources) {
        let (file, line) = origins
            .get(&p.resource)
            .cloned()
            .unwrap_or_else(|| ("-".to_string(), 0));
        findings.push(Finding {
            severity: p.severity,
            file,
            line,
            column: None,
            resource: Some(p.resource.to_string()),
            path: Some(p.path),
            message: p.message,
        });
    }
    Analysis {
        findings,
        resources,
    }
}
