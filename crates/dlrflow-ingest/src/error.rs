//! The one place that decides status codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such source, or a route the source does not have.
    #[error("no such webhook route")]
    UnknownRoute,
    #[error("missing or wrong credentials")]
    Unauthorized { realm: String },
    /// The request's address is not in the source's `allow_from`.
    #[error("not allowed from this address")]
    Forbidden,
    /// Not JSON, or not the provider's outer shape (400: never resend).
    #[error("{0}")]
    BadBody(String),
    /// A body over `http.body_limit_bytes`, or a record (a Lisoloo body, an
    /// Arpoone element) the broker can never take (413: never resend).
    #[error("{what} larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    /// The event is not durable: the gateway must retry (503).
    #[error("temporarily unavailable: {0}")]
    Unavailable(&'static str),
}

impl ApiError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::UnknownRoute => "unknown_route",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::BadBody(_) => "bad_body",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownRoute => StatusCode::NOT_FOUND,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn into_response_with(self, retry_after_secs: u64) -> Response {
        let status = self.status();
        match &self {
            ApiError::Unavailable(reason) => tracing::warn!(reason, "answering 503"),
            ApiError::BadBody(reason) => tracing::info!(%reason, "rejected body"),
            other => tracing::info!(error = %other, "rejected request"),
        }
        let mut resp =
            (status, Json(serde_json::json!({"error": self.to_string()}))).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized { realm } => {
                let value = format!("Basic realm=\"{realm}\", charset=\"UTF-8\"");
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            _ => {}
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_with(5)
    }
}
