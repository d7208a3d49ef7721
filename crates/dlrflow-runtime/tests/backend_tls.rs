//! TLS to the backends through the shared settings every service uses
//! (`PostgresSettings`, `RedisSettings`): a private PostgreSQL that takes TLS
//! connections only and a private Redis that speaks TLS only, both with a
//! certificate of a private authority.

use std::path::PathBuf;

use dlrflow_runtime::settings::{PostgresSettings, RedisSettings};
use dlrflow_testkit::tls::TestCa;
use dlrflow_testkit::PrivatePostgres;
use dlrflow_testkit::PrivateRedis;

fn logs() -> PathBuf {
    let dir = std::env::temp_dir().join(dlrflow_testkit::unique_name("tls-logs"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn postgres_verify_full_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (TestCa::new("pg"), TestCa::new("other"));
    let pg = PrivatePostgres::with_tls(
        &dlrflow_testkit::unique_name("pgtls"),
        logs().join("pg.log"),
        &ca.issue(),
    )
    .unwrap();
    let ca_file = ca.write_ca(dir.path());

    let mut s = PostgresSettings::with_url(pg.url());
    s.sslmode = Some("verify-full".into());
    s.ca_file = Some(ca_file);
    s.validate(1).unwrap();
    let pool = s.connect().await.expect("verify-full with the right CA");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the session is encrypted");
    pool.close().await;

    // A server certificate from another authority is refused.
    let other_dir = tempfile::tempdir().unwrap();
    s.ca_file = Some(other.write_ca(other_dir.path()));
    let err = s.connect().await.expect_err("a certificate of another CA");
    assert!(
        format!("{err}").to_lowercase().contains("certificate"),
        "{err}"
    );

    // The server takes no plain connection (so the TLS above was real).
    let mut plain = PostgresSettings::with_url(pg.url());
    plain.sslmode = Some("disable".into());
    assert!(plain.connect().await.is_err(), "a plain connection got in");

    // Settings that cannot work name themselves.
    s.sslmode = Some("verify-everything".into());
    let err = s.validate(1).unwrap_err().to_string();
    assert!(err.contains("postgres.sslmode"), "{err}");
    s.sslmode = Some("verify-full".into());
    s.ca_file = Some(dir.path().join("missing.pem"));
    let err = s.validate(1).unwrap_err().to_string();
    assert!(err.contains("postgres.ca_file"), "{err}");
}

fn redis_settings(url: String, ca_file: Option<PathBuf>) -> RedisSettings {
    RedisSettings {
        url: dlrflow_runtime::Secret::new(url),
        prefix: "t".into(),
        connect_timeout: std::time::Duration::from_secs(2),
        response_timeout: std::time::Duration::from_secs(2),
        ca_file,
        cluster: false,
    }
}

#[tokio::test]
async fn rediss_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (TestCa::new("redis"), TestCa::new("other"));
    let redis = PrivateRedis::with_tls(&ca.issue());
    assert!(redis.url().starts_with("rediss://"));

    let s = redis_settings(redis.url(), Some(ca.write_ca(dir.path())));
    s.validate().unwrap();
    let mut conn = s.connect().await.expect("rediss:// with the right CA");
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    // Another authority's roots (or the system's) do not verify it.
    let other_dir = tempfile::tempdir().unwrap();
    let wrong = redis_settings(redis.url(), Some(other.write_ca(other_dir.path())));
    assert!(
        wrong.connect().await.is_err(),
        "a certificate of another CA"
    );
    assert!(redis_settings(redis.url(), None).connect().await.is_err());
    // The port speaks TLS only.
    let plain = redis_settings(redis.url().replace("rediss://", "redis://"), None);
    assert!(plain.connect().await.is_err(), "a plain connection got in");

    // A CA file without TLS is a mistake, said at start.
    let err = redis_settings(
        redis.url().replace("rediss://", "redis://"),
        Some(dir.path().join("ca.pem")),
    )
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("redis.ca_file"), "{err}");
}

/// `redis.cluster = true` over TLS: a three-primary cluster that speaks TLS
/// only (clients and cluster bus), every node with a certificate of a private
/// authority for the address it announces. The client follows the slot map
/// to every node with `redis.ca_file`'s roots, and refuses another CA's.
#[tokio::test]
async fn rediss_cluster_with_a_ca_file() {
    let (ca, other) = (TestCa::new("redis-cluster"), TestCa::new("other"));
    let cluster = dlrflow_testkit::RedisCluster::with_tls(3, &ca);
    assert!(cluster.url().starts_with("rediss://"));
    let ca_file = cluster.ca_file().map(std::path::Path::to_path_buf);

    let mut s = redis_settings(cluster.url(), ca_file);
    s.cluster = true;
    s.validate().unwrap();
    let mut conn = s
        .connect()
        .await
        .expect("rediss:// cluster with the right CA");
    assert!(conn.is_cluster());
    // Keys of many slots: every primary is reached over TLS.
    for i in 0..30 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    let values: Vec<i64> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(values, (0..30).collect::<Vec<i64>>());
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    let other_dir = tempfile::tempdir().unwrap();
    let mut wrong = redis_settings(cluster.url(), Some(other.write_ca(other_dir.path())));
    wrong.cluster = true;
    assert!(
        wrong.connect().await.is_err(),
        "a cluster with another CA's certificates"
    );
}
