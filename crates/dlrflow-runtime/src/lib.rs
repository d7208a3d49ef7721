//! dlrflow-runtime (work in progress).
