"""The etcd package's small parts without a network: backoff, error classification, restart
reasons, and stopping threads."""

from __future__ import annotations

import logging
import threading

import pytest
import requests
from etcd3gw import exceptions as gw_exceptions

import distributedtask as dt
from distributedtask._threads import stop_and_join
from distributedtask.etcd import errors
from distributedtask.etcd.backoff import Backoff
from distributedtask.etcd.watch import RestartReason, SnapshotReason
from distributedtask.metrics import WATCH_RESTART_REASONS

URL = "http://127.0.0.1:2379"

# ---- backoff ----------------------------------------------------------------------------------


def test_backoff_windows_grow_to_the_maximum() -> None:
    backoff = Backoff(initial=0.05, maximum=1.0)
    assert [backoff.window(n) for n in (1, 2, 3, 5, 6, 100, 10**6)] == [
        0.05,
        0.1,
        0.2,
        0.8,
        1.0,
        1.0,
        1.0,
    ]
    assert Backoff(initial=1, maximum=30, multiplier=3).window(3) == 9


def test_backoff_delays_stay_inside_their_window() -> None:
    backoff = Backoff(initial=0.1, maximum=0.5)
    for attempt in range(1, 50):
        assert 0 <= backoff.delay(attempt) <= backoff.window(attempt)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0, "maximum": 1},
        {"initial": 1, "maximum": 0},
        {"initial": 1, "maximum": float("inf")},
        {"initial": float("nan"), "maximum": 1},
        {"initial": 1, "maximum": 2, "multiplier": 0.5},
    ],
)
def test_backoff_rejects_impossible_windows(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_backoff_attempts_count_from_one() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=1, maximum=2).delay(0)


# ---- error classification ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [4, 8, 14])
def test_transient_grpc_codes_are_retried(code: int) -> None:
    outcome = errors.classify_status(code, "etcdserver: leader changed", URL, auth=False)
    assert isinstance(outcome, errors.RetryableError) and outcome.maybe_sent
    assert outcome.error.transient and outcome.error.code == code and outcome.error.endpoint == URL


def test_a_request_over_the_size_limit_is_not_retried() -> None:
    outcome = errors.classify_status(8, "trying to send message larger than max", URL, auth=False)
    assert isinstance(outcome, dt.EtcdError) and not outcome.transient


def test_permission_denied_is_final() -> None:
    outcome = errors.classify_status(7, "etcdserver: permission denied", URL, auth=True)
    assert isinstance(outcome, dt.EtcdError) and "denied permission" in str(outcome)


def test_a_rejected_token_is_renewed_only_when_we_log_in() -> None:
    message = "etcdserver: invalid auth token"
    rejected = errors.classify_status(16, message, URL, auth=True)
    assert isinstance(rejected, errors.TokenRejectedError) and rejected.error.transient
    anonymous = errors.classify_status(16, message, URL, auth=False)
    assert isinstance(anonymous, dt.EtcdError) and "requires authentication" in str(anonymous)


def test_a_refused_login_names_the_user() -> None:
    refused = errors.classify_status(9, "etcdserver: authentication failed", URL, auth=True)
    outcome = errors.authentication_failed(refused, "alice", URL)
    assert isinstance(outcome, dt.EtcdError) and "failed for user 'alice'" in str(outcome)


def test_gateway_answers_without_a_grpc_code() -> None:
    unavailable = errors.classify_response(503, "", URL, auth=False)
    assert isinstance(unavailable, errors.RetryableError)
    bad = errors.classify_response(400, '{"code": 3, "message": "bad"}', URL, auth=False)
    assert isinstance(bad, dt.EtcdError) and bad.code == 3 and bad.etcd_message == "bad"


def test_an_etcd3gw_error_caused_by_requests_is_a_transport_error() -> None:
    try:
        try:
            raise requests.exceptions.ConnectTimeout("connect timed out")
        except requests.RequestException as exc:
            raise gw_exceptions.ConnectionTimeoutError(str(exc)) from exc
    except gw_exceptions.Etcd3Exception as wrapped:
        outcome = errors.classify_gateway(wrapped, URL, auth=False)
    assert isinstance(outcome, errors.RetryableError) and not outcome.maybe_sent
    assert "timed out" in str(outcome.error)


@pytest.mark.parametrize(
    ("exc", "maybe_sent", "text"),
    [
        (requests.exceptions.ConnectionError("NewConnectionError: Connection refused"), False, ""),
        (requests.exceptions.ReadTimeout("Read timed out. (read timeout=5)"), True, "timed out"),
        (requests.exceptions.ConnectionError("Connection reset by peer"), True, "unreachable"),
    ],
)
def test_transport_errors_say_whether_the_request_may_have_been_sent(
    exc: requests.RequestException, maybe_sent: bool, text: str
) -> None:
    outcome = errors.classify_transport(exc, URL)
    assert isinstance(outcome, errors.RetryableError) and outcome.maybe_sent is maybe_sent
    assert text in str(outcome.error)


def test_a_tls_failure_is_final() -> None:
    exc = requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    outcome = errors.classify_transport(exc, URL)
    assert isinstance(outcome, dt.EtcdError) and not outcome.transient
    assert "not signed by the given CA" in str(outcome)


def test_a_frame_error_is_translated_without_a_network() -> None:
    with dt.EtcdClient("http://127.0.0.1:1") as client:
        error = client.classify_frame_error(14, "etcdserver: no leader")
    assert error.transient and error.endpoint == "http://127.0.0.1:1"


# ---- restart reasons --------------------------------------------------------------------------


def test_reasons_are_their_strings() -> None:
    assert RestartReason.COMPACTED == "compacted"
    assert str(RestartReason.CONNECT) == f"{RestartReason.CONNECT}" == "connect"
    assert str(SnapshotReason.HANDLER_ERROR) == "handler-error"
    assert set(WATCH_RESTART_REASONS) == {
        "compacted",
        "connect",
        "eof",
        "canceled",
        "error",
        "resync",
    }


# ---- stopping threads -------------------------------------------------------------------------


def test_stop_and_join_has_nothing_to_do_for_no_thread_or_itself() -> None:
    log = logging.getLogger("test")
    assert stop_and_join(None, timeout=1, logger=log, what="nothing")
    assert stop_and_join(threading.current_thread(), timeout=1, logger=log, what="me")
    assert stop_and_join(threading.Thread(target=print), timeout=1, logger=log, what="unstarted")


def test_stop_and_join_warns_with_the_stack_of_a_stuck_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()

    def stuck_in_here() -> None:
        release.wait()

    thread = threading.Thread(target=stuck_in_here, name="stuck-thread", daemon=True)
    thread.start()
    log = logging.getLogger("distributedtask.test")
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            assert not stop_and_join(thread, timeout=0.01, logger=log, what="the stuck loop")
        (record,) = caplog.records
        assert "the stuck loop" in record.message and "stuck-thread" in record.message
        assert "stuck_in_here" in record.message
    finally:
        release.set()
    assert stop_and_join(thread, timeout=10, logger=log, what="the released loop")
