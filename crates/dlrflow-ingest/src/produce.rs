//! The durable write: an idempotent `acks=all` producer with a bounded queue.
//! A record counts only once its delivery future resolved successfully.

use std::time::{Duration, Instant};

use chrono::Utc;
use dlrflow_runtime::kafka::{header, raw_key};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::IngestKafkaConfig;
use crate::error::ApiError;

/// Where a request's records came from: in every record's key
/// ([`raw_key`]); the trace context in its headers.
pub struct Meta<'a> {
    pub source: &'a str,
    pub provider: &'a str,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

pub struct OutRecord<'a> {
    /// The body's message id, if it has one (the key's last part).
    pub message_id: Option<&'a str>,
    pub payload: &'a [u8],
}

pub struct Producer {
    kafka: FutureProducer,
    topic: String,
    delivery_timeout: Duration,
    record_limit: usize,
}

/// The producer could not be created. The text names the setting librdkafka
/// refused but never shows its value, nor any secret of the configuration;
/// it is a string because rdkafka's error carries the value and prints it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CreateError(String);

impl Producer {
    pub fn new(cfg: &IngestKafkaConfig) -> Result<Self, CreateError> {
        let kafka: FutureProducer = cfg
            .client
            .client_config(&[
                ("client.id", "dlrflow-ingest".into()),
                ("enable.idempotence", "true".into()),
                ("acks", "all".into()),
                ("linger.ms", cfg.linger_ms.to_string()),
                ("message.timeout.ms", cfg.message_timeout_ms.to_string()),
                (
                    "queue.buffering.max.messages",
                    cfg.queue_max_messages.to_string(),
                ),
                (
                    "queue.buffering.max.kbytes",
                    cfg.queue_max_kbytes.to_string(),
                ),
                ("socket.nagle.disable", "true".into()),
                ("retry.backoff.ms", "50".into()),
                ("reconnect.backoff.ms", "50".into()),
                ("reconnect.backoff.max.ms", "1000".into()),
            ])
            .create()
            .map_err(|e| CreateError(describe_create_error(&e, cfg)))?;
        Ok(Self {
            kafka,
            topic: cfg.raw_topic.clone(),
            delivery_timeout: cfg.delivery_timeout,
            record_limit: cfg.record_limit(),
        })
    }

    pub fn kafka(&self) -> &FutureProducer {
        &self.kafka
    }

    /// Enqueues every record, then waits for all acknowledgements. Any record
    /// not acknowledged within the delivery timeout fails the whole request:
    /// the gateway resends it and the consumer drops the duplicates.
    pub async fn send_all(
        &self,
        meta: &Meta<'_>,
        records: Vec<OutRecord<'_>>,
    ) -> Result<(), ApiError> {
        let started = Instant::now();
        // The record timestamp is the receive time (ms), one for the whole
        // request; the key says where the record came from (`raw_key`).
        let received_at = Utc::now().timestamp_millis();
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let key = raw_key::encode(meta.source, meta.provider, r.message_id);
            let mut record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(r.payload)
                .timestamp(received_at);
            // Headers only for a trace context: each one is a row on Tansu.
            if let Some(tp) = meta.traceparent {
                let mut headers =
                    OwnedHeaders::new_with_capacity(2).insert(h(header::TRACEPARENT, tp));
                if let Some(ts) = meta.tracestate {
                    headers = headers.insert(h(header::TRACESTATE, ts));
                }
                record = record.headers(headers);
            }
            match self.kafka.send_result(record) {
                Ok(fut) => pending.push(fut),
                Err((KafkaError::MessageProduction(code), _)) if too_large(code) => {
                    metrics::counter!("dlrflow_ingest_produce_failures_total", "reason" => "too_large").increment(1);
                    return Err(self.too_large());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    metrics::counter!("dlrflow_ingest_produce_failures_total", "reason" => "queue_full").increment(1);
                    return Err(ApiError::Unavailable("producer queue full"));
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, "enqueue failed");
                    metrics::counter!("dlrflow_ingest_produce_failures_total", "reason" => "enqueue").increment(1);
                    return Err(ApiError::Unavailable("record could not be enqueued"));
                }
            }
        }
        let n = pending.len();
        // The request's deadline. Records not acknowledged by then stay queued
        // and may still land: the gateway's retry is then a duplicate, which the
        // consumer drops.
        let all = futures::future::join_all(pending);
        let results = tokio::time::timeout(self.delivery_timeout, all)
            .await
            .map_err(|_| {
                metrics::counter!("dlrflow_ingest_produce_failures_total", "reason" => "timeout")
                    .increment(1);
                ApiError::Unavailable("broker did not acknowledge in time")
            })?;
        for res in results {
            match res {
                Ok(Ok(_)) => {}
                Ok(Err((KafkaError::MessageProduction(code), _))) if too_large(code) => {
                    // The broker's limit (broker `message.max.bytes`, topic
                    // `max.message.bytes`) is below the producer's: this record
                    // can never be written, so a retry would only fail again.
                    tracing::error!(
                        error = %code,
                        "the broker refused a record for its size: its limit is below kafka.settings.message.max.bytes"
                    );
                    metrics::counter!("dlrflow_ingest_produce_failures_total", "reason" => "too_large").increment(1);
                    return Err(self.too_large());
                }
                Ok(Err((e, _))) => {
                    tracing::warn!(error = %e, "broker did not acknowledge a record");
                    metrics::counter!("dlrflow_ingest_produce_failures_total", "reason" => "not_acknowledged").increment(1);
                    return Err(ApiError::Unavailable("broker did not acknowledge"));
                }
                Err(_) => return Err(ApiError::Unavailable("producer dropped a record")),
            }
        }
        metrics::counter!("dlrflow_ingest_records_total", "source" => meta.source.to_owned())
            .increment(n as u64);
        metrics::histogram!("dlrflow_ingest_ack_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn too_large(&self) -> ApiError {
        ApiError::TooLarge {
            what: "record",
            limit: self.record_limit,
        }
    }

    /// Whether the broker answers and the raw topic exists.
    pub async fn ready(&self) -> Result<usize, String> {
        dlrflow_runtime::kafka::producer_topic_ready(&self.kafka, &self.topic).await
    }
}

/// The errors that mean "this record can never be written": retrying it
/// (a 503) would fail the same way every time.
fn too_large(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// The producer's creation error without any configured value: rdkafka's
/// text for a refused property ends with the value, and librdkafka's own
/// message quotes it, so only the property and the reason are kept, and any
/// secret of `kafka.settings` still in the text is masked.
fn describe_create_error(e: &KafkaError, cfg: &IngestKafkaConfig) -> String {
    let text = match e {
        KafkaError::ClientConfig(_, reason, key, value) => {
            let reason = if value.is_empty() {
                reason.clone()
            } else {
                reason.replace(value.as_str(), "***")
            };
            format!("librdkafka refused the setting `{key}` (value not shown): {reason}")
        }
        other => other.to_string(),
    };
    redact(&text, cfg.client.secret_settings())
}

/// `text` with every one of `secrets` replaced by `***`.
fn redact<'a>(text: &str, secrets: impl Iterator<Item = &'a str>) -> String {
    let mut out = text.to_owned();
    for s in secrets.filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

fn h<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
