//! `dlrflow-reconcile migrate`, the binary itself, against real PostgreSQL
//! with nothing but the PostgreSQL settings in its environment: no API key,
//! no Redis, no Kafka. It applies dlrflow-state's migrations and the
//! reconciler's own and exits; `serve`'s configuration with the same
//! environment is refused for the missing key.

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};

use dlrflow_testkit::{test_postgres_url, unique_name};
use sqlx::PgPool;

/// `dlrflow-reconcile <args>` with exactly `env` (nothing inherited).
fn reconcile(args: &[&str], env: &BTreeMap<&str, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlrflow-reconcile"))
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("running dlrflow-reconcile")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn migrate_needs_only_the_postgres_settings() {
    let schema = unique_name("mig").replace('-', "_");
    let env = BTreeMap::from([
        ("DLRFLOW_POSTGRES__URL", test_postgres_url()),
        ("DLRFLOW_POSTGRES__SCHEMA", schema.clone()),
    ]);

    // What `serve` reads refuses this environment: the API key is missing.
    let out = reconcile(&["config"], &env);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("status_api.api_key"), "{}", text(&out));

    // What `migrate` reads is the PostgreSQL settings, and nothing else.
    let out = reconcile(&["config", "--for", "migrate"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sections: Vec<&str> = cfg
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(sections, ["postgres"], "{cfg}");
    assert_eq!(cfg["postgres"]["schema"], schema.as_str());
    assert_eq!(cfg["postgres"]["url"], "***", "the URL is a secret");

    let out = reconcile(&["migrate"], &env);
    assert!(out.status.success(), "migrate failed: {}", text(&out));

    // Both sides' migrations are in the schema, and their tables.
    let admin = PgPool::connect(&test_postgres_url()).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM {schema}._sqlx_migrations WHERE success ORDER BY version"
    ))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(versions.contains(&1), "dlrflow-state's first: {versions:?}");
    assert!(
        versions.contains(&4),
        "consumer_progress's migration: {versions:?}"
    );
    for v in [1000, 1001, 1002] {
        assert!(versions.contains(&v), "{v} missing: {versions:?}");
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&admin)
    .await
    .unwrap();
    for t in [
        "recipient_state",
        "messages",
        "consumer_progress",
        "reconcile_jobs",
        "reconcile_budgets",
    ] {
        assert!(tables.iter().any(|x| x == t), "{t} missing: {tables:?}");
    }

    // A second run (a Job retried, a new image) applies nothing and succeeds.
    let out = reconcile(&["migrate"], &env);
    assert!(out.status.success(), "second migrate: {}", text(&out));
    let again: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}._sqlx_migrations"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(again, versions.len() as i64);

    // A bad PostgreSQL setting is still refused, naming it.
    let mut bad = env.clone();
    bad.insert("DLRFLOW_POSTGRES__SCHEMA", "x; drop".into());
    let out = reconcile(&["migrate"], &bad);
    assert!(!out.status.success());
    assert!(text(&out).contains("postgres.schema"), "{}", text(&out));

    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
    admin.close().await;
}
