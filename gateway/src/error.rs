//! Errors, and the one place that maps each to its HTTP status, JSON code and metric label.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::broker::BrokerError;
use crate::types::InvalidName;

/// Crate-wide result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors that stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration setting is invalid.
    #[error("invalid {setting}: {message}")]
    Config {
        setting: &'static str,
        message: String,
    },
    /// A socket could not be bound or accepted on.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The broker failed to start.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    /// A topic given to the library API is invalid.
    #[error("invalid topic: topic {0}")]
    InvalidTopic(InvalidName),
    /// The socket is not connected to this instance.
    #[error("socket {0} is not connected to this instance")]
    NotConnected(crate::types::SocketId),
    /// The connection is at its topic limit.
    #[error("the connection is at its topic limit")]
    TooManyTopics,
}

/// Why a client's WebSocket message was rejected (sent as an error envelope; the connection
/// stays open).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("message is not valid JSON")]
    InvalidJson,
    #[error("message must be a JSON object with a string \"type\"")]
    InvalidMessage,
    #[error("unknown message type")]
    UnknownType,
    #[error("\"room\" is required")]
    MissingRoom,
    #[error("invalid room: {0}")]
    InvalidTopic(InvalidName),
    #[error("this room is reserved and cannot be joined")]
    ReservedTopic,
    #[error("\"id\" must be a string or a number")]
    InvalidId,
    #[error("message of {len} bytes is larger than the {max}-byte limit")]
    MessageTooLarge { len: u64, max: usize },
    #[error("a connection may join at most {0} rooms")]
    TooManyTopics(usize),
    #[error("binary messages from clients are not supported")]
    UnsupportedBinary,
    #[error("too many messages: at most {0} per second")]
    RateLimited(u32),
    #[error("joined on this instance, but the broker did not confirm the subscription: {0}")]
    Broker(String),
    #[error("\"since\" must be {{}} or {{\"offset\":<integer>,\"epoch\":\"<epoch>\"}}")]
    InvalidSince,
    #[error("{}", .0.message())]
    Unauthorized(crate::auth::AuthFailure),
    #[error("authenticate first: {{\"type\":\"auth.authenticate\",\"token\":\"…\"}}")]
    AuthenticateFirst,
    #[error("this connection may not join this room")]
    Forbidden,
}

impl ClientError {
    /// The stable snake_case code sent to the client (and used as a metric label).
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::InvalidJson => "invalid_json",
            ClientError::InvalidMessage => "invalid_message",
            ClientError::UnknownType => "unknown_type",
            ClientError::MissingRoom => "missing_room",
            ClientError::InvalidTopic(_) => "invalid_topic",
            ClientError::ReservedTopic => "reserved_topic",
            ClientError::InvalidId => "invalid_id",
            ClientError::MessageTooLarge { .. } => "message_too_large",
            ClientError::TooManyTopics(_) => "too_many_topics",
            ClientError::UnsupportedBinary => "unsupported_binary",
            ClientError::RateLimited(_) => "rate_limited",
            ClientError::Broker(_) => "broker_unavailable",
            ClientError::InvalidSince => "invalid_since",
            ClientError::Unauthorized(_) | ClientError::AuthenticateFirst => "unauthorized",
            ClientError::Forbidden => "forbidden",
        }
    }

    /// Every code, for metric initialisation and docs.
    pub const CODES: &'static [&'static str] = &[
        "invalid_json",
        "invalid_message",
        "unknown_type",
        "missing_room",
        "invalid_topic",
        "reserved_topic",
        "invalid_id",
        "message_too_large",
        "too_many_topics",
        "unsupported_binary",
        "rate_limited",
        "broker_unavailable",
        "invalid_since",
        "unauthorized",
        "forbidden",
    ];
}

/// An HTTP API error: rendered as `{"error":{"code","message"}}` with its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("missing or malformed Authorization header; expected \"Bearer <api key>\"")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    #[error("body larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("unsupported content type; use application/json or application/octet-stream")]
    UnsupportedMediaType,
    #[error("broker unavailable: {0}")]
    BrokerUnavailable(String),
    #[error("broker did not confirm in time; the message may or may not have been delivered")]
    BrokerTimeout,
    #[error("the gateway is shutting down")]
    Draining,
    #[error("connection limit reached")]
    ConnectionLimit,
    /// A WebSocket upgrade whose token was refused.
    #[error("{}", .0.message())]
    TokenRefused(crate::auth::AuthFailure),
}

/// The code of an [`ApiError`] response, left in its extensions so that a layer can count it
/// (`wsgate_http_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

impl ApiError {
    /// Every code, for metric initialisation and docs.
    pub const CODES: &'static [&'static str] = &[
        "bad_request",
        "invalid_field",
        "unauthorized",
        "forbidden",
        "not_found",
        "payload_too_large",
        "unsupported_media_type",
        "broker_unavailable",
        "broker_timeout",
        "draining",
        "connection_limit",
    ];

    /// Status code and stable JSON code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::InvalidField { .. } => (StatusCode::BAD_REQUEST, "invalid_field"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::BrokerUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable")
            }
            ApiError::BrokerTimeout => (StatusCode::GATEWAY_TIMEOUT, "broker_timeout"),
            ApiError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            ApiError::ConnectionLimit => (StatusCode::SERVICE_UNAVAILABLE, "connection_limit"),
            ApiError::TokenRefused(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Timeout => ApiError::BrokerTimeout,
            other => ApiError::BrokerUnavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({ "error": { "code": code, "message": self.to_string() } });
        let mut resp = (status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(ErrorCode(code));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_error_code_is_listed_for_the_metric() {
        let all = [
            ApiError::BadRequest(String::new()),
            ApiError::InvalidField {
                field: "topic",
                reason: String::new(),
            },
            ApiError::Unauthorized,
            ApiError::Forbidden(""),
            ApiError::NotFound,
            ApiError::TooLarge(1),
            ApiError::UnsupportedMediaType,
            ApiError::BrokerUnavailable(String::new()),
            ApiError::BrokerTimeout,
            ApiError::Draining,
            ApiError::ConnectionLimit,
        ];
        let codes: Vec<&str> = all.iter().map(|e| e.status_and_code().1).collect();
        assert_eq!(codes, ApiError::CODES);
        let resp = ApiError::NotFound.into_response();
        assert_eq!(
            resp.extensions().get::<ErrorCode>(),
            Some(&ErrorCode("not_found"))
        );
    }
}
