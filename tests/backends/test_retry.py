"""The one retry policy every server engine uses (tenacity): what is retried, how long it waits,
and what the error says after the last attempt."""
import pytest
import tenacity

from builder.backends.retry import Retryable, with_retries


class Flaky:
    """Fails with `error` the first `failures` calls, then answers."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return {"ok": self.calls}


@pytest.fixture
def waits(monkeypatch):
    slept = []
    monkeypatch.setattr(tenacity.nap.time, "sleep", slept.append)
    return slept


def test_a_retryable_failure_is_tried_again_with_exponential_backoff(waits):
    call = Flaky(2, Retryable("HTTP 503"))
    assert with_retries(call, retries=3, backoff_s=0.5, error=RuntimeError) == {"ok": 3}
    assert call.calls == 3 and waits == [0.5, 1.0]


def test_after_the_last_attempt_the_engines_error_names_the_last_reason(waits):
    call = Flaky(10, Retryable("llama-server answered HTTP 500: boom"))
    with pytest.raises(ConnectionError, match=r"^llama-server answered HTTP 500: boom \(after 3 attempts\)$"):
        with_retries(call, retries=2, backoff_s=0.25, error=ConnectionError)
    assert call.calls == 3 and waits == [0.25, 0.5]


def test_a_failure_that_is_not_retryable_is_raised_at_once(waits):
    call = Flaky(1, ValueError("refused: HTTP 400"))
    with pytest.raises(ValueError, match="refused"):
        with_retries(call, retries=5, backoff_s=1.0, error=RuntimeError)
    assert call.calls == 1 and waits == []


def test_no_retries_means_one_attempt(waits):
    with pytest.raises(RuntimeError, match=r"timeout \(after 1 attempt\)$"):
        with_retries(Flaky(1, Retryable("timeout")), retries=0, backoff_s=1.0, error=RuntimeError)
    assert waits == []
