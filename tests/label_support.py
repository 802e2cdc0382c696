"""Fixtures and helpers shared by the labeling-app tests (test_label_*.py import them).

`db_url` runs each test on SQLite and on PostgreSQL; the PostgreSQL server is a throwaway cluster
(initdb + pg_ctl in a temp dir, one per test process) built from Debian's binaries.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"
PASSWORD = "correct horse battery"
os.environ.setdefault("FROMFEEDBACK_ARGON2_PROFILE", "CHEAPEST")  # still argon2id, just instant (servers inherit it)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster on 127.0.0.1 for this test process; skipped only when no binaries exist."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (run scripts/system-deps.sh)")
    root = Path(tempfile.mkdtemp(prefix="ff-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -h 127.0.0.1 -F -c max_connections=200"
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield SimpleNamespace(port=port)
    finally:
        import gc
        import warnings

        from sqlalchemy.engine import Engine

        with warnings.catch_warnings():  # isinstance() on every live object wakes deprecated lazy attributes
            warnings.simplefilter("ignore")
            engines = [obj for obj in gc.get_objects() if isinstance(obj, Engine)]
        for engine in engines:  # close idle connections before the server goes
            engine.dispose()
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database: an SQLite file, or a new database on the throwaway PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"labels_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/{name}"


def posts_with_two_summaries(limit: int, split: str | None = None) -> list[dict]:
    """Real posts (of `split`, default any) that have both a human reference and OpenAI's PPO summary."""
    if not DATA_DIR.exists():
        pytest.skip(f"real data not found at {DATA_DIR}")
    posts = []
    with open(DATA_DIR / "tldr" / "posts.jsonl", encoding="utf-8") as f:
        for line in f:
            post = json.loads(line)
            if post.get("reference") and post.get("samples", {}).get("openai_ppo_1.3b") and split in (None, post["split"]):
                posts.append(post)
                if len(posts) == limit:
                    break
    return posts


def write_samples_file(path: Path, posts: list[dict]) -> Path:
    """A samples file with two policies per post: `ref` (the human TL;DR) and `ppo` (OpenAI's PPO policy)."""
    with open(path, "w", encoding="utf-8") as f:
        for post in posts:
            f.write(json.dumps({"post_id": post["id"], "policy": "ref", "text": post["reference"]}) + "\n")
            f.write(json.dumps({"post_id": post["id"], "policy": "ppo", "text": post["samples"]["openai_ppo_1.3b"]}) + "\n")
    return path


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]*)"', page).group(1)


def login(client, username: str, password: str = PASSWORD):
    """Logs `client` (TestClient or httpx.Client) in through the login form; returns the login response."""
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token}, follow_redirects=False)


def session_csrf(client) -> str:
    return csrf_of(client.get("/", follow_redirects=False).text)


def Server(db_url: str, log_dir: Path):
    """The app as a uvicorn subprocess, with the real data folder for post text."""
    from fromfeedback.label.simulate import LocalServer

    return LocalServer(db_url, str(log_dir), str(DATA_DIR))
