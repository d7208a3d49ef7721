//! dlrflow-events (work in progress).
