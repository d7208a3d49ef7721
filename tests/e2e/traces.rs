//! OpenTelemetry traces from the gateway's request to the state row: an
//! OTLP/HTTP receiver inside the test decodes what the real ingest and the
//! real state service export for one posted event. The ingest's server span
//! is a child of the gateway's `traceparent`; the state's batch span links
//! to the context the ingest wrote into the record, with the messaging
//! attributes; dedupe, merge and the transaction are its children. The
//! change's analytics record carries the trace in its `traceparent` header
//! and the relay's `publish` span links to it. The
//! reconciler makes one span per job, with the grant wait, the status read
//! and the write as its children.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use dlrflow_e2e::{status_server, timed, Options, Pipeline, ReconcileOptions, PASSWORD, USERNAME};
use serde_json::Value;

/// Every span the receiver got, with its service's name.
type Spans = Arc<Mutex<Vec<(String, Value)>>>;

/// An OTLP/HTTP JSON trace receiver on 127.0.0.1: `POST /v1/traces`.
async fn receiver() -> (String, Spans, tokio::task::JoinHandle<()>) {
    let spans: Spans = Arc::default();
    let store = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for span in ss["spans"].as_array().into_iter().flatten() {
                            store.lock().unwrap().push((service.clone(), span.clone()));
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, spans, task)
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn text(v: Option<&Value>) -> Option<String> {
    let v = v?;
    v["stringValue"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| v["intValue"].as_str().map(str::to_owned))
        .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_gateway_request_to_the_state_batch() {
    let _t = timed("one_trace_from_the_gateway_request_to_the_state_batch");
    let (otlp, spans, server) = receiver().await;
    let mut p = Pipeline::new("traces", &Options::default()).await.unwrap();
    p.extra_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), otlp),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    p.start_ingest().await.unwrap();
    p.start_state(1).await.unwrap();
    // A gateway that knows no message: the reconciler's read is a 404,
    // still one job with its spans.
    let gateway = dlrflow_sim::Gateway::new();
    let status = status_server(&gateway).await;
    p.start_reconcile(&ReconcileOptions {
        status_api: status.base_url(),
        sources: vec!["lisoloo".into()],
        deadline_secs: 1,
        sweep_interval_ms: 300,
    })
    .await
    .unwrap();

    let trace = uuid::Uuid::new_v4().simple().to_string();
    let gateway_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let message_id = format!("traces-{}", &trace[..8]);
    // Now: a message older than the reconciler's give-up age is not read.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let event = serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "sms.sent",
        "timestamp": now,
        "message_id": message_id,
        "data": {"recipient_phone": "+243990000001", "sent_at": now},
    });
    let r = reqwest::Client::new()
        .post(format!("{}/lisoloo/webhook", p.ingest_url()))
        .basic_auth(USERNAME, Some(PASSWORD))
        .header("traceparent", format!("00-{trace}-{gateway_span}-01"))
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // The ingest's server span and the state's batch span that links to it.
    let found = dlrflow_testkit::wait_for(Duration::from_secs(60), || async {
        let spans = spans.lock().unwrap().clone();
        let ingest = spans.iter().find(|(svc, s)| {
            svc == "dlrflow-ingest" && s["name"] == "webhook" && s["traceId"] == trace.as_str()
        })?;
        let ingest_id = ingest.1["spanId"].as_str()?.to_owned();
        let batch = spans.iter().find(|(svc, s)| {
            svc == "dlrflow-state"
                && s["name"] == "process batch"
                && s["links"].as_array().is_some_and(|l| {
                    l.iter().any(|l| {
                        l["traceId"] == trace.as_str() && l["spanId"] == ingest_id.as_str()
                    })
                })
        })?;
        Some((ingest.1.clone(), batch.1.clone(), spans))
    })
    .await;
    let Some((ingest, batch, all)) = found else {
        let names: Vec<String> = spans
            .lock()
            .unwrap()
            .iter()
            .map(|(svc, s)| format!("{svc}:{} {}", s["name"], s["traceId"]))
            .collect();
        panic!("no linked ingest and batch spans for trace {trace}; got {names:?}");
    };
    // The ingest's span continues the gateway's trace as a server span.
    assert_eq!(ingest["parentSpanId"], gateway_span, "{ingest}");
    assert_eq!(ingest["kind"], 2, "SPAN_KIND_SERVER: {ingest}");
    // The batch: a consumer span with the messaging attributes, and on the
    // link the record's partition and offset.
    assert_eq!(batch["kind"], 5, "SPAN_KIND_CONSUMER: {batch}");
    assert_eq!(
        text(attr(&batch, "messaging.system")).as_deref(),
        Some("kafka")
    );
    assert_eq!(
        text(attr(&batch, "messaging.destination.name")),
        Some(p.raw_topic.clone())
    );
    assert_eq!(
        text(attr(&batch, "messaging.consumer.group.name")),
        Some(p.group.clone())
    );
    let link = batch["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["traceId"] == trace.as_str())
        .unwrap();
    assert!(
        text(attr(link, "messaging.destination.partition.id")).is_some(),
        "{link}"
    );
    assert!(
        text(attr(link, "messaging.kafka.offset")).is_some(),
        "{link}"
    );
    // The steps are the batch span's children.
    let batch_id = batch["spanId"].as_str().unwrap();
    for step in ["dedupe", "postgres transaction"] {
        assert!(
            all.iter()
                .any(|(_, s)| s["name"] == step && s["parentSpanId"] == batch_id),
            "no {step} span under the batch"
        );
    }
    assert!(
        all.iter().any(|(_, s)| s["name"] == "merge"),
        "no merge span"
    );
    // The change's dlrflow.delivery.v1 record carries the trace on: its
    // `traceparent` header is in the gateway's trace, and the relay's
    // `publish` span (a producer span) links to it.
    let records = dlrflow_testkit::read_topic(
        &p.brokers,
        &p.delivery_topic,
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let record = records
        .iter()
        .find(|r| r.key.as_deref() == Some(message_id.as_bytes()))
        .unwrap_or_else(|| panic!("no analytics record for {message_id}: {records:?}"));
    let carried = record
        .header("traceparent")
        .unwrap_or_else(|| panic!("analytics record without traceparent: {record:?}"));
    assert_eq!(
        carried.split('-').nth(1),
        Some(trace.as_str()),
        "the analytics record's traceparent {carried} is not in trace {trace}"
    );
    let publish = dlrflow_testkit::wait_for(Duration::from_secs(30), || async {
        spans.lock().unwrap().iter().find_map(|(svc, s)| {
            (svc == "dlrflow-state"
                && s["name"] == "publish"
                && s["links"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|l| l["traceId"] == trace.as_str())))
            .then(|| s.clone())
        })
    })
    .await
    .unwrap_or_else(|| panic!("no publish span linked to trace {trace}"));
    assert_eq!(publish["kind"], 4, "SPAN_KIND_PRODUCER: {publish}");
    assert_eq!(
        text(attr(&publish, "messaging.destination.name")),
        Some(p.delivery_topic.clone())
    );
    // The message stays `sent` past its deadline: the reconciler reads it.
    let job = dlrflow_testkit::wait_for(Duration::from_secs(150), || async {
        let spans = spans.lock().unwrap().clone();
        let job = spans.iter().find(|(svc, s)| {
            svc == "dlrflow-reconcile"
                && s["name"] == "reconcile job"
                && text(attr(s, "message_id")).as_deref() == Some(message_id.as_str())
        })?;
        let id = job.1["spanId"].as_str()?.to_owned();
        let children: Vec<String> = spans
            .iter()
            .filter(|(_, s)| s["parentSpanId"] == id.as_str())
            .filter_map(|(_, s)| s["name"].as_str().map(str::to_owned))
            .collect();
        (children.iter().any(|n| n == "grant wait") && children.iter().any(|n| n == "status read"))
            .then_some(children)
    })
    .await;
    if job.is_none() {
        let names: Vec<String> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(svc, _)| svc == "dlrflow-reconcile")
            .map(|(_, s)| format!("{} {:?}", s["name"], text(attr(s, "message_id"))))
            .collect();
        panic!("no reconcile job span for {message_id} with its grant wait and status read; got {names:?}");
    }
    p.finish().await;
    status.shutdown().await;
    server.abort();
}
