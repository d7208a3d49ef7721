//! dlrflow-state (work in progress).
