//! The ingest against the real broker: what is accepted is in the raw topic
//! byte for byte; what is refused writes nothing.

mod helpers;

use std::collections::BTreeSet;

use helpers::*;
use reqwest::StatusCode;

#[tokio::test]
async fn lisoloo_event_is_in_the_raw_topic_byte_for_byte_with_key_and_headers() {
    let app = spawn_app().await;
    let mid = "507f1f77bcf86cd799439011";
    // Odd spacing, key order and non-ASCII text must survive untouched.
    let body = format!(
        "{{ \"event_type\" : \"sms.failed\",\n \"event_id\":\"f8a3b7c1-2e4d-4a9b-9d8f-7c6e5b4a3d2c\", \"timestamp\":\"2026-05-27T10:15:05Z\",\"message_id\":\"{mid}\",\"data\":{{\"recipient_phone\":\"+243998857000\",\"carrier\":\"vodacom_drc\",\"failed_at\":\"2026-05-27T10:15:05Z\",\"error_code\":\"1502\",\"error_message\":\"Numéro injoignable\",\"retryable\":false}} }}"
    );
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let resp = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, PASS))
        .header("Content-Type", "application/json")
        .header("traceparent", traceparent)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let records = app.records(1).await;
    assert_eq!(records.len(), 1, "exactly one record");
    let r = &records[0];
    assert_eq!(r.payload, body.as_bytes(), "the exact request bytes");
    assert_eq!(r.key.as_deref(), Some(mid.as_bytes()), "key = message_id");
    assert_eq!(r.header("source"), Some("lisoloo"));
    assert_eq!(r.header("provider"), Some("lisoloo"));
    assert_eq!(r.header("traceparent"), Some(traceparent));
    let received_at = r.header("received-at").unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(received_at).unwrap();
    assert_eq!(
        received_at
            .split('.')
            .nth(1)
            .map(|f| f.trim_end_matches('Z').len()),
        Some(6),
        "µs precision: {received_at}"
    );
    assert!(
        (chrono::Utc::now() - parsed.with_timezone(&chrono::Utc))
            .num_seconds()
            .abs()
            < 60
    );
    let ingest_id = uuid::Uuid::parse_str(r.header("ingest-id").unwrap()).unwrap();
    assert_eq!(ingest_id.get_version_num(), 7, "ingest id is a UUIDv7");
}

#[tokio::test]
async fn arpoone_batch_of_1000_becomes_1000_records_with_exact_element_bytes() {
    let app = spawn_app().await;
    let mut elements = Vec::new();
    for i in 0..1000 {
        let status = ["PENDING", "DELIVERED", "NOT_DELIVERED"][i % 3];
        // Vary the formatting so byte-exactness is really tested.
        let sep = if i % 2 == 0 { " " } else { "" };
        elements.push(format!(
            "{{\"Msisdn\":{sep}\"3519{i:08}\",\"Status\":\"{status}\",\"MessageId\":\"{}\",\"OrganizationId\":\"0b7e2c2e-3c1a-4a51-9d1b-8f4c2f1a9e77\",\"ReportDescription\":\"ok\",\"ReportDateTime\":\"2026-05-27T10:15:0{}\",\"TotalSegments\":1,\"CustomPayload\":\"{{\\\"abc\\\": \\\"123\\\"}}\"}}",
            uuid::Uuid::new_v4(),
            i % 10
        ));
    }
    let body = format!("[\n  {}\n]", elements.join(",\n  "));
    let resp = app
        .client
        .post(app.url("/arpoone/webhook/delivered"))
        .header("Authorization", basic(USER, PASS))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let records = app.records(1000).await;
    assert_eq!(records.len(), 1000);
    let got: BTreeSet<Vec<u8>> = records.iter().map(|r| r.payload.clone()).collect();
    let want: BTreeSet<Vec<u8>> = elements.iter().map(|e| e.as_bytes().to_vec()).collect();
    assert_eq!(got, want, "one record per element, exact bytes");
    for r in &records {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            r.key.as_deref(),
            Some(v["MessageId"].as_str().unwrap().as_bytes())
        );
        assert_eq!(r.header("provider"), Some("arpoone"));
        assert_eq!(r.header("endpoint"), Some("delivered"));
    }
}

#[tokio::test]
async fn credentials_are_checked_per_rfc_7617_and_only_accepted_requests_write() {
    let app = spawn_app().await;
    let garbage = "Basic !!!not-base64***".to_owned();
    let cases: Vec<(&str, Option<String>, StatusCode)> = vec![
        ("right", Some(basic(USER, PASS)), StatusCode::NO_CONTENT),
        (
            "prefix of the password",
            Some(basic(USER, "s3cret:with")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "password plus a suffix",
            Some(basic(USER, "s3cret:with:colons!")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "wrong user",
            Some(basic("lisoloo", PASS)),
            StatusCode::UNAUTHORIZED,
        ),
        ("no header", None, StatusCode::UNAUTHORIZED),
        ("garbage base64", Some(garbage), StatusCode::UNAUTHORIZED),
        (
            "bearer scheme",
            Some(format!("Bearer {PASS}")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "lower-case scheme",
            Some(basic(USER, PASS).replacen("Basic", "basic", 1)),
            StatusCode::NO_CONTENT,
        ),
        (
            "second active password",
            Some(basic(USER, PASS_NEW)),
            StatusCode::NO_CONTENT,
        ),
    ];
    let mut accepted = BTreeSet::new();
    for (name, auth, want) in cases {
        let mid = message_id();
        let mut req = app
            .client
            .post(app.url("/lisoloo/webhook"))
            .body(lisoloo_event(&mid));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), want, "{name}");
        if want == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .expect("challenge")
                .to_str()
                .unwrap();
            assert!(
                challenge.starts_with("Basic realm=\"lisoloo\""),
                "{name}: {challenge}"
            );
        } else {
            accepted.insert(mid);
        }
    }
    let records = app.records(accepted.len()).await;
    let keys: BTreeSet<String> = records
        .iter()
        .map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap())
        .collect();
    assert_eq!(keys, accepted, "only accepted requests wrote records");
}

#[tokio::test]
async fn bad_bodies_get_400_or_413_and_write_nothing() {
    let app = spawn_app().await;
    let auth = basic(USER, PASS);
    let post = |path: &str, body: reqwest::Body| {
        app.client
            .post(app.url(path))
            .header("Authorization", auth.clone())
            .body(body)
            .send()
    };
    assert_eq!(
        post("/lisoloo/webhook", "not json".into())
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post("/lisoloo/webhook", "{\"event_id\": ".into())
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post("/lisoloo/webhook", "".into()).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post("/arpoone/webhook", "{\"Msisdn\":\"1\"}".into())
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    let too_many = format!("[{}]", vec!["{}"; 1001].join(","));
    assert_eq!(
        post("/arpoone/webhook", too_many.into())
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );

    // Over the 1 MiB default: declared, and streamed without a length.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(1024 * 1024));
    assert_eq!(
        post("/lisoloo/webhook", big.clone().into())
            .await
            .unwrap()
            .status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    assert_eq!(
        post("/lisoloo/webhook", streamed).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // A marker that is accepted proves the topic is readable; it must be the only record.
    let mid = message_id();
    assert_eq!(
        post("/lisoloo/webhook", lisoloo_event(&mid).into())
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    let records = app.records(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key.as_deref(), Some(mid.as_bytes()));
}

#[tokio::test]
async fn json_we_do_not_understand_is_accepted_and_kept() {
    let app = spawn_app().await;
    let bodies = [
        r#"{"event_id":"a","event_type":"sms.clicked","timestamp":"2026-05-27T10:15:08Z","message_id":"m-unknown","data":{}}"#,
        r#"[1,2,3]"#,
        r#"{"message_id": 42}"#,
    ];
    for b in bodies {
        let resp = app
            .client
            .post(app.url("/lisoloo/webhook"))
            .header("Authorization", basic(USER, PASS))
            .body(b)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{b}");
    }
    let records = app.records(3).await;
    let got: BTreeSet<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    let want: BTreeSet<&[u8]> = bodies.iter().map(|b| b.as_bytes()).collect();
    assert_eq!(got, want);
    let keyed: Vec<_> = records.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(
        keyed,
        vec![b"m-unknown".to_vec()],
        "only the string message_id becomes a key"
    );
}

#[tokio::test]
async fn a_removed_password_stops_working_and_the_others_keep_working() {
    let brokers = dlrflow_runtime::testing::test_brokers();
    let topic = dlrflow_runtime::testing::unique_name("ingest-rotate");
    dlrflow_runtime::testing::create_topic(&brokers, &topic, 6)
        .await
        .unwrap();
    // Rotation: both passwords are active, then the old one is removed.
    let app = spawn_with(config(&brokers, &topic)).await;
    for p in [PASS, PASS_NEW] {
        let r = app
            .client
            .post(app.url("/lisoloo/webhook"))
            .header("Authorization", basic(USER, p))
            .body(lisoloo_event(&message_id()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{p}");
    }
    app.stop().await.unwrap();

    let mut cfg = config(&brokers, &topic);
    cfg.sources = sources(&[PASS_NEW]);
    let app = spawn_with(cfg).await;
    let old = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, PASS))
        .body(lisoloo_event(&message_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), StatusCode::UNAUTHORIZED);
    let new = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, PASS_NEW))
        .body(lisoloo_event(&message_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(new.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.records(3).await.len(), 3);
}

#[tokio::test]
async fn routes_path_tokens_and_explicit_no_auth() {
    let app = spawn_app().await;
    let batch = format!(
        r#"[{{"Msisdn":"351911111111","Status":"PENDING","MessageId":"{}","OrganizationId":"o","ReportDescription":"","ReportDateTime":"2026-05-27T10:15:00","TotalSegments":1,"CustomPayload":null}}]"#,
        uuid::Uuid::new_v4()
    );
    let post = |path: String, body: String| app.client.post(app.url(&path)).body(body).send();
    let cases = [
        (
            format!("/arpoone-tok/t/{ARPOONE_TOKEN}/webhook"),
            StatusCode::OK,
        ),
        (
            format!("/arpoone-tok/t/{ARPOONE_TOKEN}/webhook/pending"),
            StatusCode::OK,
        ),
        (
            "/arpoone-tok/t/tok_0123456789abcdeX/webhook".to_owned(),
            StatusCode::UNAUTHORIZED,
        ),
        ("/arpoone-tok/webhook".to_owned(), StatusCode::NOT_FOUND),
        (
            format!("/arpoone-tok/t/{ARPOONE_TOKEN}/webhook/unknown"),
            StatusCode::NOT_FOUND,
        ),
        ("/nosuch/webhook".to_owned(), StatusCode::NOT_FOUND),
    ];
    for (path, want) in cases {
        assert_eq!(
            post(path.clone(), batch.clone()).await.unwrap().status(),
            want,
            "{path}"
        );
    }
    // A Lisoloo source has no per-status routes; `auth = "none"` needs no header.
    assert_eq!(
        post("/lisoloo/webhook/delivered".into(), lisoloo_event("m"))
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post("/open/webhook".into(), lisoloo_event("m-open"))
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.records(3).await.len(), 3);
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["partitions"], 6);

    let missing = spawn_with(config(
        &app.brokers,
        &dlrflow_runtime::testing::unique_name("never-created"),
    ))
    .await;
    let ready = missing
        .client
        .get(missing.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
}

#[tokio::test]
async fn config_errors_name_the_setting() {
    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.sources[0].auth = None;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("sources[0].auth"), "{err}");

    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.kafka.delivery_timeout_ms = 6000;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("kafka.delivery_timeout_ms"), "{err}");

    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.sources[0].auth = Some(dlrflow_ingest::config::AuthMode::PathToken);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("sources[0].auth"), "{err}");

    // Secrets never show up in Debug output.
    let cfg = config("127.0.0.1:9092", "t");
    assert!(!format!("{cfg:?}").contains(PASS));
}
