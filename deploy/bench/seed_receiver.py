"""A seed-style Lisoloo receiver, for the ingest benchmark only.

The Lisoloo configuration page's FastAPI snippet ("Verifying the credentials
on your end": Basic auth, hmac.compare_digest) with its "… handle event …"
filled in the way a careful merchant would: the raw body goes to Kafka with
an idempotent acks=all producer (confluent-kafka, librdkafka inside), keyed
by message_id, and the answer waits for the broker's acknowledgement, as
dlrflow-ingest does. Run by deploy/bench/ingest.sh under uvicorn.

Environment: LISOLOO_WEBHOOK_USER, LISOLOO_WEBHOOK_PASS (as in the seed),
BENCH_KAFKA_BROKERS, BENCH_KAFKA_TOPIC.
"""

import asyncio
import base64
import hmac
import json
import os
import threading

from confluent_kafka import KafkaException, Producer
from fastapi import FastAPI, Header, HTTPException, Request

app = FastAPI()
EXPECTED_USER = os.environ["LISOLOO_WEBHOOK_USER"]
EXPECTED_PASS = os.environ["LISOLOO_WEBHOOK_PASS"]
TOPIC = os.environ["BENCH_KAFKA_TOPIC"]

producer = Producer(
    {
        "bootstrap.servers": os.environ["BENCH_KAFKA_BROKERS"],
        "enable.idempotence": True,
        "acks": "all",
    }
)


def _poll_forever():
    while True:
        producer.poll(0.1)


threading.Thread(target=_poll_forever, daemon=True).start()


@app.post("/lisoloo/webhook")
async def webhook(req: Request, authorization: str = Header(None)):
    if not authorization or not authorization.startswith("Basic "):
        raise HTTPException(401)
    raw = base64.b64decode(authorization.split(" ", 1)[1]).decode()
    user, _, password = raw.partition(":")
    if not hmac.compare_digest(user, EXPECTED_USER) or not hmac.compare_digest(
        password, EXPECTED_PASS
    ):
        raise HTTPException(401)
    # … handle event …: durable in Kafka before the answer.
    body = await req.body()
    try:
        key = json.loads(body).get("message_id")
    except (ValueError, AttributeError):
        key = None
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_delivery(err, _msg):
        def settle():
            if done.done():  # the request timed out meanwhile
                return
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(KafkaException(err))

        loop.call_soon_threadsafe(settle)

    producer.produce(TOPIC, value=body, key=key, on_delivery=on_delivery)
    try:
        await asyncio.wait_for(done, 5)
    except Exception:
        raise HTTPException(503)
    return {"ok": True}
