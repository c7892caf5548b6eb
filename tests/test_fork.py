"""forkio.fork(): start, talk, exit; every fault gives a typed error and the parent stays healthy."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest

import forkio
from forkio import ChannelClosed, ProtocolError, SerializationError, WaitTimeout


def test_round_trip_and_clean_exit(children: Path) -> None:
    """The README's example: send, receive, disconnect, exit 0."""
    with forkio.fork(children / "echo.py") as child:
        assert child.recv(timeout=10) == "ready"
        child.send({"job": 1})
        assert child.recv(timeout=5) == {"job": 1}
        child.disconnect()
        assert child.wait(timeout=10) == 0
        assert child.exit_code == 0 and child.signal_code is None


def test_script_gets_argv_path_env_like_python_would(children: Path, tmp_path: Path) -> None:
    """argv[0] is the script, sys.path[0] its folder, __name__ is __main__; the channel vars are gone."""
    env = {**os.environ, "FORKIO_TEST_VAR": "yes"}
    with forkio.fork(children / "argv_env.py", ["--size", "3"], cwd=str(tmp_path), env=env) as child:
        report = child.recv(timeout=10)
    assert report["argv"] == [str(children / "argv_env.py"), "--size", "3"]
    assert report["name"] == "__main__"
    assert report["path0"] == str(children)
    assert os.path.realpath(report["cwd"]) == os.path.realpath(tmp_path)
    assert report["channel_env"] == []
    assert report["custom"] == "yes"


def test_module_child(children: Path) -> None:
    """module= runs a module as __main__, found from cwd like python -m."""
    with forkio.fork(module="pkg.worker", args=["a"], cwd=str(children)) as child:
        report = child.recv(timeout=10)
    assert report["module"] == "__main__"
    assert report["spec"] == "pkg.worker"
    assert report["argv"][1:] == ["a"]


def test_exactly_one_of_script_or_module() -> None:
    with pytest.raises(TypeError):
        forkio.fork()
    with pytest.raises(TypeError):
        forkio.fork("x.py", module="x")
    with pytest.raises(ValueError):
        forkio.fork("x.py", stdio="sometimes")


def test_messages_sent_right_before_exit_are_delivered(children: Path) -> None:
    """Read to EOF before reporting the end: the last messages are never lost."""
    child = forkio.fork(children / "say_then_exit.py", ["200", "1000"])
    got = list(child)
    assert [m["i"] for m in got] == list(range(200))
    assert child.wait(timeout=10) == 7


def test_exit_event_once_after_all_messages(children: Path) -> None:
    """'message' events for everything, then 'disconnect', then 'exit' exactly once."""
    events: list[object] = []
    exited = threading.Event()
    child = forkio.fork(children / "say_then_exit.py", ["50"])
    # A child from the zygote may be done within a millisecond, before the listeners are all
    # there: "disconnect" before the "message" listener starts the reader (it would fire
    # unheard), "exit" after it (its watcher waits for the reader it finds).
    child.on("disconnect", lambda: events.append("disconnect"))
    child.on("message", lambda m: events.append(m["i"]))
    child.on("exit", lambda code, sig: (events.append(("exit", code, sig)), exited.set()))
    assert exited.wait(10)
    child.wait(timeout=5)
    assert events[:50] == list(range(50))
    assert events[50:] == ["disconnect", ("exit", 7, None)]


def test_kill_reports_the_signal(children: Path) -> None:
    child = forkio.fork(children / "sleeper.py")
    assert child.recv(timeout=10) == "sleeping"
    assert child.kill(signal.SIGKILL) is True
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert child.signal_code == "SIGKILL" and child.exit_code is None
    assert child.kill() is False
    child.close()


def test_timeout_option_stops_the_child(children: Path) -> None:
    """Like Node's timeout: the child gets kill_signal after that many seconds."""
    child = forkio.fork(children / "sleeper.py", timeout=0.3, kill_signal=signal.SIGINT)
    assert child.wait(timeout=10) != 0
    child.close()


def test_context_manager_stops_a_child_that_ignores_disconnect(children: Path) -> None:
    child = forkio.fork(children / "sleeper.py")
    child.recv(timeout=10)
    child.close(grace=0.1)
    assert child.signal_code == "SIGTERM"


def test_recv_timeout_loses_nothing(children: Path) -> None:
    with forkio.fork(children / "echo.py") as child:
        child.recv(timeout=10)
        with pytest.raises(WaitTimeout):
            child.recv(timeout=0.05)
        with pytest.raises(TimeoutError):  # the standard base works too
            child.recv(timeout=0.01)
        child.send("still here")
        assert child.recv(timeout=5) == "still here"


def test_unserialisable_message_fails_at_send_and_channel_stays_usable(children: Path) -> None:
    with forkio.fork(children / "echo.py") as child:
        child.recv(timeout=10)
        with pytest.raises(SerializationError):
            child.send({"f": lambda: 1})
        child.send("fine")
        assert child.recv(timeout=5) == "fine"


def test_json_mode_refuses_nan_and_keeps_going(children: Path) -> None:
    with forkio.fork(children / "echo.py", serialization="json") as child:
        assert child.recv(timeout=10) == "ready"
        with pytest.raises(SerializationError):
            child.send({"x": float("nan")})
        child.send({"x": 1.5, "s": "é"})
        assert child.recv(timeout=5) == {"x": 1.5, "s": "é"}


def test_send_after_disconnect_is_channel_closed(children: Path) -> None:
    child = forkio.fork(children / "echo.py")
    child.recv(timeout=10)
    child.disconnect()
    assert not child.connected
    with pytest.raises(ChannelClosed):
        child.send("too late")
    with pytest.raises(ConnectionError):
        child.recv()
    assert child.wait(timeout=10) == 0


def test_garbage_from_child_is_protocol_error(children: Path) -> None:
    """A child writing garbage breaks only its channel; the parent gets ProtocolError."""
    with forkio.fork(children / "misbehave.py", ["garbage"]) as child:
        with pytest.raises(ProtocolError):
            child.recv(timeout=10)
        with pytest.raises(ChannelClosed):
            child.send("x")


def test_oversized_frame_is_protocol_error(children: Path) -> None:
    with forkio.fork(children / "misbehave.py", ["huge-frame"], max_frame_size=1 << 20) as child:
        with pytest.raises(ProtocolError, match="max_frame_size"):
            child.recv(timeout=10)


def test_undecodable_message_then_next_one(children: Path) -> None:
    """A frame that fails to unpickle raises SerializationError; the next message still arrives."""
    with forkio.fork(children / "misbehave.py", ["bad-pickle"]) as child:
        with pytest.raises(SerializationError):
            child.recv(timeout=10)
        assert child.recv(timeout=5) == "after"


def test_json_garbage_line_then_next_one(children: Path) -> None:
    with forkio.fork(children / "misbehave.py", ["json-garbage"], serialization="json") as child:
        with pytest.raises(ProtocolError):
            child.recv(timeout=10)
        assert child.recv(timeout=5) == "after"


def test_child_dies_mid_message(children: Path) -> None:
    """Half a frame then death: ChannelClosed, exit reported, parent fine."""
    child = forkio.fork(children / "misbehave.py", ["half-frame"])
    with pytest.raises(ChannelClosed):
        child.recv(timeout=10)
    assert child.wait(timeout=10) == 0


def test_child_crash_is_reported_with_signal(children: Path) -> None:
    child = forkio.fork(children / "misbehave.py", ["crash"], stdio="ignore")
    assert child.recv(timeout=10) == "crashing"
    assert child.wait(timeout=10) == -signal.SIGSEGV
    assert child.signal_code == "SIGSEGV"
    child.close()


def test_stdio_pipe(children: Path) -> None:
    child = forkio.fork(children / "misbehave.py", ["crash"], stdio="pipe")
    child.wait(timeout=10)
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.read() == b""
    child.close()


def test_pass_listening_socket_to_child(children: Path) -> None:
    """A listening socket sent with a message arrives as a usable socket."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, forkio.fork(children / "handles.py") as child:
        child.send("serve", server)
        client = socket.create_connection(server.getsockname(), timeout=10)
        assert client.recv(100).startswith(b"hello from ")
        client.close()
        assert child.recv(timeout=10) == "served"


def test_pass_fds_both_ways(children: Path) -> None:
    r, w = os.pipe()
    try:
        with forkio.fork(children / "handles.py") as child:
            child.send("pipe", w)
            assert child.recv(timeout=10) == "written"
            assert os.read(r, 100) == b"written by the child"
    finally:
        os.close(r)
        os.close(w)
    with forkio.fork(children / "handles.py") as child:
        child.send("give")
        message, fd = child.recv(timeout=10, with_handle=True)
        assert message == "take"
        assert os.read(fd, 100) == b"from the child's pipe"
        os.close(fd)


def test_handle_on_plain_recv_is_closed_not_leaked(children: Path) -> None:
    """A handle nobody asked for is closed, not left open in the receiver."""
    before = len(os.listdir("/proc/self/fd"))
    with forkio.fork(children / "handles.py") as child:
        child.send("give")
        assert child.recv(timeout=10) == "take"
    assert len(os.listdir("/proc/self/fd")) <= before


def test_parent_outside_a_forked_child() -> None:
    """In a process nobody forked, parent is disconnected and says why."""
    assert forkio.parent.connected is False
    with pytest.raises(ChannelClosed, match="not started by forkio"):
        forkio.parent.send("x")


def test_many_threads_share_one_child(children: Path) -> None:
    """Concurrent senders never interleave frames; every message comes back once."""
    got: list[tuple[int, int]] = []
    with forkio.fork(children / "echo.py") as child:
        child.recv(timeout=10)
        # Receive while sending: with bounded buffers both ways, an echo peer that nobody reads stalls.
        reader = threading.Thread(target=lambda: got.extend(child.recv(timeout=10) for _ in range(800)))
        reader.start()
        threads = [threading.Thread(target=lambda t=t: [child.send((t, i)) for i in range(200)]) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        reader.join()
    assert sorted(got) == sorted((t, i) for t in range(4) for i in range(200))
    for t in range(4):
        assert [i for (tt, i) in got if tt == t] == list(range(200))


def test_repr_says_what_and_how(children: Path) -> None:
    child = forkio.fork(children / "echo.py")
    child.recv(timeout=10)
    assert "echo.py" in repr(child) and "running" in repr(child) and str(child.pid) in repr(child)
    child.close()
    assert "exit code 0" in repr(child)


def test_signal_during_a_big_send_never_leaves_garbage(children: Path) -> None:
    """A signal handler raises while a frame is half written: the channel breaks cleanly (the
    peer sees its end, not a cut frame followed by more bytes), and says so with ChannelClosed."""
    import signal as signals

    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Alarm

    previous = signals.signal(signals.SIGALRM, on_alarm)
    try:
        with forkio.fork(children / "slow_reader.py", ["0.6"]) as child:
            assert child.recv(timeout=10) == "ready"
            big = "z" * (8 << 20)  # inline (a str, not a buffer for shared memory): the send blocks midway
            signals.setitimer(signals.ITIMER_REAL, 0.2)
            with pytest.raises(Alarm):
                child.send(big)
            with pytest.raises(ChannelClosed, match="broken"):
                child.send("after")
            assert child.wait(timeout=20) == 0  # the child saw a clean end, not garbage
    finally:
        signals.setitimer(signals.ITIMER_REAL, 0)
        signals.signal(signals.SIGALRM, previous)


@pytest.mark.parametrize("serialization", ["pickle", "json"])
def test_send_many_in_one_write(children: Path, serialization: str) -> None:
    """send_many: every message arrives, in order; one bad message sends none of them."""
    with forkio.fork(children / "echo.py", serialization=serialization) as child:
        assert child.recv(timeout=10) == "ready"
        child.send_many([{"i": i} for i in range(500)])
        assert [child.recv(timeout=10)["i"] for _ in range(500)] == list(range(500))
        with pytest.raises(SerializationError):
            child.send_many(["fine", float("nan") if serialization == "json" else (lambda: 0)])
        child.send("next")
        assert child.recv(timeout=10) == "next"  # nothing of the failed batch went out
