//! PostgreSQL unavailable for a while: nothing is lost, the consumer catches up.
//!
//! The shared server cannot be stopped, so the service runs as its own role,
//! which the test locks out (`ALTER ROLE … NOLOGIN` and `pg_terminate_backend`
//! of its connections): every write and every new connection fails, for real,
//! until the role may log in again.

mod common;

use std::time::Duration;

use common::{assert_expected, count, pg_base, spawn_app, wait_count, Env};
use dlrflow_testkit::scenario::{
    lisoloo_scenario, produce_raw, producer, shuffled_with_duplicates,
};
use sqlx::PgPool;

const T: Duration = Duration::from_secs(120);

async fn lock_out(admin: &PgPool, role: &str) {
    sqlx::query(&format!("ALTER ROLE \"{role}\" NOLOGIN"))
        .execute(admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(role)
        .execute(admin)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unavailable_for_a_while_loses_nothing_and_catches_up() {
    let env = Env::new(2).await;
    let role = env.schema.clone();
    let admin = PgPool::connect(&pg_base()).await.unwrap();
    sqlx::query(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE SCHEMA \"{}\" AUTHORIZATION \"{role}\"",
        env.schema
    ))
    .execute(&admin)
    .await
    .unwrap();

    let mut cfg = env.config();
    let mut url = reqwest::Url::parse(&pg_base()).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(None).unwrap();
    cfg.postgres.url = url.to_string().into();
    cfg.postgres.acquire_timeout = Duration::from_secs(1);
    let app = spawn_app(cfg).await;
    let pool = env.pool().await; // as postgres: unaffected by the lock-out
    let scenario = lisoloo_scenario(&env.group, 12, 4);
    let (first, second) = scenario.records.split_at(scenario.records.len() / 3);
    let p = producer(&env.brokers).unwrap();
    produce_raw(&p, &env.raw, first).await.unwrap();
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        first.len() as i64,
        T,
    )
    .await;

    lock_out(&admin, &role).await;
    let records = shuffled_with_duplicates(second, 20, 3);
    produce_raw(&p, &env.raw, &records).await.unwrap();
    // The consumer is failing and backing off: observe the failures on
    // /metrics rather than sleeping.
    let http = reqwest::Client::new();
    let metrics_url = format!("http://{}/metrics", app.admin);
    let failing = dlrflow_testkit::wait_for(T, || {
        let http = http.clone();
        let url = metrics_url.clone();
        async move {
            let text = http.get(&url).send().await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l.starts_with("dlrflow_state_batch_failures_total") && !l.ends_with(" 0"))
                .then_some(())
        }
    })
    .await;
    assert!(failing.is_some(), "the consumer saw PostgreSQL fail");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM delivery_events").await,
        first.len() as i64
    );
    let ready = http
        .get(format!("http://{}/readyz", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    sqlx::query(&format!("ALTER ROLE \"{role}\" LOGIN"))
        .execute(&admin)
        .await
        .unwrap();
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_events",
        scenario.records.len() as i64,
        T,
    )
    .await;
    wait_count(
        &pool,
        "SELECT count(*) FROM delivery_outbox WHERE published_at IS NULL",
        0,
        T,
    )
    .await;
    assert_expected(&pool, &scenario).await;
    assert_eq!(
        count(&pool, "SELECT sum(version)::int8 FROM recipient_state").await,
        scenario.update_ids.len() as i64
    );

    app.stop().await;
    pool.close().await;
    env.drop_schema().await;
    let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{role}\""))
        .execute(&admin)
        .await;
}
