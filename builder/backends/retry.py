"""One retry policy for every engine that talks to a server (tenacity): a failure worth another
try (a timeout, a 5xx or 429, an answer that is not one) is retried with exponential backoff;
after the last attempt the engine's own error names what went wrong the last time. Anything
else (a refused request, a server that died) is raised at once."""
from __future__ import annotations

from typing import Callable, TypeVar

import tenacity

T = TypeVar("T")


class Retryable(Exception):
    """A failure worth another attempt; its message says what happened."""


def with_retries(call: Callable[[], T], retries: int, backoff_s: float, error: type[Exception]) -> T:
    """call(), tried up to 1 + `retries` times while it raises Retryable, waiting backoff_s,
    2 x backoff_s, 4 x backoff_s ... between attempts; then `error("<last reason> (after N attempts)")`."""
    attempts = retries + 1
    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts),
                                 wait=tenacity.wait_exponential(multiplier=backoff_s, exp_base=2, min=0),
                                 retry=tenacity.retry_if_exception_type(Retryable))
    try:
        return retrying(call)
    except tenacity.RetryError as exc:
        raise error(f"{exc.last_attempt.exception()} (after {attempts} attempt{'s' * (attempts != 1)})") from None


def check_status(answer, who: str, refused: type[Exception]) -> None:
    """A server's HTTP status, read the same by every engine: 5xx and 429 are worth another try
    (Retryable), any other 4xx is a refusal (`refused`, at once), each naming `who` answered."""
    if answer.status_code >= 500 or answer.status_code == 429:
        raise Retryable(f"{who} answered HTTP {answer.status_code}: {answer.text[:200]}")
    if answer.status_code >= 400:
        raise refused(f"{who} refused the request (HTTP {answer.status_code}): {answer.text[:300]}")
