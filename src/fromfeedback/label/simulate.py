"""Simulated labelers: accounts that log in and label through the same HTTP forms as people.

A judge (a reward model folder, or `length` / `random` for load tests) scores the two summaries shown; the
labeler picks the higher one, flips that choice with probability `noise`, and draws a confidence from the
score margin. A submission that gets no answer (server down) is retried until answered: the per-assignment
unique label makes retries safe, so an acknowledged label is stored exactly once.
"""

from __future__ import annotations

import html
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx

from fromfeedback.files import UserError

# (post with subreddit/title/post attributes, summary A, summary B) -> score margin of A over B
Judge = Callable[[SimpleNamespace, str, str], float]

CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
FORM_ACTION = re.compile(r'<form method="post" action="(/tasks/\d+)" id="label-form">')
PROJECT_LINK = re.compile(r'<a href="/projects/(\d+)/task" class="project-link" data-project-name="([^"]*)">')


def _element_text(page: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', page, re.DOTALL)
    return html.unescape(match.group(1)) if match else ""


def length_judge(_post, text_a: str, text_b: str) -> float:
    return (len(text_a) - len(text_b)) / 20.0


def random_judge(_post, _text_a: str, _text_b: str) -> float:
    return random.gauss(0.0, 1.0)


def reward_model_judge(model_dir: str, batch_size: int = 2) -> Judge:
    """A judge from a saved reward model (evaluation's judge): the margin is r(A) - r(B). Thread-safe (one
    forward at a time)."""
    from fromfeedback.evaluate.judges import RewardModelJudge

    reward_model = RewardModelJudge(model_dir, batch_size=batch_size)
    lock = threading.Lock()

    def judge(post, text_a: str, text_b: str) -> float:
        with lock:
            score_a, score_b = reward_model.score([post, post], [text_a, text_b])
        return score_a - score_b

    return judge


def make_judge(name: str) -> Judge:
    if name == "length":
        return length_judge
    if name == "random":
        return random_judge
    return reward_model_judge(name)


def choose(margin: float, noise: float, rng: random.Random) -> int:
    """Confidence as shown (1 = A definitely better … 9 = B definitely better): the judge's side, flipped
    with probability `noise`; strength 1–4 grows with P(preferred) = sigmoid(|margin|), plus jitter."""
    prefers_a = margin > 0 or (margin == 0 and rng.random() < 0.5)
    if rng.random() < noise:
        prefers_a = not prefers_a
    certainty = 2.0 / (1.0 + math.exp(-abs(margin))) - 1.0  # 0 (coin flip) .. 1 (sure)
    strength = min(4, max(1, round(1 + 3 * certainty + rng.gauss(0.0, 0.5))))
    return 5 - strength if prefers_a else 5 + strength


@dataclass
class LabelerResult:
    username: str
    acknowledged: list[int] = field(default_factory=list)
    """Assignment ids whose submission the server acknowledged (303)."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per request (task page fetches and submissions)."""
    submit_latencies: list[float] = field(default_factory=list)
    """Seconds per label submission alone (the POST that stores a label)."""
    retries: int = 0
    error: str | None = None


class SimulatedLabeler:
    def __init__(self, base_url: str, username: str, password: str, judge: Judge, noise: float, seed: int, retry_seconds: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.username, self.password = username, password
        self.judge, self.noise = judge, noise
        self.rng = random.Random(seed)
        self.retry_seconds = retry_seconds
        self.client = httpx.Client(base_url=self.base_url, follow_redirects=False, timeout=60.0)
        self.result = LabelerResult(username)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request, retried on connection errors (a restarting server) for up to `retry_seconds`."""
        deadline = time.monotonic() + self.retry_seconds
        while True:
            start = time.perf_counter()
            try:
                response = self.client.request(method, path, **kwargs)
                self.result.latencies.append(time.perf_counter() - start)
                return response
            except (httpx.TransportError, httpx.RemoteProtocolError):
                if time.monotonic() > deadline:
                    raise
                self.result.retries += 1
                time.sleep(0.2)

    def login(self) -> None:
        page = self.request("GET", "/login")
        token = CSRF.search(page.text).group(1)
        response = self.request("POST", "/login", data={"username": self.username, "password": self.password, "csrf_token": token})
        if response.status_code != 303:
            raise UserError(f"simulated labeler {self.username!r} could not log in (HTTP {response.status_code})")

    def project_id(self, name: str) -> int:
        """The id of project `name` (or id) as listed on the home page; '' = the first project."""
        page = self.request("GET", "/")
        for project_id, project_name in PROJECT_LINK.findall(page.text):
            if not name or html.unescape(project_name) == name or project_id == name:
                return int(project_id)
        raise UserError(f"no project {name!r} on {self.base_url}")

    def label_one(self, project_id: int) -> bool:
        """Fetches the next task and submits a label; False when no task is left."""
        while True:
            page = self.request("GET", f"/projects/{project_id}/task")
            if page.status_code == 303 and page.headers.get("location", "").endswith("/login"):
                self.login()  # the server lost the session (e.g. a fresh database): log in again
                continue
            page.raise_for_status()
            break
        action = FORM_ACTION.search(page.text)
        if action is None:
            return False
        post = SimpleNamespace(
            subreddit=_element_text(page.text, "post-subreddit"), title=_element_text(page.text, "post-title"), post=_element_text(page.text, "post-body")
        )
        margin = self.judge(post, _element_text(page.text, "summary-a"), _element_text(page.text, "summary-b"))
        form = {"csrf_token": CSRF.search(page.text).group(1), "confidence": str(choose(margin, self.noise, self.rng)), "note": ""}
        started = time.perf_counter()
        response = self.request("POST", action.group(1), data=form)
        self.result.submit_latencies.append(time.perf_counter() - started)
        if response.status_code != 303:
            raise RuntimeError(f"{self.username}: submitting {action.group(1)} got HTTP {response.status_code}")
        self.result.acknowledged.append(int(action.group(1).rsplit("/", 1)[1]))
        return True

    def run(self, project: str, labels: int) -> LabelerResult:
        try:
            self.login()
            project_id = self.project_id(project)
            while len(self.result.acknowledged) < labels and self.label_one(project_id):
                pass
        except Exception as e:  # reported per labeler; the others go on
            self.result.error = f"{type(e).__name__}: {e}"
        finally:
            self.client.close()
        return self.result


def ensure_accounts(base_url: str, admin_user: str, admin_password: str, usernames: list[str], password: str) -> None:
    """Creates the labeler accounts through the admin page (existing ones are left as they are)."""
    admin = SimulatedLabeler(base_url, admin_user, admin_password, length_judge, 0.0, 0)
    admin.login()
    page = admin.request("GET", "/admin")
    if page.status_code != 200:
        raise UserError(f"{admin_user!r} cannot open the admin page (HTTP {page.status_code}): use an admin account")
    token = CSRF.search(page.text).group(1)
    existing = set(re.findall(r"<li>([^<(]+?)(?: \(admin\))?</li>", page.text))
    for username in usernames:
        if username in existing:
            continue
        response = admin.request("POST", "/admin/users", data={"username": username, "password": password, "csrf_token": token})
        if response.status_code != 303:
            raise UserError(f"could not create {username!r} (HTTP {response.status_code})")
    admin.client.close()


def start_simulation(
    base_url: str, project: str, usernames: list[str], password: str, labels_per_labeler: int, judge: Judge, noise: float = 0.0, seed: int = 0,
    retry_seconds: float = 120.0,
) -> tuple[list[SimulatedLabeler], list[threading.Thread]]:
    """Starts all labelers at once, one thread each; their `.result` fills in as they go."""
    labelers = [SimulatedLabeler(base_url, name, password, judge, noise, seed * 1000 + i, retry_seconds) for i, name in enumerate(usernames)]
    threads = [threading.Thread(target=labeler.run, args=(project, labels_per_labeler), daemon=True) for labeler in labelers]
    for thread in threads:
        thread.start()
    return labelers, threads


def run_simulation(*args, **kwargs) -> list[LabelerResult]:
    """`start_simulation` and wait for every labeler; returns their results (acknowledged tasks, latencies)."""
    labelers, threads = start_simulation(*args, **kwargs)
    for thread in threads:
        thread.join()
    return [labeler.result for labeler in labelers]


def prepare_load_project(db_url: str, project: str, usernames: list[str], password: str, comparisons: int, overlap: int, seed: int = 0) -> None:
    """A project of synthetic posts (about 1,500 characters each) with two summaries, and the labelers'
    accounts, written straight to the database: the setup of load tests and benchmarks."""
    from fromfeedback.data import Sample
    from fromfeedback.label import admin
    from fromfeedback.label.db import open_database

    rng = random.Random(seed)
    words = "the a my we he she was said after before never always money work friend dog car house because but".split()
    posts = {
        f"load{i}": SimpleNamespace(subreddit="loadtest", title=f"Post {i}", post=" ".join(rng.choice(words) for _ in range(300)))
        for i in range(comparisons)
    }
    samples = [Sample(key, policy, " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))) for key in posts for policy in ("x", "y")]
    sessions = open_database(db_url)
    with sessions() as db:
        for name in usernames:
            admin.create_user(db, name, password)
        admin.import_samples(db, admin.create_project(db, project, overlap=overlap), samples, posts)
    sessions.kw["bind"].dispose()


class LocalServer:
    """`uvicorn --factory fromfeedback.label.app:app_from_env` as a subprocess on a free local port;
    `kill()` sends SIGKILL (no shutdown of any kind), `start()` again restarts it on the same port."""

    def __init__(self, db_url: str, log_dir: str, data_dir: str | None = None):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.db_url, self.log_dir, self.data_dir = db_url, log_dir, data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        import os
        import subprocess
        import sys

        env = {**os.environ, "FROMFEEDBACK_LABEL_DB": self.db_url}
        if self.data_dir:
            env["FROMFEEDBACK_DATA_DIR"] = self.data_dir
        self.starts += 1
        log_path = f"{self.log_dir}/server{self.starts}.log"
        command = [sys.executable, "-m", "uvicorn", "--factory", "fromfeedback.label.app:app_from_env", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning"]
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{open(log_path).read()}")
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"the server did not answer within {timeout} s")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
