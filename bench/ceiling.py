"""The ceiling's consumer: a minimal paho-mqtt subscriber (QoS 1, persistent session, JSON decode, manual ack).

``python -m bench.ceiling --port P --topic T --client-id C --count N --receive-maximum R`` prints ``ready``
once subscribed, then ``done <monotonic time of the N-th ack>`` (CLOCK_MONOTONIC is system-wide on Linux,
so the driver can compare it with its own clock) and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--receive-maximum", type=int, default=1000)
    args = parser.parse_args(argv)

    done = threading.Event()
    received = 0
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=args.client_id,
                         protocol=mqtt.MQTTv5, manual_ack=True)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        c.subscribe(args.topic, options=SubscribeOptions(qos=1))

    def on_subscribe(c, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        print("ready", flush=True)

    def on_message(c, userdata, message) -> None:  # noqa: ANN001
        nonlocal received
        json.loads(message.payload)
        c.ack(message.mid, message.qos)
        received += 1
        if received == args.count:
            print(f"done {time.monotonic()}", flush=True)
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = args.receive_maximum
    client.connect("127.0.0.1", args.port, keepalive=30, clean_start=False, properties=props)
    client.loop_start()
    done.wait()
    time.sleep(0.1)  # let the last acks out
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
