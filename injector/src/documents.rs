//! `meshctl kube-inject`'s document handling: find the pod template of
//! each workload in a multi-document YAML stream and inject it with the
//! same patch the webhook sends ([`crate::inject_pod`]), so fields the
//! Kubernetes types here do not know come out as they went in. Input is a
//! user's file: whatever its shape, the answer is a document or an error
//! naming the document and the field, never a panic.

use serde::Deserialize;
use serde_yaml::Value;

use crate::{Cluster, Settings};

/// Where a kind keeps its pod template, as a path of keys.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// A document that could not be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("document {index} ({kind} {name}): {message}")]
pub struct DocumentError {
    /// 1-based.
    pub index: usize,
    pub kind: String,
    pub name: String,
    pub message: String,
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The mapping at `path` (`metadata`-and-`spec` of a pod template), or
/// what is wrong on the way there.
fn template_mut<'a>(doc: &'a mut Value, path: &[&str]) -> Result<&'a mut Value, String> {
    let mut at = doc;
    let mut walked = String::new();
    for key in path {
        let Value::Mapping(map) = at else {
            return Err(format!(
                "{walked}: expected a mapping, got {}",
                describe(at)
            ));
        };
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(key);
        at = match map.get_mut(*key) {
            Some(v) if !v.is_null() => v,
            _ => return Err(format!("{walked}: missing")),
        };
    }
    if !at.is_mapping() {
        return Err(format!(
            "{}: expected a mapping, got {}",
            if walked.is_empty() {
                "the document"
            } else {
                &walked
            },
            describe(at)
        ));
    }
    Ok(at)
}

/// `meshctl kube-inject`: injects every workload of a multi-document YAML
/// stream (Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
/// CronJobs, ReplicationControllers); every other document comes out
/// unchanged, in the same order.
pub fn inject_documents(
    text: &str,
    settings: &Settings,
    cluster: Cluster,
) -> Result<String, DocumentError> {
    let mut out = String::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |kind: &str, name: &str, message: String| DocumentError {
            index: i + 1,
            kind: kind.to_string(),
            name: name.to_string(),
            message,
        };
        let mut value =
            Value::deserialize(doc).map_err(|e| fail("?", "?", format!("not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(path) = template_path(&kind) {
            let template = template_mut(&mut value, path).map_err(|m| fail(&kind, &name, m))?;
            let prefix = if path.is_empty() {
                String::new()
            } else {
                format!("{}.", path.join("."))
            };
            inject_template(template, settings, cluster)
                .map_err(|m| fail(&kind, &name, format!("{prefix}{m}")))?;
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml::to_string(&value).map_err(|e| fail(&kind, &name, e.to_string()))?,
        );
    }
    Ok(out)
}

/// Injects one pod template (a mapping with `metadata` and `spec`) in
/// place; a template injection leaves alone is not rewritten at all.
fn inject_template(
    template: &mut Value,
    settings: &Settings,
    cluster: Cluster,
) -> Result<(), String> {
    let pod = serde_json::to_value(&*template).map_err(|e| format!("not a pod template: {e}"))?;
    let (meta, spec) = crate::parse_pod(&pod).map_err(|e| e.to_string())?;
    let patched =
        crate::inject_pod(&pod, &meta, &spec, settings, cluster).map_err(|e| e.to_string())?;
    if !patched.patch.is_empty() {
        *template = serde_yaml::to_value(&patched.pod).map_err(|e| e.to_string())?;
    }
    Ok(())
}
