//! Why a raw record could not be turned into an update.

/// A record that cannot be parsed. Every variant is *poison* for the caller: the
/// record goes to the DLQ (with this error's `Display` as its error header) and
/// the offset is committed; retrying cannot help. Field paths are dotted, e.g.
/// `data.recipient_phone` or `recipients[2].status`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The bytes are not JSON at all (or not UTF-8).
    #[error("not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The JSON is valid but the value at `what` has the wrong shape (e.g. an array
    /// where an object is expected).
    #[error("{what}: expected a JSON object")]
    NotAnObject { what: &'static str },
    /// A required field is absent or `null`.
    #[error("missing required field `{field}`")]
    MissingField { field: String },
    /// A field is present but its value is unusable.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: String, reason: String },
    /// A Lisoloo `event_type` this version does not know.
    #[error("unknown event_type `{0}`")]
    UnknownEventType(String),
    /// `parse_record` was asked for a provider that has no raw webhook records
    /// (status-API answers go through `parse_status_response`).
    #[error("provider `{0}` has no raw webhook records")]
    UnsupportedProvider(crate::Provider),
    /// A status string that is not one of the provider's documented values.
    #[error("unknown status `{value}` in field `{field}`")]
    UnknownStatus { field: String, value: String },
}

impl ParseError {
    pub(crate) fn missing(field: impl Into<String>) -> Self {
        ParseError::MissingField {
            field: field.into(),
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ParseError::InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A short stable label for metrics and the DLQ error-kind header.
    pub fn kind(&self) -> &'static str {
        match self {
            ParseError::NotJson(_) => "not_json",
            ParseError::NotAnObject { .. } => "not_an_object",
            ParseError::MissingField { .. } => "missing_field",
            ParseError::InvalidField { .. } => "invalid_field",
            ParseError::UnknownEventType(_) => "unknown_event_type",
            ParseError::UnknownStatus { .. } => "unknown_status",
            ParseError::UnsupportedProvider(_) => "unsupported_provider",
        }
    }
}
