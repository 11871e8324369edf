//! What the node reports of a pod, computed from the agent's own record of
//! its containers: one pure function from that record to the
//! `pods/status` patch.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub code: i32,
    pub reason: String,
    pub message: Option<String>,
    pub started: Timestamp,
    pub finished: Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        since: Timestamp,
    },
    Terminated(Term),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Init,
    Sidecar,
    Main,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ctr {
    pub name: String,
    pub image: String,
    pub kind: Kind,
    pub state: State,
    pub last: Option<Term>,
    pub restarts: i32,
    pub ready: bool,
    pub started: bool,
    pub pid: Option<u32>,
}

impl Ctr {
    pub fn new(name: &str, image: &str, kind: Kind) -> Ctr {
        Ctr {
            name: name.into(),
            image: image.into(),
            kind,
            state: State::Waiting {
                reason: "PodInitializing".into(),
                message: None,
            },
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            pid: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    pub pod_ip: Option<std::net::Ipv4Addr>,
    pub host_ip: std::net::Ipv4Addr,
    pub start: Timestamp,
    pub network_ready: bool,
    pub initialized: bool,
    /// Set when the pod has ended for good or cannot run on this node.
    pub terminal: Option<(String, Option<String>, Option<String>)>,
    pub inits: Vec<Ctr>,
    pub mains: Vec<Ctr>,
}

fn term_json(t: &Term) -> Value {
    json!({"terminated": {
        "exitCode": t.code, "reason": t.reason, "message": t.message,
        "startedAt": t.started.to_string(), "finishedAt": t.finished.to_string(),
    }})
}

fn ctr_json(c: &Ctr) -> Value {
    let state = match &c.state {
        State::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running { since } => json!({"running": {"startedAt": since.to_string()}}),
        State::Terminated(t) => term_json(t),
    };
    let mut v = json!({
        "name": c.name, "image": c.image, "imageID": format!("mesh-node://{}", c.image),
        "ready": c.ready, "started": c.started, "restartCount": c.restarts, "state": state,
        "lastState": c.last.as_ref().map(term_json).unwrap_or_else(|| json!({})),
    });
    if let Some(pid) = c.pid {
        v["containerID"] = json!(format!("mesh-node://{pid}"));
    }
    v
}

pub fn phase(s: &PodState) -> &'static str {
    if let Some((phase, _, _)) = &s.terminal {
        return if phase == "Succeeded" {
            "Succeeded"
        } else if phase == "Failed" {
            "Failed"
        } else {
            "Pending"
        };
    }
    let running = s
        .mains
        .iter()
        .any(|c| matches!(c.state, State::Running { .. }));
    if s.initialized
        && (running
            || s.mains
                .iter()
                .all(|c| c.restarts > 0 || !matches!(c.state, State::Waiting { .. })))
    {
        "Running"
    } else {
        "Pending"
    }
}

/// The strategic-merge patch of `status`: conditions merge by type (the
/// scheduler's PodScheduled stays), container statuses are replaced.
pub fn patch(s: &PodState) -> Value {
    let phase = phase(s);
    let ended = matches!(phase, "Succeeded" | "Failed");
    let sidecars_ready = s
        .inits
        .iter()
        .filter(|c| c.kind == Kind::Sidecar)
        .all(|c| c.ready);
    let containers_ready =
        !ended && s.initialized && sidecars_ready && s.mains.iter().all(|c| c.ready);
    let cond = |t: &str, ok: bool, reason: Option<&str>| {
        json!({"type": t, "status": if ok { "True" } else { "False" }, "reason": reason,
               "lastTransitionTime": Timestamp::now().to_string(), "lastProbeTime": null})
    };
    let not_ready = if ended {
        Some("PodCompleted")
    } else {
        Some("ContainersNotReady")
    };
    let mut status = json!({
        "phase": phase,
        "hostIP": s.host_ip.to_string(),
        "hostIPs": [{"ip": s.host_ip.to_string()}],
        "startTime": s.start.to_string(),
        "conditions": [
            cond("PodReadyToStartContainers", s.network_ready, None),
            cond("Initialized", s.initialized, if s.initialized { None } else { Some("ContainersNotInitialized") }),
            cond("ContainersReady", containers_ready, if containers_ready { None } else { not_ready }),
            cond("Ready", containers_ready, if containers_ready { None } else { not_ready }),
        ],
        "containerStatuses": s.mains.iter().map(ctr_json).collect::<Vec<_>>(),
        "initContainerStatuses": s.inits.iter().map(ctr_json).collect::<Vec<_>>(),
        "qosClass": "BestEffort",
    });
    if let Some(ip) = s.pod_ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if let Some((_, reason, message)) = &s.terminal {
        status["reason"] = json!(reason);
        status["message"] = json!(message);
    }
    json!({ "status": status })
}

/// The patch without its timestamps of the moment: equal when nothing
/// changed, so an unchanged pod is not patched again.
pub fn fingerprint(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(conds) = v["status"]["conditions"].as_array_mut() {
        for c in conds {
            c["lastTransitionTime"] = Value::Null;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodState {
        PodState {
            pod_ip: Some([10, 247, 1, 2].into()),
            host_ip: [10, 247, 0, 1].into(),
            start: Timestamp::UNIX_EPOCH,
            network_ready: true,
            initialized: false,
            terminal: None,
            inits: vec![Ctr::new("mesh-proxy", "mesh/proxy", Kind::Sidecar)],
            mains: vec![Ctr::new("app", "mesh/examples-callme", Kind::Main)],
        }
    }

    #[test]
    fn a_pod_is_ready_when_its_sidecars_and_containers_are() {
        let mut s = pod();
        assert_eq!(phase(&s), "Pending");
        s.initialized = true;
        s.mains[0].state = State::Running {
            since: Timestamp::UNIX_EPOCH,
        };
        s.mains[0].ready = true;
        assert_eq!(phase(&s), "Running");
        assert_eq!(patch(&s)["status"]["conditions"][3]["status"], "False");
        s.inits[0].ready = true;
        let p = patch(&s);
        assert_eq!(p["status"]["conditions"][3]["status"], "True");
        assert_eq!(p["status"]["podIP"], "10.247.1.2");
    }

    #[test]
    fn unchanged_state_has_the_same_fingerprint() {
        let s = pod();
        assert_eq!(fingerprint(&patch(&s)), fingerprint(&patch(&s)));
    }
}
