"""The tasks of the "Testing your tasks" example of the docs."""

from datetime import timedelta

from pgsched import App, Backoff

app = App(name="example_tasks")


@app.task(queue="emails", max_attempts=3, backoff=Backoff.fixed(60, jitter=0))
def send_welcome(user_id: int, locale: str = "en") -> str:
    if user_id < 0:
        raise ConnectionError("the mail server is unreachable")
    return f"welcome, user {user_id}"


@app.task
def sign_up(user_id: int) -> None:
    send_welcome.enqueue(user_id=user_id)


@app.periodic(every=timedelta(hours=1), name="hourly-digest")
def digest() -> str:
    return "digest sent"
