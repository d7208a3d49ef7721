//! The provider tag and the delivery-status lattice.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an update came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// Lisoloo webhooks: one JSON event object per POST.
    Lisoloo,
    /// Arpoone webhooks: a JSON array of reports per POST, one raw record per element.
    Arpoone,
    /// The gateway's `GET /status/{message_id}` answer (authoritative).
    StatusApi,
}

impl Provider {
    /// The wire/header spelling: `lisoloo`, `arpoone`, `status_api`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Provider::Lisoloo => "lisoloo",
            Provider::Arpoone => "arpoone",
            Provider::StatusApi => "status_api",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lisoloo" => Ok(Provider::Lisoloo),
            "arpoone" => Ok(Provider::Arpoone),
            "status_api" => Ok(Provider::StatusApi),
            other => Err(UnknownName(other.to_owned())),
        }
    }
}

/// A name that is not one of the enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown name `{0}`")]
pub struct UnknownName(pub String);

/// A recipient's delivery status.
///
/// The lattice is `queued < processing < sent < {delivered, failed}`: `delivered`
/// and `failed` are both terminal and incomparable. `Ord` is the lattice rank with
/// an arbitrary tie-break (`Delivered < Failed`) so the type can be sorted; merge
/// logic uses [`Status::rank`] and [`Status::is_terminal`], never that tie-break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Processing,
    Sent,
    Delivered,
    Failed,
}

impl Status {
    /// Every status, in lattice order.
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Processing,
        Status::Sent,
        Status::Delivered,
        Status::Failed,
    ];

    /// Position in the lattice: queued 0, processing 1, sent 2, delivered/failed 3.
    pub const fn rank(self) -> u8 {
        match self {
            Status::Queued => 0,
            Status::Processing => 1,
            Status::Sent => 2,
            Status::Delivered | Status::Failed => 3,
        }
    }

    /// `delivered` and `failed` end a recipient's life.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Status::Delivered | Status::Failed)
    }

    /// Lowercase spelling, as in serde and the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Processing => "processing",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(Status::Queued),
            "processing" => Ok(Status::Processing),
            "sent" => Ok(Status::Sent),
            "delivered" => Ok(Status::Delivered),
            "failed" => Ok(Status::Failed),
            other => Err(UnknownName(other.to_owned())),
        }
    }
}
