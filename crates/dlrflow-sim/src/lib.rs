//! dlrflow-sim (work in progress).
