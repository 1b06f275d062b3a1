//! The operator's error type and its retry policy.

/// Everything that can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API request failed.
    #[error("kubernetes api request failed")]
    Kube(#[source] kube::Error),

    /// The WsCluster lacks metadata every object read from the API server has.
    #[error("wscluster has no {0}")]
    MissingObjectKey(&'static str),

    /// A child object could not be turned into JSON.
    #[error("cannot serialize child object")]
    Serialize(#[source] serde_json::Error),
}

/// Result alias with [`enum@Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Self::Kube(error)
    }
}

impl Error {
    /// Closed label value for `wsgate_operator_reconcile_total{result}` and logs.
    #[must_use]
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "api_error",
            Self::MissingObjectKey(_) => "missing_metadata",
            Self::Serialize(_) => "serialize_error",
        }
    }

    /// The message with every source after it (`a: b: c`), for logs: the top-level message
    /// alone ("kubernetes api request failed") does not say what the API server answered.
    #[must_use]
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// Whether retrying later may succeed. API errors are (conflicts, throttling, a restarting
    /// API server); malformed objects are not and wait for the next change instead.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Kube(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_text_carries_the_api_server_answer() {
        let status = kube::core::Status::failure(
            "secrets is forbidden: unable to create new content in namespace apps because it is being terminated",
            "Forbidden",
        )
        .with_code(403);
        let error = Error::from(kube::Error::Api(Box::new(status)));
        let text = error.chain();
        assert!(
            text.starts_with("kubernetes api request failed: "),
            "{text}"
        );
        assert!(text.contains("being terminated"), "{text}");
    }
}
