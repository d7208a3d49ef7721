//! A background task that dies stops the process: `App::run` returns an
//! error naming the task instead of leaving a replica whose `/readyz` is green
//! while it no longer sweeps or reads. The fault is injected through
//! `AppState::inject_fault`, which exists for these tests only.

mod common;

use std::time::Duration;

use common::*;
use dlrflow_reconcile::Fault;

/// Runs a healthy reconciler, injects `fault` into `task`, and returns the
/// error `App::run` ended with.
async fn run_until_it_dies(task: &str, fault: Fault) -> String {
    let server = StatusServer::start(120, Duration::from_secs(60)).await;
    let db = TestDb::new().await;
    let app = spawn(test_config(&server, &db)).await;
    let (code, body) = readyz(app.addr).await;
    assert_eq!(code, 200, "{body}");
    app.state.inject_fault(task, fault);
    let ended = tokio::time::timeout(Duration::from_secs(15), app.task)
        .await
        .unwrap_or_else(|_| panic!("`{task}` died but the reconciler kept running"))
        .expect("run does not panic itself");
    db.drop().await;
    let err = ended.expect_err("a dead task is an error");
    format!("{err:#}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_stops_the_process_with_an_error_naming_it() {
    let err = run_until_it_dies("worker-1", Fault::Panic).await;
    assert!(err.contains("`worker-1`"), "{err}");
    assert!(err.contains("panicked"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_that_returns_an_error_stops_the_process() {
    let err = run_until_it_dies("sweeper", Fault::Error).await;
    assert!(err.contains("`sweeper`"), "{err}");
    assert!(err.contains("fault injected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sweeper_stops_the_process() {
    let err = run_until_it_dies("sweeper", Fault::Panic).await;
    assert!(
        err.contains("`sweeper`") && err.contains("panicked"),
        "{err}"
    );
}
