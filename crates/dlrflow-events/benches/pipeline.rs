//! parse + normalize + merge throughput for Lisoloo events (one core).
//!
//! Each iteration takes one raw body from a pre-built stream of 4 events per
//! recipient (processing, sent, delivered, a duplicate delivered) across many
//! recipients, parses it, and merges it into that recipient's current state.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dlrflow_events::{merge, parse_lisoloo, Event, MergeOutcome, RecipientState};

const RECIPIENTS: usize = 1024;

fn bodies() -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::with_capacity(RECIPIENTS * 4);
    for r in 0..RECIPIENTS {
        let phone = format!("+2439988{r:05}");
        let id = |n: usize| format!("f8a3b7c1-2e4d-4a9b-9d8f-{:012x}", r * 8 + n);
        let processing = format!(
            r#"{{"event_id":"{}","event_type":"sms.processing","timestamp":"2026-05-27T10:15:01Z","message_id":"507f1f77bcf86cd799439011","data":{{"recipient_phone":"{phone}","carrier":"vodacom_drc"}}}}"#,
            id(1)
        );
        let sent = format!(
            r#"{{"event_id":"{}","event_type":"sms.sent","timestamp":"2026-05-27T10:15:03Z","message_id":"507f1f77bcf86cd799439011","data":{{"recipient_phone":"{phone}","carrier":"vodacom_drc","sent_at":"2026-05-27T10:15:03Z"}}}}"#,
            id(2)
        );
        let delivered = format!(
            r#"{{"event_id":"{}","event_type":"sms.delivered","timestamp":"2026-05-27T10:15:08Z","message_id":"507f1f77bcf86cd799439011","data":{{"recipient_phone":"{phone}","carrier":"vodacom_drc","delivered_at":"2026-05-27T10:15:08Z","segments":1}}}}"#,
            id(3)
        );
        for b in [processing, sent, delivered.clone(), delivered] {
            out.push((r, b.into_bytes()));
        }
    }
    out
}

fn pipeline(c: &mut Criterion) {
    let input = bodies();
    let mut group = c.benchmark_group("lisoloo");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse+normalize+merge", |b| {
        let mut states: Vec<Option<RecipientState>> = vec![None; RECIPIENTS];
        let mut i = 0usize;
        b.iter(|| {
            let (r, body) = &input[i];
            i = (i + 1) % input.len();
            if i == 0 {
                states.iter_mut().for_each(|s| *s = None);
            }
            let Ok(Event::Recipient(update)) = parse_lisoloo("bench-source", black_box(body))
            else {
                unreachable!("bench input is valid");
            };
            match merge(states[*r].as_ref(), &update) {
                MergeOutcome::Unchanged => {}
                MergeOutcome::Applied { state, .. } | MergeOutcome::Conflict { state } => {
                    states[*r] = Some(state);
                }
            }
        });
    });
    group.bench_function("parse only", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let (_, body) = &input[i];
            i = (i + 1) % input.len();
            black_box(parse_lisoloo("bench-source", black_box(body)).is_ok())
        });
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
