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

    /// Whether retrying later may succeed. API errors are (conflicts, throttling, a restarting
    /// API server); malformed objects are not and wait for the next change instead.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Kube(_))
    }
}
