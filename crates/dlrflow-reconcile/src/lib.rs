//! dlrflow-reconcile (work in progress).
