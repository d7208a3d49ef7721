#!/usr/bin/env python3
"""dlrflow capacity model: from a traffic profile to partitions, replicas and
whether the status-API budget suffices. Every constant is a figure measured on
this project's 2-core machine (reports/README.md) or a rule of the providers'
documents; see docs/capacity.md for where each comes from and where it stops.

    deploy/capacity/model.py --messages-per-day 2000000 --recipients 5 \
        --missing-rate 0.02 [--peak-factor 10] [--json]

Prints a table (or JSON) and exits 0; exits 3 when the status API's budget
cannot reconcile the expected missing reports (the one ceiling that more
machines do not lift). `--check` runs the model's own consistency checks.
"""

import argparse
import json
import math
import sys

# --- measured (reports/README.md, 2-core machine, 2026-12-06) --------------
# dlrflow-ingest, one replica, c=200, 2xx only after acks=all: requests/s.
INGEST_REQ_PER_S = 31_007
# dlrflow-state, one replica, raw topic -> committed state (the broker on the
# same 2 cores), sustained: the relay publishing beside the consumer (a
# burst is committed faster, 26,160-28,450, while the relay defers), the
# lowest of three runs with the defaults (2 writers, 4,000 per batch):
# 18,860-19,367 events/s.
STATE_EVENTS_PER_S = 18_860
# Headroom kept free on every measured rate (bursts, GC, a replica restarting).
HEADROOM = 0.5

# --- rules of the providers' documents and of the design -------------------
# Lisoloo: one sms.queued per message, then processing, sent and a terminal
# event per recipient; the gateway retries (30 s, 2 m, 10 m, 1 h) only on
# failures, so steady state is one delivery per event.
EVENTS_PER_MESSAGE_BASE = 1
EVENTS_PER_RECIPIENT = 3
# The status API: 120 reads per sliding minute per API key, across replicas;
# one read covers every recipient of a message.
STATUS_READS_PER_DAY = 120 * 60 * 24
# PostgreSQL rows written per applied event (the write path): the
# delivery_events dedupe row, the recipient_state upsert, one outbox row
# (and its publish mark); the messages row once per message.
PG_ROWS_PER_EVENT = 3
# Redis commands per event (state dedupe): one MGET member and one SET.
REDIS_OPS_PER_EVENT = 2
# A partition is consumed by one replica at a time; never give a state
# replica less than one partition, and keep partitions for growth.
MIN_PARTITIONS = 6


def model(messages_per_day, recipients, missing_rate, peak_factor, duplicate_rate=0.02):
    events_per_message = (EVENTS_PER_MESSAGE_BASE + EVENTS_PER_RECIPIENT * recipients) * (
        1 + duplicate_rate
    )
    events_per_day = messages_per_day * events_per_message
    avg_events_per_s = events_per_day / 86_400
    peak_events_per_s = avg_events_per_s * peak_factor
    ingest_replicas = max(2, math.ceil(peak_events_per_s / (INGEST_REQ_PER_S * HEADROOM)))
    state_replicas = max(1, math.ceil(peak_events_per_s / (STATE_EVENTS_PER_S * HEADROOM)))
    partitions = max(MIN_PARTITIONS, 2 * state_replicas)
    # A message needs a read when at least one recipient's terminal report
    # never arrives (the gateway gave up after its retries).
    p_message_needs_read = 1 - (1 - missing_rate) ** recipients
    reads_needed_per_day = messages_per_day * p_message_needs_read
    budget_share = reads_needed_per_day / STATUS_READS_PER_DAY
    max_messages_per_day = (
        STATUS_READS_PER_DAY / p_message_needs_read if p_message_needs_read > 0 else math.inf
    )
    return {
        "input": {
            "messages_per_day": messages_per_day,
            "recipients_per_message": recipients,
            "missing_report_rate": missing_rate,
            "peak_factor": peak_factor,
            "duplicate_rate": duplicate_rate,
        },
        "events_per_day": round(events_per_day),
        "events_per_s": {"average": round(avg_events_per_s, 1), "peak": round(peak_events_per_s, 1)},
        "ingest_replicas": ingest_replicas,
        "state_replicas": state_replicas,
        "raw_topic_partitions": partitions,
        "reconcile_replicas": 2,
        "postgres_rows_per_s_peak": round(peak_events_per_s * PG_ROWS_PER_EVENT),
        "redis_ops_per_s_peak": round(peak_events_per_s * REDIS_OPS_PER_EVENT),
        "status_reads": {
            "needed_per_day": round(reads_needed_per_day),
            "budget_per_day": STATUS_READS_PER_DAY,
            "budget_used": round(budget_share, 4),
            "max_messages_per_day_at_this_rate": (
                None if math.isinf(max_messages_per_day) else round(max_messages_per_day)
            ),
            "suffices": budget_share <= 1.0,
        },
    }


def check():
    # 2M messages x 5 recipients at 2 % missing: 9.6 % of messages need a
    # read, 192k reads/day > 172.8k: the budget does not suffice.
    m = model(2_000_000, 5, 0.02, 10)
    assert not m["status_reads"]["suffices"], m
    assert abs(m["status_reads"]["needed_per_day"] - 2_000_000 * (1 - 0.98**5)) < 1
    # 100k messages a day is well inside one replica of each.
    m = model(100_000, 5, 0.02, 10)
    assert m["status_reads"]["suffices"] and m["state_replicas"] == 1, m
    # Replicas never exceed partitions; partitions never drop below the floor.
    for mpd in (1e4, 1e6, 1e8):
        m = model(mpd, 5, 0.01, 20)
        assert m["state_replicas"] <= m["raw_topic_partitions"], m
        assert m["raw_topic_partitions"] >= MIN_PARTITIONS
    # No missing reports: no read needed, no ceiling.
    assert model(1e6, 5, 0.0, 10)["status_reads"]["max_messages_per_day_at_this_rate"] is None
    print("model checks: ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages-per-day", type=float)
    ap.add_argument("--recipients", type=int, default=5)
    ap.add_argument("--missing-rate", type=float, default=0.02, help="share of terminal reports the gateway never delivers")
    ap.add_argument("--peak-factor", type=float, default=10, help="peak events/s over the day's average (a big send)")
    ap.add_argument("--duplicate-rate", type=float, default=0.02)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.check:
        check()
        return 0
    if a.messages_per_day is None:
        ap.error("--messages-per-day is required")
    m = model(a.messages_per_day, a.recipients, a.missing_rate, a.peak_factor, a.duplicate_rate)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        s = m["status_reads"]
        rows = [
            ("events/day", f"{m['events_per_day']:,}"),
            ("events/s average / peak", f"{m['events_per_s']['average']:,} / {m['events_per_s']['peak']:,}"),
            ("ingest replicas", m["ingest_replicas"]),
            ("state replicas", m["state_replicas"]),
            ("raw topic partitions", m["raw_topic_partitions"]),
            ("reconcile replicas", m["reconcile_replicas"]),
            ("PostgreSQL rows/s at peak", f"{m['postgres_rows_per_s_peak']:,}"),
            ("Redis ops/s at peak", f"{m['redis_ops_per_s_peak']:,}"),
            ("status reads needed/day", f"{s['needed_per_day']:,} of {s['budget_per_day']:,} ({s['budget_used']:.1%})"),
            ("messages/day the budget can reconcile", "unbounded" if s["max_messages_per_day_at_this_rate"] is None else f"{s['max_messages_per_day_at_this_rate']:,}"),
            ("budget suffices", "yes" if s["suffices"] else "NO: more API keys (each its own budget) or fewer missing reports"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    return 0 if m["status_reads"]["suffices"] else 3


if __name__ == "__main__":
    sys.exit(main())
