//! The architecture invariants of ARCHITECTURE.md, checked against the
//! workspace as it is: the manifests (through `cargo metadata`) and, for
//! "only the state service writes state", the sources.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that do I/O: none may be a dependency of `dlrflow-events`.
const IO_CRATES: &[&str] = &[
    "tokio",
    "tokio-util",
    "rdkafka",
    "redis",
    "sqlx",
    "axum",
    "hyper",
    "reqwest",
    "mio",
    "tower",
    "dlrflow-runtime",
];

/// Package name → its normal (non-dev, non-build) dependencies.
fn workspace() -> (PathBuf, BTreeMap<String, Vec<String>>) {
    let root = dlrflow_e2e::workspace_root();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut deps = BTreeMap::new();
    for p in v["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_owned();
        let normal = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        deps.insert(name, normal);
    }
    (root, deps)
}

#[test]
fn events_depends_on_no_io_crate() {
    let (_, deps) = workspace();
    let bad: Vec<_> = deps["dlrflow-events"]
        .iter()
        .filter(|d| IO_CRATES.contains(&d.as_str()))
        .collect();
    assert!(
        bad.is_empty(),
        "dlrflow-events depends on I/O crates: {bad:?}"
    );
}

#[test]
fn the_simulator_shares_no_code_with_the_system_under_test() {
    let (_, deps) = workspace();
    let bad: Vec<_> = deps["dlrflow-sim"]
        .iter()
        .filter(|d| d.starts_with("dlrflow-"))
        .collect();
    assert!(bad.is_empty(), "dlrflow-sim depends on {bad:?}");
}

#[test]
fn no_service_links_the_test_kit() {
    let (_, deps) = workspace();
    let linking: Vec<_> = deps
        .iter()
        .filter(|(name, d)| *name != "dlrflow-e2e" && d.iter().any(|x| x == "dlrflow-testkit"))
        .map(|(name, _)| name.clone())
        .collect();
    assert!(
        linking.is_empty(),
        "dlrflow-testkit must stay a dev-dependency, but is a normal one of {linking:?}"
    );
    assert!(
        deps.contains_key("dlrflow-testkit"),
        "the test kit is a workspace member"
    );
}

#[test]
fn layers_point_one_way() {
    let (_, deps) = workspace();
    let dlrflow = |c: &str| -> Vec<String> {
        deps[c]
            .iter()
            .filter(|d| d.starts_with("dlrflow-"))
            .cloned()
            .collect()
    };
    // runtime is plumbing: it knows no business crate.
    assert!(
        dlrflow("dlrflow-runtime").is_empty(),
        "{:?}",
        dlrflow("dlrflow-runtime")
    );
    // The ingest never parses an event: it does not link the parser.
    assert!(
        !dlrflow("dlrflow-ingest").contains(&"dlrflow-events".to_owned()),
        "dlrflow-ingest links dlrflow-events"
    );
    // No service links the simulator or the test suite; no service links
    // another except reconcile → state (the one write path).
    for svc in ["dlrflow-ingest", "dlrflow-state", "dlrflow-reconcile"] {
        for d in dlrflow(svc) {
            let allowed = d == "dlrflow-events"
                || d == "dlrflow-runtime"
                || (svc == "dlrflow-reconcile" && d == "dlrflow-state");
            assert!(allowed, "{svc} depends on {d}");
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn only_the_state_service_writes_state() {
    // dlrflow-state writes it, and only from records of its topics.
    let (root, deps) = workspace();
    let tables = [
        "recipient_state",
        "messages",
        "delivery_events",
        "delivery_outbox",
    ];
    let mut offenders = Vec::new();
    for krate in deps
        .keys()
        .filter(|k| k.starts_with("dlrflow-") && *k != "dlrflow-state")
    {
        let src = root.join("crates").join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap().to_ascii_lowercase();
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            for t in tables {
                for verb in ["insert into", "update", "delete from"] {
                    if text.contains(&format!("{verb} {t} "))
                        || text.contains(&format!("{verb} {t}("))
                    {
                        offenders.push(format!("{}: {verb} {t}", f.display()));
                    }
                }
            }
            // Nor through dlrflow-state's write path: the state is a function
            // of the log, so only its consumer applies anything (the
            // reconciler publishes its answers to the status topic).
            for call in ["apply_updates", "apply_batch", "apply_log"] {
                if text.contains(call) {
                    offenders.push(format!("{}: {call}", f.display()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "state written outside dlrflow-state: {offenders:?}"
    );
}
