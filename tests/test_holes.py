"""The small holes of issue 21, each closed: a webhook receiver that trickles its answer, hostile replay, collect and
batch input, the paired tests at their extremes, and the clinic's refusals in its own name."""

import json
import socket
import threading
from datetime import datetime, timezone

import pytest

# --- the alert webhook: a total deadline ---------------------------------------------------------------------------


class Trickler:
    """A real HTTP receiver on 127.0.0.1 that reads the request, then answers a byte at a time, `pause` seconds apart:
    `answer` whole, then (with `endless`) header lines for as long as the client keeps the connection open."""

    def __init__(self, pause: float = 0.2, answer: bytes = b"HTTP/1.1 200 OK\r\n", endless: bool = True):
        self.pause, self.answer, self.endless = pause, answer, endless
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/alerts"
        self.requests, self.hung_up = [], threading.Event()
        self.stopped = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.answer_one, args=(connection,), daemon=True).start()

    def answer_one(self, connection):
        with connection:
            received = b""
            while b"\r\n\r\n" not in received:
                received += connection.recv(65536)
            head, body = received.split(b"\r\n\r\n", 1)
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += connection.recv(65536)
            self.requests.append(json.loads(body))
            tail = b"X-Slow: " + b"a" * 100_000 if self.endless else b"Content-Length: 0\r\n\r\n"
            try:
                for byte in self.answer + tail:
                    if self.stopped.wait(self.pause):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:  # the client shut the connection
                self.hung_up.set()

    def close(self):
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def trickler():
    receivers = []

    def make(**options):
        receivers.append(Trickler(**options))
        return receivers[-1]

    yield make
    for receiver in receivers:
        receiver.close()


def within(seconds: float, function, *args, **kwargs):
    "Call `function` on a thread and wait at most `seconds` (a bound for a hang, far above the deadline under test)."
    answer = []
    worker = threading.Thread(target=lambda: answer.append(function(*args, **kwargs)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert answer, f"{function.__name__} was still waiting after {seconds} s"
    return answer[0]


def test_a_trickling_receiver_gets_no_more_than_the_deadline(trickler):
    from lifecycle.webhook import post_webhook

    receiver = trickler(pause=0.2)  # its answer would take over 5 hours, a byte every 0.2 s
    delivered, line = within(60, post_webhook, receiver.url, {"version": "4"}, deadline=1)
    assert (delivered, line) == (False, "not delivered after 1 attempt (no answer within 1 s)")
    assert receiver.requests == [{"version": "4"}]
    assert receiver.hung_up.wait(60)  # the connection was shut: no thread lingers on the trickle
    slow_but_done = trickler(pause=0.01, endless=False)  # a whole answer, slowly, well within the deadline
    assert within(60, post_webhook, slow_but_done.url, {"version": "4"}) == (True, "delivered (HTTP 200)")


def test_a_trickling_receiver_holds_monitoring_no_longer_than_the_deadline(tmp_path, trickler):
    "raise_alerts as monitoring calls it (the default deadline): the alert waits in the outbox for the next run."
    from lifecycle.alerts import parse_rules, raise_alerts

    receiver = trickler(pause=0.5)
    rules = parse_rules("auc_low (critical): roc_auc < 0.65", "[monitor] alerts")
    now = datetime(2026, 12, 7, tzinfo=timezone.utc)
    result = within(120, raise_alerts, tmp_path, rules, {"roc_auc": 0.5}, now, webhook=receiver.url)
    assert result["delivery"] == "not delivered after 1 attempt (no answer within 10 s)"
    assert [alert["labels"]["alertname"] for alert in result["sent"]] == ["auc_low"]
    assert "1 alerts wait for the next run" in " ".join(result["statements"])
    state = json.loads((tmp_path / "alerts_state.json").read_text())
    assert [alert["labels"]["alertname"] for alert in state["outbox"]] == ["auc_low"]
