//! dlrflow-ingest (work in progress).
