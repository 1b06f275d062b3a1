//! The API server's audit log, which records every request of the operator's ServiceAccount
//! (see `tests/e2e/control-plane/audit-policy.yaml`): the measuring instrument for least
//! privilege (no 403) and for the operator's writes (none when nothing changed).

use serde_json::Value;

use crate::env;

/// A position in the audit log: [`since`] returns what was logged after it.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize);

/// The current end of the log.
#[must_use]
pub fn mark() -> Mark {
    let text = std::fs::read_to_string(&env().audit_log).unwrap_or_default();
    Mark(text.lines().count())
}

/// Finished requests logged after `mark` (watches also log a ResponseStarted entry, skipped).
#[must_use]
pub fn since(mark: Mark) -> Vec<Value> {
    let text = std::fs::read_to_string(&env().audit_log).unwrap_or_default();
    text.lines()
        .skip(mark.0)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete" || e["stage"] == "Panic")
        .collect()
}

/// Every finished request in the log.
#[must_use]
pub fn all() -> Vec<Value> {
    since(Mark(0))
}

/// Whether `event` changed something (create, update, patch, delete).
#[must_use]
pub fn is_write(event: &Value) -> bool {
    matches!(
        event["verb"].as_str(),
        Some("create" | "update" | "patch" | "delete" | "deletecollection")
    )
}

/// `verb resource[/subresource] namespace/name -> code`, for failure messages.
#[must_use]
pub fn line(event: &Value) -> String {
    let o = &event["objectRef"];
    let sub = o["subresource"]
        .as_str()
        .map(|s| format!("/{s}"))
        .unwrap_or_default();
    format!(
        "{} {}{} {}/{} -> {}",
        event["verb"].as_str().unwrap_or("?"),
        o["resource"].as_str().unwrap_or("?"),
        sub,
        o["namespace"].as_str().unwrap_or(""),
        o["name"].as_str().unwrap_or(""),
        event["responseStatus"]["code"]
    )
}

/// Writes among `events` to objects in `namespace`, as [`line`]s.
#[must_use]
pub fn writes_in(events: &[Value], namespace: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| is_write(e) && e["objectRef"]["namespace"] == namespace)
        .map(line)
        .collect()
}

/// Requests among `events` the authorizer refused, leaving out kubectl's (a test may use the
/// ServiceAccount's token with kubectl to prove that RBAC is enforced). Admission refusals are
/// 403s too (e.g. a create in a namespace being deleted) but not the authorizer's decision.
#[must_use]
pub fn forbidden(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["annotations"]["authorization.k8s.io/decision"] == "forbid")
        .filter(|e| {
            !e["userAgent"]
                .as_str()
                .unwrap_or_default()
                .starts_with("kubectl")
        })
        .map(line)
        .collect()
}

/// Panics listing every request of the operator's ServiceAccount that was forbidden since the
/// control plane started: the chart's RBAC must be sufficient.
pub fn assert_nothing_forbidden() {
    let refused = forbidden(&all());
    assert!(
        refused.is_empty(),
        "the operator made requests its ServiceAccount may not make (the chart's RBAC is \
         insufficient):\n{}",
        refused.join("\n")
    );
}

/// Whether a watch on `resource` started after `mark` (the operator's informer is live).
#[must_use]
pub fn watch_started(mark: Mark, resource: &str) -> bool {
    let text = std::fs::read_to_string(&env().audit_log).unwrap_or_default();
    text.lines()
        .skip(mark.0)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|e| {
            e["stage"] == "ResponseStarted"
                && e["verb"] == "watch"
                && e["objectRef"]["resource"] == resource
        })
}
