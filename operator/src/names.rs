//! Names, labels and the effective Redis key prefix of a WsCluster's children.
//!
//! Pure functions of the WsCluster's name, namespace and spec, so every builder and the status
//! agree on them and tests can check them as data.

use std::collections::BTreeMap;

/// Value of `app.kubernetes.io/name` on everything the operator creates.
pub const APP_NAME: &str = "wsgate";
/// Value of `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "wsgate-operator";
/// Server-side apply field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "wsgate-operator";
/// Key under which the generated API key Secret stores the key.
pub const API_KEY_SECRET_KEY: &str = "key";
/// Longest key prefix the gateway accepts.
pub const MAX_KEY_PREFIX_LEN: usize = 64;

/// Labels every pod of a cluster can be selected by. Only name and instance: selectors are
/// immutable on Deployments, so nothing that might change (version, component) goes in here.
#[must_use]
pub fn selector_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
    ])
}

/// Labels on every child object and pod.
#[must_use]
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster);
    labels.insert(
        "app.kubernetes.io/component".to_owned(),
        "gateway".to_owned(),
    );
    labels.insert("app.kubernetes.io/part-of".to_owned(), APP_NAME.to_owned());
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        MANAGED_BY.to_owned(),
    );
    labels
}

/// The selector as the string the scale subresource and `kubectl` expect
/// (`app.kubernetes.io/instance=chat,app.kubernetes.io/name=wsgate`).
#[must_use]
pub fn selector_string(cluster: &str) -> String {
    selector_labels(cluster)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Name of the Secret the operator generates when `spec.apiKeySecretRef` is unset.
#[must_use]
pub fn api_key_secret_name(cluster: &str) -> String {
    format!("{cluster}-api-key")
}

/// Whether `prefix` is a key prefix the gateway accepts: 1..=64 of `a-z A-Z 0-9 _ : . -`.
#[must_use]
pub fn is_valid_key_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_KEY_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
}

/// The key prefix derived from namespace and name: `{namespace}.{name}`.
///
/// A namespace is a DNS label and never contains a dot, so the first dot separates the two and
/// two clusters never derive the same prefix. When the result is longer than 64 characters it is
/// cut and a stable hash of the full value appended, which keeps it unique in practice.
#[must_use]
pub fn default_key_prefix(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}.{name}");
    if full.len() <= MAX_KEY_PREFIX_LEN {
        return full;
    }
    let hash = format!("{:016x}", fnv1a64(full.as_bytes()));
    // Namespaces and names are ASCII (DNS rules), so byte slicing is on char boundaries; `get`
    // keeps this panic-free even if that ever changed.
    let keep = MAX_KEY_PREFIX_LEN - hash.len() - 1;
    let head = full.get(..keep).unwrap_or(namespace);
    format!("{head}-{hash}")
}

/// FNV-1a: tiny, stable across Rust releases (unlike `DefaultHasher`), good enough to tell names
/// apart.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_key_prefix_joins_namespace_and_name_with_a_dot() {
        assert_eq!(default_key_prefix("apps", "chat"), "apps.chat");
    }

    #[test]
    fn clusters_whose_names_differ_only_by_where_the_dash_falls_get_different_prefixes() {
        assert_ne!(
            default_key_prefix("a-b", "c"),
            default_key_prefix("a", "b-c")
        );
    }

    #[test]
    fn long_default_key_prefixes_are_shortened_to_a_valid_unique_prefix() {
        let ns = "n".repeat(63);
        let a = default_key_prefix(&ns, &"x".repeat(50));
        let b = default_key_prefix(&ns, &"y".repeat(50));
        assert_eq!(a.len(), MAX_KEY_PREFIX_LEN);
        assert!(is_valid_key_prefix(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn key_prefix_rules_match_the_gateway() {
        assert!(is_valid_key_prefix("apps-chat:v1.2_x"));
        assert!(!is_valid_key_prefix(""));
        assert!(!is_valid_key_prefix("has space"));
        assert!(!is_valid_key_prefix("slash/no"));
        assert!(!is_valid_key_prefix(&"a".repeat(65)));
    }

    #[test]
    fn selector_string_lists_only_name_and_instance() {
        assert_eq!(
            selector_string("chat"),
            "app.kubernetes.io/instance=chat,app.kubernetes.io/name=wsgate"
        );
    }
}
