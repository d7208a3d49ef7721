//! The ingest against the real broker: what is accepted is in the raw topic
//! byte for byte; what is refused writes nothing.

mod helpers;

use std::collections::BTreeSet;

use helpers::*;
use reqwest::StatusCode;

#[tokio::test]
async fn lisoloo_event_is_in_the_raw_topic_byte_for_byte_with_its_origin_in_the_key() {
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
    // Where it came from is in the key, when in the record timestamp; the
    // only header is the trace context (each header is a row on Tansu).
    assert_eq!(
        r.key.as_deref(),
        Some(format!("lisoloo/lisoloo/{mid}").as_bytes()),
        "key = source/provider/message_id"
    );
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["traceparent"], "no header but the trace context");
    assert_eq!(r.header("traceparent"), Some(traceparent));
    let received_at = chrono::DateTime::from_timestamp_millis(r.timestamp.unwrap()).unwrap();
    assert!(
        (chrono::Utc::now() - received_at).num_seconds().abs() < 60,
        "the record timestamp is the receive time: {received_at}"
    );
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
        let key = r.raw_key().unwrap();
        assert_eq!(key.message_id, v["MessageId"].as_str().unwrap());
        assert_eq!(key.provider, "arpoone");
        assert!(r.headers.is_empty(), "no trace context, no header");
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
        .map(|r| r.raw_key().unwrap().message_id.to_owned())
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

    // Over the default body limit: declared, and streamed without a length.
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
    assert_eq!(records[0].raw_key().unwrap().message_id, mid);
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
    let keys: Vec<_> = records.iter().map(|r| r.raw_key().unwrap()).collect();
    assert!(keys
        .iter()
        .all(|k| k.source == "lisoloo" && k.provider == "lisoloo"));
    let keyed: Vec<&str> = keys
        .iter()
        .map(|k| k.message_id)
        .filter(|m| !m.is_empty())
        .collect();
    assert_eq!(
        keyed,
        ["m-unknown"],
        "only the string message_id becomes the key's message id"
    );
}

#[tokio::test]
async fn a_removed_password_stops_working_and_the_others_keep_working() {
    let brokers = dlrflow_testkit::test_brokers();
    let topic = dlrflow_testkit::unique_name("ingest-rotate");
    dlrflow_testkit::create_topic(&brokers, &topic, 6)
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
    let health = app
        .client
        .get(app.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = app
        .client
        .get(app.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: serde_json::Value = ready.json().await.unwrap();
    // The one readiness shape of every service (dlrflow_runtime::service).
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["problems"], serde_json::json!([]), "{body}");
    assert_eq!(body["partitions"], 6);

    let missing = spawn_with(config(
        &app.brokers,
        &dlrflow_testkit::unique_name("never-created"),
    ))
    .await;
    let ready = missing
        .client
        .get(missing.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "not ready", "{body}");
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("kafka: "),
        "{body}"
    );
    let metrics = app
        .client
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);

    // The public port serves webhooks only: the operational routes are on
    // the admin listener and nowhere else.
    assert_ne!(app.addr, app.admin);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let got = app.client.get(app.url(path)).send().await.unwrap().status();
        assert_eq!(got, StatusCode::NOT_FOUND, "{path} on the public port");
    }
    let webhook = app
        .client
        .post(app.admin_url("/lisoloo/webhook"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        webhook.status(),
        StatusCode::NOT_FOUND,
        "webhooks on the admin port"
    );
}

#[tokio::test]
async fn config_errors_name_the_setting() {
    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.sources[0].auth = None;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("sources[0].auth"), "{err}");

    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.kafka.delivery_timeout = std::time::Duration::from_secs(6);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("kafka.delivery_timeout_ms"), "{err}");

    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.sources[0].auth = Some(dlrflow_ingest::config::AuthMode::PathToken);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("sources[0].auth"), "{err}");

    // Secrets never show up in Debug output.
    let mut cfg = config("127.0.0.1:9092", "t");
    cfg.kafka
        .client
        .settings
        .insert("sasl.password".into(), "kafka-s3cret".into());
    cfg.kafka.client.settings.insert(
        "sasl_oauthbearer_client_secret".into(),
        "oauth-s3cret".into(),
    );
    let debug = format!("{cfg:?}");
    for secret in [
        PASS,
        PASS_NEW,
        ARPOONE_TOKEN,
        "kafka-s3cret",
        "oauth-s3cret",
    ] {
        assert!(!debug.contains(secret), "{debug}");
    }

    // No password in the broker address, and the error does not repeat it.
    let mut cfg = config("user:b-s3cret@127.0.0.1:9092", "t");
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("kafka.brokers") && !err.contains("b-s3cret"),
        "{err}"
    );

    // The record limit follows the producer's message.max.bytes.
    cfg.kafka.client.brokers = "127.0.0.1:9092".into();
    cfg.kafka
        .client
        .settings
        .insert("message.max.bytes".into(), "200000".into());
    assert_eq!(
        cfg.kafka.record_limit(),
        200_000 - dlrflow_ingest::RECORD_HEADROOM
    );
    assert_eq!(cfg.body_limit(), cfg.kafka.record_limit());
    cfg.http.body_limit_bytes = Some(300_000);
    assert_eq!(cfg.body_limit(), 300_000);
    cfg.validate().unwrap();
    cfg.kafka
        .client
        .settings
        .insert("message.max.bytes".into(), "4000".into());
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("message.max.bytes"), "{err}");
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Issue 9: a body that starts with a UTF-8 byte-order mark used to get 400,
/// which the gateway treats as final. It is accepted, keyed as usual, and the
/// record holds the bytes as received.
#[tokio::test]
async fn a_body_with_a_byte_order_mark_is_accepted_and_kept_as_received() {
    let app = spawn_app().await;
    let lisoloo_mid = message_id();
    let lisoloo_body = [BOM, lisoloo_event(&lisoloo_mid).as_bytes()].concat();
    let resp = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, PASS))
        .body(lisoloo_body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let arpoone_mid = uuid::Uuid::new_v4().to_string();
    let elements = [
        format!(
            r#"{{"Msisdn":"351911111111","Status":"DELIVERED","MessageId":"{arpoone_mid}","ReportDateTime":"2026-05-27T10:15:00"}}"#
        ),
        format!(
            r#"{{ "Msisdn": "351922222222", "Status": "PENDING", "MessageId": "{arpoone_mid}", "ReportDateTime": "2026-05-27T10:15:01" }}"#
        ),
    ];
    let arpoone_body = [
        BOM,
        format!("[\n {},{}]", elements[0], elements[1]).as_bytes(),
    ]
    .concat();
    let resp = app
        .client
        .post(app.url("/arpoone/webhook/delivered"))
        .header("Authorization", basic(USER, PASS))
        .body(arpoone_body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"], 2);

    // A mark that is not at the very start, or a body that is only a mark,
    // is still not JSON.
    for bad in [
        [b" ", BOM, lisoloo_event("m").as_bytes()].concat(),
        BOM.to_vec(),
        [BOM, BOM, lisoloo_event("m").as_bytes()].concat(),
    ] {
        let resp = app
            .client
            .post(app.url("/lisoloo/webhook"))
            .header("Authorization", basic(USER, PASS))
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    let records = app.records(3).await;
    assert_eq!(records.len(), 3);
    let lisoloo: Vec<_> = records
        .iter()
        .filter(|r| r.raw_key().unwrap().provider == "lisoloo")
        .collect();
    assert_eq!(lisoloo.len(), 1);
    assert_eq!(
        lisoloo[0].payload, lisoloo_body,
        "the whole body, mark included"
    );
    assert_eq!(lisoloo[0].raw_key().unwrap().message_id, lisoloo_mid);
    let arpoone: BTreeSet<&[u8]> = records
        .iter()
        .filter(|r| r.raw_key().unwrap().provider == "arpoone")
        .map(|r| {
            assert_eq!(r.raw_key().unwrap().message_id, arpoone_mid);
            r.payload.as_slice()
        })
        .collect();
    let want: BTreeSet<&[u8]> = elements.iter().map(|e| e.as_bytes()).collect();
    assert_eq!(arpoone, want, "each element's exact bytes");
}

/// A Lisoloo event of exactly `size` bytes (padded in an unknown field).
fn lisoloo_event_of(message_id: &str, size: usize) -> Vec<u8> {
    let base = lisoloo_event(message_id);
    let pad = size - base.len() - r#","pad":"""#.len();
    let body = format!(
        "{},\"pad\":\"{}\"}}",
        &base[..base.len() - 1],
        "x".repeat(pad)
    );
    assert_eq!(body.len(), size);
    body.into_bytes()
}

/// An Arpoone report of exactly `size` bytes (padded in `CustomPayload`).
fn arpoone_report_of(message_id: &str, size: usize) -> String {
    let base = format!(
        r#"{{"Msisdn":"351911111111","Status":"DELIVERED","MessageId":"{message_id}","ReportDateTime":"2026-05-27T10:15:00","CustomPayload":""}}"#
    );
    let at = base.len() - 2;
    let report = format!(
        "{}{}{}",
        &base[..at],
        "y".repeat(size - base.len()),
        &base[at..]
    );
    assert_eq!(report.len(), size);
    report
}

/// Issue 9: a body under `http.body_limit_bytes` but over what the producer
/// can write (librdkafka `message.max.bytes`) used to get 503 on every try,
/// so the gateway spent its retries and dropped the event. A record that can
/// never be written gets 413 at once; the largest one that can is written.
#[tokio::test]
async fn records_over_the_record_limit_get_413_at_once_and_the_largest_allowed_is_written() {
    let brokers = dlrflow_testkit::test_brokers();
    let topic = dlrflow_testkit::unique_name("ingest-sizes");
    dlrflow_testkit::create_topic(&brokers, &topic, 3)
        .await
        .unwrap();

    // The defaults agree: the body limit is the record limit, derived from
    // librdkafka's default message.max.bytes.
    let cfg = config(&brokers, &topic);
    let limit = cfg.kafka.record_limit();
    assert_eq!(limit, 1_000_000 - dlrflow_ingest::RECORD_HEADROOM);
    assert_eq!(cfg.body_limit(), limit);
    let app = spawn_with(cfg).await;
    let post = |app: &TestApp, path: &'static str, body: Vec<u8>| {
        let req = app
            .client
            .post(app.url(path))
            .header("Authorization", basic(USER, PASS))
            .body(body);
        async move {
            let started = std::time::Instant::now();
            let status = req.send().await.unwrap().status();
            (status, started.elapsed())
        }
    };
    // The size from the issue: over message.max.bytes, under 1 MiB.
    let (status, took) = post(
        &app,
        "/lisoloo/webhook",
        lisoloo_event_of(&message_id(), 1_020_331),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    app.stop().await.unwrap();

    // A larger body limit (for big Arpoone batches) still holds every record
    // to the record limit.
    let mut cfg = config(&brokers, &topic);
    cfg.http.body_limit_bytes = Some(4 * 1024 * 1024);
    let app = spawn_with(cfg).await;
    let kept = message_id();
    let cases = [
        (
            "Lisoloo, one byte over",
            "/lisoloo/webhook",
            lisoloo_event_of(&message_id(), limit + 1),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "Lisoloo, the issue's 1,020,331 bytes",
            "/lisoloo/webhook",
            lisoloo_event_of(&message_id(), 1_020_331),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "Lisoloo, a byte-order mark making it one over",
            "/lisoloo/webhook",
            [BOM, &lisoloo_event_of(&message_id(), limit - 2)].concat(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "Arpoone, one element one byte over",
            "/arpoone/webhook",
            format!(
                "[{},{}]",
                arpoone_report_of("a-small", 300),
                arpoone_report_of("a-big", limit + 1)
            )
            .into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "Lisoloo, exactly the limit",
            "/lisoloo/webhook",
            lisoloo_event_of(&kept, limit),
            StatusCode::NO_CONTENT,
        ),
        (
            "Arpoone, two elements of exactly the limit",
            "/arpoone/webhook",
            format!(
                "[{},{}]",
                arpoone_report_of("a-max-1", limit),
                arpoone_report_of("a-max-2", limit)
            )
            .into_bytes(),
            StatusCode::OK,
        ),
    ];
    let mut want: BTreeSet<Vec<u8>> = BTreeSet::new();
    for (name, path, body, status) in cases {
        let (got, took) = post(&app, path, body.clone()).await;
        assert_eq!(got, status, "{name}");
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            assert!(took < std::time::Duration::from_secs(1), "{name}: {took:?}");
        } else if path == "/lisoloo/webhook" {
            want.insert(body);
        } else {
            let elements: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(&body).unwrap();
            want.extend(elements.iter().map(|e| e.get().as_bytes().to_vec()));
        }
    }
    let records = app.records(3).await;
    let got: BTreeSet<Vec<u8>> = records.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(records.len(), 3, "only the records at the limit");
    assert!(got == want, "the records at the limit, byte for byte");
    assert!(records
        .iter()
        .any(|r| r.raw_key().unwrap().message_id == kept));
    app.stop().await.unwrap();

    // A message.max.bytes in kafka.settings moves the record limit with it.
    let topic = dlrflow_testkit::unique_name("ingest-sizes-set");
    dlrflow_testkit::create_topic(&brokers, &topic, 1)
        .await
        .unwrap();
    let mut cfg = config(&brokers, &topic);
    cfg.kafka
        .client
        .settings
        .insert("message_max_bytes".into(), "100000".into());
    let limit = 100_000 - dlrflow_ingest::RECORD_HEADROOM;
    assert_eq!(cfg.body_limit(), limit);
    let app = spawn_with(cfg).await;
    let over = lisoloo_event_of(&message_id(), limit + 1);
    let (status, took) = post(&app, "/lisoloo/webhook", over).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    // At the limit with the longest key and every header: the headroom holds.
    let long_key = "k".repeat(dlrflow_ingest::MAX_KEY_LEN);
    let at = lisoloo_event_of(&long_key, limit);
    let resp = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, PASS))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(at.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let records = app.records(1).await;
    assert_eq!(records.len(), 1);
    assert!(records[0].payload == at);
    assert_eq!(records[0].raw_key().unwrap().message_id, long_key);
    assert!(records[0].header("traceparent").is_some());
}

/// Issue 9: the `source` label came from the URL path, so every random path
/// made a new series. Only configured names (or `unknown`) are label values.
#[tokio::test]
async fn metric_labels_take_only_configured_source_names() {
    let app = spawn_app().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let paths = [
        format!("/x{tag}/webhook"),
        format!("/y{tag}/webhook/delivered"),
        format!("/z{tag}/t/tok_0123456789abcdef/webhook"),
        format!("/w{tag}/t/tok/webhook/pending"),
    ];
    for p in &paths {
        let resp = app
            .client
            .post(app.url(p))
            .header("Authorization", basic(USER, PASS))
            .body(lisoloo_event("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{p}");
    }
    // A configured source keeps its name, whatever the outcome.
    let resp = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, "wrong"))
        .body(lisoloo_event("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let metrics = dlrflow_testkit::scrape(&app.admin_url("")).await;
    assert!(!metrics.contains(&tag), "a path became a label:\n{metrics}");
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("dlrflow_ingest_requests_total{"))
        .collect();
    let unknown: f64 = requests
        .iter()
        .filter(|l| l.contains(r#"source="unknown""#) && l.contains(r#"outcome="unknown_route""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(unknown >= paths.len() as f64, "{requests:#?}");
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"source="lisoloo""#) && l.contains(r#"outcome="unauthorized""#)),
        "{requests:#?}"
    );
    for l in &requests {
        let source = l
            .split("source=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap();
        assert!(
            ["lisoloo", "arpoone", "arpoone-tok", "open", "unknown"].contains(&source),
            "{l}"
        );
    }
}

#[tokio::test]
async fn webhooks_over_tls_are_accepted_on_http1_and_http2() {
    use dlrflow_testkit::tls::TestCa;
    let brokers = dlrflow_testkit::test_brokers();
    let topic = dlrflow_testkit::unique_name("ingest-tls");
    dlrflow_testkit::create_topic(&brokers, &topic, 3)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ingest");
    let files = ca.issue().write(dir.path());
    let mut cfg = config(&brokers, &topic);
    cfg.http.server.tls = Some(files.settings());
    let app = spawn_with(cfg).await;
    let url = format!("https://localhost:{}/lisoloo/webhook", app.addr.port());
    for http1_only in [false, true] {
        let client = ca.client(http1_only);
        let r = client
            .post(&url)
            .header("Authorization", basic(USER, PASS))
            .body(lisoloo_event(&message_id()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let want = if http1_only {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(r.version(), want);
    }
    // Plain HTTP on the TLS port gets no answer, and writes nothing.
    let plain = app
        .client
        .post(app.url("/lisoloo/webhook"))
        .header("Authorization", basic(USER, PASS))
        .body(lisoloo_event(&message_id()))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::NO_CONTENT);
    assert_eq!(app.records(2).await.len(), 2);
    app.stop().await.unwrap();
}
