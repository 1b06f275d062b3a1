//! The generated API key Secret, when the spec names none.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rand::RngCore;

use super::Identity;
use crate::crd::WsCluster;
use crate::names::{self, API_KEY_SECRET_KEY};

/// A Secret holding a fresh random API key, or `None` when `spec.apiKeySecretRef` is set.
///
/// The controller creates it only when missing and never re-applies it: the key must survive
/// reconciles, or every backend would lose access.
#[must_use]
pub fn api_key_secret(wsc: &WsCluster, id: &Identity) -> Option<Secret> {
    if wsc.spec.api_key_secret_ref.is_some() {
        return None;
    }
    Some(Secret {
        metadata: id.child_meta(&names::api_key_secret_name(&id.name)),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            API_KEY_SECRET_KEY.to_owned(),
            ByteString(random_key().into_bytes()),
        )])),
        ..Secret::default()
    })
}

/// 32 bytes from the thread's CSPRNG, hex-encoded (64 characters, safe in an HTTP header).
fn random_key() -> String {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{SecretKeyRef, WsClusterSpec};
    use crate::resources::testing::{assert_owned_and_labelled, cluster, id};

    #[test]
    fn generated_api_key_secret_holds_a_random_64_char_hex_key() {
        let wsc = cluster(WsClusterSpec::default());
        let s = api_key_secret(&wsc, &id(&wsc)).expect("secret");
        assert_eq!(s.metadata.name.as_deref(), Some("chat-api-key"));
        assert_owned_and_labelled(&s.metadata);
        let key = s.data.and_then(|d| d.get("key").cloned()).expect("key").0;
        assert_eq!(key.len(), 64);
        assert!(key.iter().all(u8::is_ascii_hexdigit));
        let again = api_key_secret(&wsc, &id(&wsc))
            .and_then(|s| s.data)
            .expect("data");
        assert_ne!(again["key"].0, key, "two keys must differ");
    }

    #[test]
    fn no_secret_is_generated_when_the_spec_names_one() {
        let wsc = cluster(WsClusterSpec {
            api_key_secret_ref: Some(SecretKeyRef {
                name: "mine".into(),
                key: "k".into(),
            }),
            ..WsClusterSpec::default()
        });
        assert!(api_key_secret(&wsc, &id(&wsc)).is_none());
    }
}
