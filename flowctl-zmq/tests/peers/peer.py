"""pyzmq peer for the flowctl-zmq integration tests.

Every mode is bounded (message counts and a hard alarm), prints "READY <endpoint>"
once bound or connected, and prints "OK <n>" or "ERR <reason>" before exiting.

Message format used by the checkers: frames [b"<i>", payload(i, size)].
"""
import argparse
import signal
import sys
import time

import zmq


def payload(i, size):
    seed = (b"%08d" % i)
    return (seed * (size // len(seed) + 1))[:size]


def say(*parts):
    print(*parts, flush=True)


def check(frames, i, size, prefix=None):
    want = ([prefix] if prefix is not None else []) + [b"%d" % i, payload(i, size)]
    if frames != want:
        say("ERR", "message", i, "was", repr(frames)[:200], "expected", repr(want)[:200])
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--bind")
    ap.add_argument("--connect")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--hwm", type=int, default=1000)
    ap.add_argument("--rcvbuf", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--alarm", type=int, default=90)
    ap.add_argument("--progress", action="store_true", help="pull: print GOT <i> after each message")
    ap.add_argument("--gate", action="store_true", help="pull: read nothing until a GO line on stdin")
    a = ap.parse_args()
    signal.alarm(a.alarm)  # never outlive a broken test

    ctx = zmq.Context()
    kind = {
        "pull": zmq.PULL, "pull-gated": zmq.PULL, "push": zmq.PUSH, "xpub": zmq.XPUB, "sub": zmq.SUB, "sub-gated": zmq.SUB,
        "router-echo": zmq.ROUTER, "dealer": zmq.DEALER, "pair-echo": zmq.PAIR,
        "frames": zmq.PUSH, "wide": zmq.PUSH, "rep-echo": zmq.REP, "req": zmq.REQ,
    }[a.mode]
    s = ctx.socket(kind)
    s.setsockopt(zmq.SNDHWM, a.hwm)
    s.setsockopt(zmq.RCVHWM, a.hwm)
    s.setsockopt(zmq.LINGER, 20000)
    if a.mode == "dealer":
        s.setsockopt(zmq.ROUTING_ID, b"py-dealer")
    if a.rcvbuf:
        # A fixed kernel receive buffer (no autotuning up to tcp_rmem's max).
        s.setsockopt(zmq.RCVBUF, a.rcvbuf)
    if a.mode == "router-echo":
        # Block at the HWM instead of dropping: the checker expects every echo.
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if a.mode == "xpub":
        # Block at the HWM instead of dropping: the checker expects every message.
        s.setsockopt(zmq.XPUB_NODROP, 1)
    if a.mode == "sub-gated":
        s.setsockopt(zmq.SUBSCRIBE, b"")
    if a.mode == "sub":
        s.setsockopt(zmq.SUBSCRIBE, b"A")
        s.setsockopt(zmq.SUBSCRIBE, b"probe")
    if a.bind:
        s.bind(a.bind)
        ep = s.getsockopt(zmq.LAST_ENDPOINT).decode()
    else:
        s.connect(a.connect)
        ep = a.connect
    say("READY", ep)

    n = a.count
    if a.mode == "pull":
        # Receives n messages, checking content and order; sleeps per message
        # if slow; with --gate, only after a "GO" line on stdin.
        if a.gate:
            line = sys.stdin.readline()
            if line.strip() != "GO":
                say("ERR", "expected GO on stdin, got", repr(line))
                sys.exit(1)
        for i in range(n):
            check(s.recv_multipart(), i, a.size)
            if a.progress:
                say("GOT", i)
            if a.delay_ms:
                time.sleep(a.delay_ms / 1000.0)
        say("OK", n)
    elif a.mode == "pull-gated":
        # Reads nothing until a "GO" line on stdin, then receives until a
        # [b"END"] message, checking each message's content and that the
        # indices only increase (gaps allowed: a dropping sender). Prints
        # "COUNT <messages> LAST <last index>".
        line = sys.stdin.readline()
        if line.strip() != "GO":
            say("ERR", "expected GO on stdin, got", repr(line))
            sys.exit(1)
        got = 0
        last = -1
        while True:
            frames = s.recv_multipart()
            if frames == [b"END"]:
                break
            i = int(frames[0])
            if i <= last:
                say("ERR", "message", i, "after", last)
                sys.exit(1)
            check(frames, i, a.size)
            last = i
            got += 1
        say("COUNT", got, "LAST", last)
        say("OK", got)
    elif a.mode == "sub-gated":
        # Reads until the first probe (the subscription is in place) and
        # prints PROBED, then reads nothing until "GO" on stdin; then receives
        # until [b"END"], skipping probes, checking each message's content
        # and that the indices only increase (gaps allowed: a dropping PUB).
        # Prints "COUNT <messages> LAST <last index>".
        s.setsockopt(zmq.RCVTIMEO, 30000)
        while s.recv_multipart()[0] != b"probe":
            pass
        say("PROBED")
        line = sys.stdin.readline()
        if line.strip() != "GO":
            say("ERR", "expected GO on stdin, got", repr(line))
            sys.exit(1)
        got = 0
        last = -1
        while True:
            frames = s.recv_multipart()
            if frames == [b"END"]:
                break
            if frames[0] == b"probe":
                continue
            i = int(frames[0])
            if i <= last:
                say("ERR", "message", i, "after", last)
                sys.exit(1)
            check(frames, i, a.size)
            last = i
            got += 1
        say("COUNT", got, "LAST", last)
        say("OK", got)
    elif a.mode == "push":
        for i in range(n):
            s.send_multipart([b"%d" % i, payload(i, a.size)])
        say("OK", n)
    elif a.mode == "frames":
        # Bad input: a 3-frame message, then a good 2-frame one.
        s.send_multipart([b"x", b"y", b"z"])
        s.send_multipart([b"0", payload(0, a.size)])
        say("OK", 2)
    elif a.mode == "wide":
        # Bad input: one message of n empty frames, then a good 2-frame one.
        s.send_multipart([b""] * n)
        s.send_multipart([b"0", payload(0, a.size)])
        say("OK", 2)
    elif a.mode == "xpub":
        # Waits for the subscriber's "A" subscription, then publishes topics A and B.
        while True:
            sub = s.recv()
            if sub == b"\x01A":
                break
        for i in range(n):
            s.send_multipart([b"A", b"%d" % i, payload(i, a.size)])
            s.send_multipart([b"B", b"%d" % i, payload(i, a.size)])
        say("OK", n)
    elif a.mode == "sub":
        # Waits for a probe, then expects n messages on topic A in order.
        s.setsockopt(zmq.RCVTIMEO, 30000)
        i = 0
        probed = False
        while i < n:
            frames = s.recv_multipart()
            if frames[0] == b"probe":
                if not probed:
                    probed = True
                    say("PROBED")
                continue
            check(frames, i, a.size, prefix=b"A")
            i += 1
        say("OK", n)
    elif a.mode == "router-echo":
        # Echoes n messages back to their sender (routing id kept).
        for _ in range(n):
            s.send_multipart(s.recv_multipart())
        say("OK", n)
    elif a.mode == "pair-echo":
        for _ in range(n):
            s.send_multipart(s.recv_multipart())
        say("OK", n)
    elif a.mode == "rep-echo":
        for _ in range(n):
            s.send_multipart(s.recv_multipart())
        say("OK", n)
    elif a.mode == "req":
        s.setsockopt(zmq.RCVTIMEO, 30000)
        for i in range(n):
            s.send_multipart([b"%d" % i, payload(i, a.size)])
            rep = s.recv_multipart()
            if rep != [b"%d" % i, payload(i, a.size), b"reply"]:
                say("ERR", "reply", i, "was", repr(rep)[:200])
                sys.exit(1)
        say("OK", n)
    elif a.mode == "dealer":
        # Round trips: request i, expect reply [b"<i>", payload, b"reply"].
        s.setsockopt(zmq.RCVTIMEO, 30000)
        for i in range(n):
            s.send_multipart([b"%d" % i, payload(i, a.size)])
            rep = s.recv_multipart()
            if rep != [b"%d" % i, payload(i, a.size), b"reply"]:
                say("ERR", "reply", i, "was", repr(rep)[:200])
                sys.exit(1)
        say("OK", n)
    s.close()
    ctx.term()


if __name__ == "__main__":
    main()
