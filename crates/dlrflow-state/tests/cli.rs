//! The binary's command line: `config` prints the effective configuration
//! with every secret masked, and a setting nothing reads — also inside the
//! flattened `[kafka]` section, or one that was renamed — stops it with one
//! line naming the key. No service is needed: nothing connects.

use std::process::{Command, Output};

fn state(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dlrflow-state"));
    cmd.args(args);
    // Only what the test sets: the runner's own DLRFLOW_ settings stay out.
    for (k, _) in std::env::vars() {
        if k.starts_with("DLRFLOW_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running dlrflow-state")
}

#[test]
fn config_prints_the_effective_settings_with_secrets_masked() {
    let out = state(
        &["config"],
        &[
            (
                "DLRFLOW_POSTGRES__URL",
                "postgres://app:pg-s3cret-pw@db:5432/dlrflow",
            ),
            ("DLRFLOW_REDIS__URL", "redis://:redis-s3cret-pw@cache:6379"),
            ("DLRFLOW_KAFKA__SETTINGS__SASL_PASSWORD", "kafka-s3cret-pw"),
            ("DLRFLOW_BATCH__MAX_WAIT_MS", "20"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("s3cret"),
        "a secret was printed:\n{stdout}"
    );
    let cfg: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cfg["postgres"]["url"], "***");
    assert_eq!(cfg["redis"]["url"], "***");
    assert_eq!(cfg["kafka"]["settings"]["sasl_password"], "***");
    // Durations keep the unit of their key; the environment won over the defaults.
    assert_eq!(cfg["batch"]["max_wait_ms"], 20);
    assert_eq!(cfg["http"]["shutdown_grace_ms"], 10000);
    assert_eq!(cfg["kafka"]["raw_topic"], "dlrflow.webhooks.raw.v1");
}

#[test]
fn an_unknown_or_renamed_setting_stops_the_binary_naming_it() {
    for (var, expected) in [
        // Inside `[kafka]`, whose client part is a flattened struct.
        ("DLRFLOW_KAFKA__BROKRES", "kafka.brokres"),
        (
            "DLRFLOW_POSTGRES__POOL_SIZE",
            "renamed to `postgres.max_connections`",
        ),
    ] {
        let out = state(&["config"], &[(var, "4")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var} was accepted");
        assert!(stderr.contains(expected), "{var}: {stderr}");
        assert_eq!(
            stderr
                .trim_end()
                .lines()
                .filter(|l| l.starts_with("dlrflow-state:"))
                .count(),
            1,
            "one line: {stderr}"
        );
    }
}

#[test]
fn a_bad_value_is_named_by_its_key_and_never_shown() {
    let out = state(
        &["config"],
        &[("DLRFLOW_POSTGRES__MAX_CONNECTIONS", "pw-s3cret")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("postgres.max_connections"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
