"""Security of the labeling app: logins everywhere, admin-only pages, private labels, CSRF, hashed
passwords, inert post text, SQL metacharacters stored verbatim. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from fromfeedback.label import admin
from fromfeedback.label.app import SESSION_LIFETIME, create_app
from fromfeedback.label.db import Label, LoginSession, PostRow, User
from label_support import DATA_DIR, PASSWORD, db_url, login, postgres_server, session_csrf  # noqa: F401

PAYLOAD = '<script>alert("x")</script><img src=x onerror="alert(1)"><b onmouseover=alert(2)>bold</b>'
SQL = "Robert'); DROP TABLE labels; -- \" ; DELETE FROM users WHERE '1'='1"


@pytest.fixture
def setup(db_url):
    from fromfeedback.data import Sample

    app = create_app(db_url, str(DATA_DIR))
    with app.state.sessions() as db:
        for name in ("boss", "u1", "u2"):
            admin.create_user(db, name, PASSWORD, is_admin=name == "boss")
        project = admin.create_project(db, "proj")
        post = type("P", (), {"subreddit": "sub", "title": "title", "post": "body"})
        admin.import_samples(db, project, [Sample(f"p{i}", pol, f"{pol}{i}") for i in range(3) for pol in ("x", "y")], {f"p{i}": post for i in range(3)})
    return app, project


def client_for(app, username):
    client = TestClient(app)
    assert login(client, username).status_code == 303
    return client


def concrete_routes(app):
    """(method, path) of every route, with path parameters filled in (1 for ids, openai for the export kind)."""
    for route in app.routes:
        if isinstance(route, APIRoute):
            path = route.path.replace("{kind}", "openai")
            path = re.sub(r"\{[a-z_]+\}", "1", path)
            for method in route.methods:
                yield method, path


def test_every_page_and_api_needs_login(setup):
    app, _project = setup
    client = TestClient(app)
    checked = 0
    for method, path in concrete_routes(app):
        if path == "/login":
            continue
        response = client.request(method, path, follow_redirects=False)
        if method == "GET" and not path.startswith("/api/"):
            assert response.status_code == 303 and response.headers["location"] == "/login", (method, path)
        else:
            assert response.status_code == 401, (method, path, response.status_code)
        checked += 1
    assert checked >= 15
    assert client.get("/login").status_code == 200
    forged = TestClient(app, cookies={"ff_session": "not-a-session"})
    assert forged.get("/api/labels").status_code == 401


def test_labeler_gets_403_on_admin_pages(setup):
    app, project = setup
    client = client_for(app, "u1")
    token = session_csrf(client)
    admin_routes = [(m, p) for m, p in concrete_routes(app) if p.startswith("/admin")]
    assert len(admin_routes) >= 8
    for method, path in admin_routes:
        data = {"csrf_token": token, "username": "evil", "password": "x" * 10, "name": "evil", "overlap": "1", "gold_share": "0"}
        response = client.request(method, path, data=data if method == "POST" else None, follow_redirects=False)
        assert response.status_code == 403, (method, path, response.status_code)
    assert client.get("/").status_code == 200 and "/admin" not in client.get("/").text
    with app.state.sessions() as db:
        assert db.scalar(select(User).where(User.username == "evil")) is None
    boss = client_for(app, "boss")
    assert boss.get(f"/admin/projects/{project.id}/dashboard").status_code == 200


def test_labelers_cannot_see_each_others_tasks_or_labels(setup):
    app, project = setup
    u1, u2 = client_for(app, "u1"), client_for(app, "u2")
    page = u1.get(f"/projects/{project.id}/task").text
    action = re.search(r'action="(/tasks/\d+)"', page).group(1)
    assert u2.get(action).status_code == 403
    assert u2.post(action, data={"csrf_token": session_csrf(u2), "confidence": "1"}, follow_redirects=False).status_code == 403
    assert u1.post(action, data={"csrf_token": session_csrf(u1), "confidence": "1"}, follow_redirects=False).status_code == 303
    mine = u1.get("/api/labels").json()
    assert len(mine) == 1
    assert u2.get("/api/labels").json() == []
    assert u2.get(f"/api/labels/{mine[0]['id']}").status_code == 403
    assert u1.get(f"/api/labels/{mine[0]['id']}").json()["confidence"] in (1, 9)
    # u2 is never given u1's label or the comparison's other labelers: its task pages show no choice data.
    page2 = u2.get(f"/projects/{project.id}/task").text
    assert "confidence" in page2 and 'checked' not in page2


def test_posts_without_csrf_token_are_refused(setup):
    app, project = setup
    u1 = client_for(app, "u1")
    action = re.search(r'action="(/tasks/\d+)"', u1.get(f"/projects/{project.id}/task").text).group(1)
    other_token = session_csrf(client_for(app, "u2"))
    for form in ({"confidence": "1"}, {"confidence": "1", "csrf_token": ""}, {"confidence": "1", "csrf_token": "guess"}, {"confidence": "1", "csrf_token": other_token}):
        assert u1.post(action, data=form, follow_redirects=False).status_code == 403
    with app.state.sessions() as db:
        assert db.scalars(select(Label)).all() == []
    boss = client_for(app, "boss")
    assert boss.post("/admin/users", data={"username": "sneaky", "password": PASSWORD}, follow_redirects=False).status_code == 403
    assert boss.post("/logout", follow_redirects=False).status_code == 403
    fresh = TestClient(app)
    fresh.get("/login")
    assert fresh.post("/login", data={"username": "u1", "password": PASSWORD}, follow_redirects=False).status_code == 403
    with app.state.sessions() as db:
        assert db.scalar(select(User).where(User.username == "sneaky")) is None


def test_passwords_are_stored_hashed(setup):
    app, _project = setup
    with app.state.sessions() as db:
        for user in db.scalars(select(User)).all():
            assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        assert admin.verify_password(db.scalar(select(User).where(User.username == "u1")).password_hash, PASSWORD)
    client = TestClient(app)
    assert login(client, "u1", "wrong password").status_code == 401
    assert "ff_session" not in client.cookies
    assert login(client, "nobody", PASSWORD).status_code == 401
    ok = login(client, "u1")
    token = ok.cookies["ff_session"]
    with app.state.sessions() as db:
        assert db.get(LoginSession, token) is None  # only the token's hash is stored
        assert db.scalar(select(LoginSession).where(LoginSession.token != token)) is not None
    assert "HttpOnly" in ok.headers["set-cookie"] and "SameSite=strict" in ok.headers["set-cookie"]
    assert client.get("/api/labels").status_code == 200
    with app.state.sessions() as db:  # a session older than its lifetime no longer logs anyone in
        for row in db.scalars(select(LoginSession)).all():
            row.created_at = row.created_at - SESSION_LIFETIME - timedelta(minutes=1)
        db.commit()
    assert client.get("/api/labels").status_code == 401


def test_script_and_html_in_post_text_render_inert(setup, tmp_path):
    app, project = setup
    boss = client_for(app, "boss")
    samples = tmp_path / "evil.jsonl"
    with open(samples, "w") as f:
        for policy in ("x", "y"):
            f.write(json.dumps({"post_id": "evil", "policy": policy, "text": f"{policy} {PAYLOAD}", "subreddit": PAYLOAD, "title": PAYLOAD, "post": PAYLOAD}) + "\n")
    with app.state.sessions() as db:
        evil_project = admin.create_project(db, "evil")
    with open(samples, "rb") as f:
        response = boss.post(f"/admin/projects/{evil_project.id}/samples", data={"csrf_token": session_csrf(boss)}, files={"file": ("evil.jsonl", f)})
    assert response.status_code == 200 and "imported 1 comparisons" in response.text
    assert boss.post("/admin/users", data={"csrf_token": session_csrf(boss), "username": "<img/src=x>", "password": PASSWORD}, follow_redirects=False).status_code == 303
    page = client_for(app, "u1").get(f"/projects/{evil_project.id}/task")
    assert page.status_code == 200
    for text in (page.text, boss.get("/admin").text):
        assert "<script>alert" not in text and "<img src=x" not in text and "<b onmouseover" not in text and "<img/src=x>" not in text
    assert page.text.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") >= 5  # subreddit, title, post, both summaries
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/label.js" defer>']
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_sql_metacharacters_are_stored_verbatim(setup):
    app, _project = setup
    name = "o'brien;--"
    from fromfeedback.data import Sample

    with app.state.sessions() as db:
        admin.create_user(db, name, PASSWORD)
        project = admin.create_project(db, SQL)
        post = type("P", (), {"subreddit": SQL, "title": SQL, "post": SQL})
        admin.import_samples(db, project, [Sample(SQL, "a", SQL + "a"), Sample(SQL, "b", SQL + "b")], {SQL: post})
    client = client_for(app, name)
    project_id = re.search(r'href="/projects/(\d+)/task" class="project-link" data-project-name="Robert', client.get("/").text).group(1)
    page = client.get(f"/projects/{project_id}/task").text
    action = re.search(r'action="(/tasks/\d+)"', page).group(1)
    assert client.post(action, data={"csrf_token": session_csrf(client), "confidence": "2", "note": SQL}, follow_redirects=False).status_code == 303
    with app.state.sessions() as db:
        [row] = admin.export_openai(db, project)
        assert row["info"]["post"] == row["info"]["title"] == row["info"]["id"] == SQL
        assert row["extra"]["note"] == SQL and row["worker"] == name and row["batch"] == SQL
        assert {s["text"] for s in row["summaries"]} == {SQL + "a", SQL + "b"}
        assert db.scalar(select(PostRow).where(PostRow.post_key == SQL)).body == SQL
        assert len(db.scalars(select(User)).all()) == 4 and len(db.scalars(select(Label)).all()) == 1  # nothing dropped or deleted
