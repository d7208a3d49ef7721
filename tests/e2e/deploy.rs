//! The deployment files are tested, not only written (`deploy/k8s/`,
//! `docker-compose.yml`):
//!
//! - `deploy/k8s/check.sh` validates every Kubernetes manifest (the base,
//!   the rendered production overlay, the example Secret) against the
//!   Kubernetes JSON schemas and `docker-compose.yml` against the Compose
//!   Specification's, offline, and checks the manifests' invariants (state
//!   replicas ≤ the raw topic's partitions, the pod name as
//!   `kafka.instance_id`, probes on the admin listener, every secret
//!   reference in the example Secret);
//! - every `DLRFLOW_…` variable a container or a compose service gets is a
//!   setting of the binary it is given to: the binary's own `config` loads
//!   exactly that environment (secrets from the example Secret) and must
//!   succeed and show every variable in its effective configuration; for
//!   `dlrflow-reconcile migrate`, `config --for migrate`, which shows only
//!   the PostgreSQL settings (the migrate Job gets no API key);
//! - every service's termination grace outlasts its drain, computed from
//!   the effective `http.shutdown_grace_ms`;
//! - and the checks bite: a misspelled variable, an unknown manifest field,
//!   a misspelled compose key and too many state replicas all fail them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use dlrflow_e2e::{newest_source, profile_dir, target_dir, workspace_root};
use serde_json::Value;

/// A container (or compose service) that runs a dlrflow binary, as
/// `check.py --env-out` lists it.
#[derive(Debug, Clone)]
struct Container {
    origin: String,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    /// `terminationGracePeriodSeconds` or compose's `stop_grace_period`.
    termination_grace_secs: u64,
    /// The preStop `sleep` before SIGTERM.
    prestop_secs: u64,
}

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = target_dir()
        .join("deploy-tests")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// Runs `deploy/k8s/check.sh` (of this tree) on the tree at `root`.
fn check(root: &Path, env_out: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("deploy/k8s/check.sh"))
        .arg("--root")
        .arg(root)
        .stdin(Stdio::null());
    if let Some(path) = env_out {
        cmd.arg("--env-out").arg(path);
    }
    let out = cmd.output().expect("running deploy/k8s/check.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every dlrflow container of the manifests and of docker-compose.yml
/// (`test` names the scratch directory).
fn containers(test: &str) -> Vec<Container> {
    let dir = scratch(test);
    let path = dir.join("env.json");
    let (ok, text) = check(&workspace_root(), Some(&path));
    assert!(ok, "{text}");
    let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let list: Vec<Container> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| Container {
            origin: c["origin"].as_str().unwrap().to_owned(),
            argv: c["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect(),
            env: c["env"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
            termination_grace_secs: c["termination_grace_secs"].as_u64().unwrap(),
            prestop_secs: c["prestop_secs"].as_u64().unwrap(),
        })
        .collect();
    let _ = std::fs::remove_dir_all(dir);
    list
}

/// The path of a service binary. The suite's own build (`cargo nextest run
/// --workspace --all-targets`) has just built every binary; only when one
/// is missing or older than a source (a test run alone, after an edit) are
/// they built here, as deploy/docker/Dockerfile builds the image's: every
/// binary of the workspace in one cargo invocation, once per process.
/// (Not `cargo build -p <one>` per binary: under cargo's per-invocation
/// feature unification each such build rebuilds the dependencies the
/// previous one built with other features, minutes each on 2 shared
/// cores.) `DLRFLOW_E2E_NO_BUILD=1` uses whatever binary exists.
fn service_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let newest = newest_source();
        let fresh = ["dlrflow-ingest", "dlrflow-state", "dlrflow-reconcile"]
            .iter()
            .all(|bin| {
                std::fs::metadata(profile_dir().join(bin))
                    .and_then(|m| m.modified())
                    .is_ok_and(|built| built >= newest)
            });
        if fresh || std::env::var_os("DLRFLOW_E2E_NO_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "-q", "--workspace", "--bins"])
            .env("CARGO_TARGET_DIR", target_dir());
        if profile_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    let path = profile_dir().join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// `<binary> config` with exactly `env` (nothing inherited).
fn config(bin: &str, env: &BTreeMap<String, String>) -> Output {
    config_for(bin, &[], env)
}

/// The `config` command that prints what the container's command reads:
/// `dlrflow-reconcile migrate` reads the PostgreSQL settings alone
/// (`config --for migrate`); every other command is checked against the
/// binary's whole configuration (`config`).
fn config_args(argv: &[String]) -> &'static [&'static str] {
    match (argv[0].as_str(), argv.get(1).map(String::as_str)) {
        ("dlrflow-reconcile", Some("migrate")) => &["--for", "migrate"],
        _ => &[],
    }
}

/// `<binary> config <args>` with exactly `env` (nothing inherited).
fn config_for(bin: &str, args: &[&str], env: &BTreeMap<String, String>) -> Output {
    Command::new(service_binary(bin))
        .arg("config")
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("running the binary")
}

/// The variables of `env` that do not show in the effective configuration
/// `cfg`: `DLRFLOW_A__B` must be `cfg.a.b`. The binary itself refuses an
/// unknown nested name; a top-level name without `__` (`DLRFLOW_SOURCSE`)
/// it leaves to other tools, so only this finds a misspelled one.
fn unread_vars(env: &BTreeMap<String, String>, cfg: &Value) -> Vec<String> {
    let mut unread = Vec::new();
    for var in env.keys() {
        let Some(name) = var.strip_prefix("DLRFLOW_") else {
            continue;
        };
        let mut at = cfg;
        let mut in_settings = false;
        for segment in name.to_ascii_lowercase().split("__") {
            // librdkafka properties: `_` in the variable stands for `.`.
            let key = if in_settings {
                segment.replace('_', ".")
            } else {
                segment.to_owned()
            };
            in_settings = key == "settings";
            match at.get(&key) {
                Some(next) => at = next,
                None => {
                    unread.push(var.clone());
                    break;
                }
            }
        }
    }
    unread
}

/// Producers a service flushes after its tasks' drain, each within the grace
/// (`dlrflow_runtime::service::Service::run`).
fn producers(bin: &str) -> u64 {
    match bin {
        "dlrflow-ingest" | "dlrflow-state" => 1,
        _ => 0,
    }
}

#[test]
fn manifests_and_the_compose_file_are_valid_against_their_schemas() {
    let (ok, text) = check(&workspace_root(), None);
    assert!(ok, "{text}");
    for kind in [
        "Deployment",
        "StatefulSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "Service",
    ] {
        assert!(
            text.contains(&format!(" {kind}")),
            "no {kind} checked: {text}"
        );
    }
    assert!(
        text.contains("valid against the Compose Specification: docker-compose.yml"),
        "{text}"
    );
    // Where kubectl is installed, the overlay's rendering in check.py is
    // compared with kustomize's own.
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if kubectl {
        assert!(
            text.contains("rendering equals `kubectl kustomize`'s"),
            "{text}"
        );
    }
}

/// One test, so one process and one build of the binaries for the checks
/// that run them (see [`service_binary`]).
#[test]
fn every_container_environment_is_a_configuration_of_its_binary() {
    let all = containers("environments");
    // base and overlay: the migrate Job's two steps (state, reconcile),
    // ingest, state, reconcile; compose: the same five.
    assert_eq!(all.len(), 15, "{all:#?}");
    let migrate_reconcile: Vec<&Container> = all
        .iter()
        .filter(|c| c.argv == ["dlrflow-reconcile", "migrate"])
        .collect();
    assert_eq!(migrate_reconcile.len(), 3, "{all:#?}");
    let mut services = 0;
    for c in &all {
        let bin = c.argv[0].as_str();
        let cfg = effective_config(c);
        every_variable_is_a_setting(c, &cfg);
        if c.argv.get(1).map(String::as_str) == Some("serve") {
            services += 1;
            the_grace_outlasts_the_drain(c, &cfg);
        }
        eprintln!("ok: {} ({bin})", c.origin);
    }
    assert_eq!(services, 9, "{all:#?}");
    let ingest = all
        .iter()
        .find(|c| c.argv[0] == "dlrflow-ingest" && c.origin.contains("(base)"))
        .expect("the base's ingest");
    a_misspelled_variable_is_refused(ingest);
    migrate_reads_only_postgres(migrate_reconcile[0]);
}

/// The reconciler's migrate step is checked against what `migrate` reads:
/// its environment holds no API key (`serve`'s configuration refuses it),
/// and a setting only `serve` reads (the API key, Redis) is not one of
/// `migrate`'s.
fn migrate_reads_only_postgres(c: &Container) {
    assert!(
        c.env
            .keys()
            .all(|k| !k.starts_with("DLRFLOW_") || k.starts_with("DLRFLOW_POSTGRES__")),
        "{}: {:?}",
        c.origin,
        c.env.keys()
    );
    let out = config("dlrflow-reconcile", &c.env);
    assert!(
        !out.status.success(),
        "{}: `serve`'s configuration needs the API key",
        c.origin
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("status_api.api_key"));
    let mut env = c.env.clone();
    env.insert("DLRFLOW_STATUS_API__API_KEY".into(), "k-0123456789".into());
    env.insert("DLRFLOW_REDIS__URL".into(), "redis://r:6379".into());
    let out = config_for("dlrflow-reconcile", config_args(&c.argv), &env);
    assert!(out.status.success());
    let cfg: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        unread_vars(&env, &cfg),
        ["DLRFLOW_REDIS__URL", "DLRFLOW_STATUS_API__API_KEY"]
    );
}

/// `<binary> config` with the container's environment (`config --for
/// migrate` for the reconciler's migrate step): it must load.
fn effective_config(c: &Container) -> Value {
    let bin = c.argv[0].as_str();
    let out = config_for(bin, config_args(&c.argv), &c.env);
    assert!(
        out.status.success(),
        "{}: `{bin} config` refuses its environment: {}",
        c.origin,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("config prints JSON")
}

/// Every variable the container sets shows in the effective configuration.
fn every_variable_is_a_setting(c: &Container, cfg: &Value) {
    let unread = unread_vars(&c.env, cfg);
    assert!(
        unread.is_empty(),
        "{}: {unread:?} are not settings of {}",
        c.origin,
        c.argv[0]
    );
}

/// The termination grace (Kubernetes) or stop grace period (compose) is
/// above the preStop pause plus the drain of the effective
/// `http.shutdown_grace_ms`: the tasks' drain, then each producer's flush,
/// each within the grace.
fn the_grace_outlasts_the_drain(c: &Container, cfg: &Value) {
    let grace_ms = cfg["http"]["shutdown_grace_ms"]
        .as_u64()
        .expect("http.shutdown_grace_ms");
    let drain_ms = c.prestop_secs * 1000 + grace_ms * (1 + producers(&c.argv[0]));
    assert!(
        c.termination_grace_secs * 1000 > drain_ms,
        "{}: {} s to stop, but the preStop pause and the drain take up to {drain_ms} ms",
        c.origin,
        c.termination_grace_secs
    );
}

/// The checks above bite: a misspelled nested name is refused by the
/// binary itself, naming it; a misspelled top-level name (which the binary
/// leaves to other tools) is found by [`unread_vars`].
fn a_misspelled_variable_is_refused(ingest: &Container) {
    let mut env = ingest.env.clone();
    env.insert("DLRFLOW_HTTP__ADMIN_LISTNE".into(), "0.0.0.0:9080".into());
    let out = config("dlrflow-ingest", &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a misspelled variable was accepted");
    assert!(stderr.contains("http.admin_listne"), "{stderr}");
    let mut env = ingest.env.clone();
    env.insert("DLRFLOW_SOURCSE".into(), "[]".into());
    let out = config("dlrflow-ingest", &env);
    assert!(out.status.success());
    let cfg: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(unread_vars(&env, &cfg), ["DLRFLOW_SOURCSE"]);
    assert!(unread_vars(&ingest.env, &cfg).is_empty());
}

/// Copies `from` into `to`, recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Replaces `old` (which must be there) by `new` in the file at `path`.
fn edit(path: &Path, old: &str, new: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(old), "{} has no {old:?}", path.display());
    std::fs::write(path, text.replacen(old, new, 1)).unwrap();
}

#[test]
fn a_broken_copy_of_the_files_fails_the_check() {
    let root = scratch("broken");
    copy_tree(
        &workspace_root().join("deploy/k8s"),
        &root.join("deploy/k8s"),
    );
    std::fs::copy(
        workspace_root().join("docker-compose.yml"),
        root.join("docker-compose.yml"),
    )
    .unwrap();
    let (ok, text) = check(&root, None);
    assert!(ok, "the unbroken copy: {text}");

    // A field Kubernetes does not know, in the base.
    edit(
        &root.join("deploy/k8s/base/ingest.yaml"),
        "      terminationGracePeriodSeconds: 35",
        "      terminationGracePeriodSecond: 35",
    );
    // A key the Compose Specification does not know.
    edit(
        &root.join("docker-compose.yml"),
        "stop_grace_period: 25s",
        "stop_grace_perod: 25s",
    );
    // More state replicas than the production raw topic's partitions.
    edit(
        &root.join("deploy/k8s/overlays/production/state.yaml"),
        "replicas: 6",
        "replicas: 13",
    );
    let (ok, text) = check(&root, None);
    assert!(!ok, "{text}");
    for expected in [
        "'terminationGracePeriodSecond' was unexpected",
        "'stop_grace_perod' does not match",
        "13 replicas, more than the raw topic's 12 partitions",
    ] {
        assert!(text.contains(expected), "{expected:?} not in: {text}");
    }
    let _ = std::fs::remove_dir_all(root);
}
