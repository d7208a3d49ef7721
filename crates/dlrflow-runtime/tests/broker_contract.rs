//! What dlrflow needs from its Kafka-protocol broker, checked against the real
//! one so that a broker upgrade (or a storage engine that loses offsets, like
//! Tansu's `memory://`) cannot silently break it:
//! - a group member that committed mid-batch and restarts resumes exactly
//!   there: nothing skipped, nothing replayed from before the commit;
//! - records and committed offsets survive a `kill -9` of the broker.

use std::time::{Duration, Instant};

use dlrflow_testkit::{create_topic, test_brokers, unique_name, PrivateBroker};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

async fn produce(brokers: &str, topic: &str, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let futs: Vec<_> = (0..n)
        .map(|i| {
            let payload = i.to_string();
            producer
                .send_result(
                    FutureRecord::<(), _>::to(topic)
                        .payload(&payload)
                        .partition(0),
                )
                .unwrap()
        })
        .collect();
    for f in futs {
        f.await.unwrap().unwrap();
    }
}

fn consumer(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap()
}

/// Reads up to `n` payloads (as numbers) within `timeout`.
fn read(c: &BaseConsumer, n: usize, timeout: Duration) -> Vec<usize> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            out.push(
                std::str::from_utf8(m.payload().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
        }
    }
    out
}

fn commit_at(c: &BaseConsumer, topic: &str, next: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(next))
        .unwrap();
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

/// Group member reads 500 of 1,000, commits offset 500, goes away; a new member
/// of the same group must get exactly records 500..999.
#[tokio::test]
async fn a_member_resuming_mid_batch_gets_every_remaining_record() {
    let brokers = test_brokers();
    let topic = unique_name("contract-resume");
    let group = unique_name("contract-group");
    create_topic(&brokers, &topic, 1).await.unwrap();
    produce(&brokers, &topic, 1000).await;

    let (b, t, g) = (brokers.clone(), topic.clone(), group.clone());
    tokio::task::spawn_blocking(move || {
        let c = consumer(&b, &g);
        c.subscribe(&[&t]).unwrap();
        let first = read(&c, 500, Duration::from_secs(30));
        assert_eq!(first, (0..500).collect::<Vec<_>>());
        commit_at(&c, &t, 500);
        drop(c);

        let c = consumer(&b, &g);
        c.subscribe(&[&t]).unwrap();
        let rest = read(&c, 500, Duration::from_secs(30));
        assert_eq!(
            rest,
            (500..1000).collect::<Vec<_>>(),
            "resumed exactly at the committed offset"
        );
        assert!(
            read(&c, 1, Duration::from_secs(1)).is_empty(),
            "nothing beyond the end"
        );
    })
    .await
    .unwrap();
}

/// A private broker (own port, own SQLite file) so killing it disturbs no
/// other test.
#[tokio::test]
async fn records_and_committed_offsets_survive_kill_9_of_the_broker() {
    let mut broker = PrivateBroker::start().unwrap();
    let brokers = broker.brokers();
    let topic = "contract-restart";
    let group = "contract-restart-group";
    create_topic(&brokers, topic, 1).await.unwrap();
    produce(&brokers, topic, 200).await;

    let b = brokers.clone();
    tokio::task::spawn_blocking(move || {
        let c = consumer(&b, group);
        c.subscribe(&[topic]).unwrap();
        assert_eq!(
            read(&c, 120, Duration::from_secs(30)),
            (0..120).collect::<Vec<_>>()
        );
        commit_at(&c, topic, 120);
    })
    .await
    .unwrap();

    broker.kill9();
    broker.restart().unwrap();

    let b = brokers.clone();
    tokio::task::spawn_blocking(move || {
        let c = consumer(&b, group);
        c.subscribe(&[topic]).unwrap();
        let rest = read(&c, 80, Duration::from_secs(40));
        assert_eq!(
            rest,
            (120..200).collect::<Vec<_>>(),
            "committed offset kept across kill -9"
        );

        let all = consumer(&b, &unique_name("contract-all"));
        all.subscribe(&[topic]).unwrap();
        assert_eq!(
            read(&all, 200, Duration::from_secs(40)),
            (0..200).collect::<Vec<_>>(),
            "every record kept"
        );
    })
    .await
    .unwrap();
}
