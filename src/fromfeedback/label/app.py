"""The labeling web app: server-rendered pages for labelers and admins (FastAPI + Jinja2).

Security model: everything but the login page and static files needs a login (a random session token in
an HttpOnly, SameSite=Strict cookie; only its SHA-256 is stored); every POST carries the session's CSRF
token; admin pages answer 403 to labelers; a labeler only ever sees their own tasks and labels; all text
is escaped by Jinja2's autoescaping and a strict Content-Security-Policy forbids inline scripts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path

import jinja2
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from fromfeedback.files import UserError
from fromfeedback.label import admin, stats, tasks
from fromfeedback.label.db import Assignment, Label, LoginSession, Project, User, open_database, utcnow

HERE = Path(__file__).parent
SESSION_COOKIE = "ff_session"
LOGIN_CSRF_COOKIE = "ff_login_csrf"
SESSION_LIFETIME = timedelta(days=14)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    pass


@dataclass
class Login:
    user: User
    session: LoginSession


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (a plain ASGI middleware: cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app):
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [(k, v) for k, v in self.headers if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_db(request: Request) -> Iterator[Session]:
    db = request.app.state.sessions()
    try:
        yield db
    finally:
        db.close()


def current_login(request: Request, db: Session = Depends(get_db)) -> Login:
    token = request.cookies.get(SESSION_COOKIE)
    found = db.execute(select(LoginSession, User).join(User, LoginSession.user_id == User.id).where(LoginSession.token == token_digest(token))).first() if token else None
    if found is None:
        raise LoginRequired()
    created = found[0].created_at if found[0].created_at.tzinfo else found[0].created_at.replace(tzinfo=timezone.utc)
    if utcnow() - created > SESSION_LIFETIME:
        raise LoginRequired()
    return Login(found[1], found[0])


def posted_login(csrf_token: str = Form(""), login: Login = Depends(current_login)) -> Login:
    """The login of a POST whose form carries the session's CSRF token; 403 otherwise."""
    if not csrf_token or not hmac.compare_digest(csrf_token, login.session.csrf_token):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and submit again")
    return login


def admin_login(login: Login = Depends(current_login)) -> Login:
    if not login.user.is_admin:
        raise HTTPException(403, "admins only")
    return login


def posted_admin(login: Login = Depends(posted_login)) -> Login:
    return admin_login(login)


def create_app(db_url: str, data_dir: str | None = None, secure_cookies: bool = False) -> FastAPI:
    """The app on database `db_url` (migrated on start). `data_dir` holds tldr/posts.jsonl, whose post text
    the samples import uses; `secure_cookies` marks cookies HTTPS-only (set it behind TLS)."""
    app = FastAPI(title="fromfeedback labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sessions = open_database(db_url)
    app.state.data_dir = data_dir
    app.state.posts_cache = None
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    templates = Jinja2Templates(env=environment)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(request: Request, name: str, login: Login | None = None, status: int = 200, **context) -> Response:
        context.update(user=login.user if login else None, csrf=login.session.csrf_token if login else "")
        return templates.TemplateResponse(request, name, context, status_code=status)

    def set_cookie(response: Response, name: str, value: str) -> None:
        response.set_cookie(name, value, httponly=True, samesite="strict", secure=secure_cookies, path="/")

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired):
        if request.method == "GET" and not request.url.path.startswith("/api/"):
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("login required", status_code=401)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "message": exc.detail, "user": None, "csrf": ""}, status_code=exc.status_code)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return templates.TemplateResponse(request, "error.html", {"status": 400, "message": str(exc), "user": None, "csrf": ""}, status_code=400)

    # ---- login -------------------------------------------------------------------------------------

    @app.get("/login")
    def login_page(request: Request) -> Response:
        token = secrets.token_urlsafe(32)
        response = render(request, "login.html", login_csrf=token, error=None)
        set_cookie(response, LOGIN_CSRF_COOKIE, token)
        return response

    @app.post("/login")
    def login_submit(
        request: Request,
        username: str = Form(""),
        password: str = Form(""),
        csrf_token: str = Form(""),
        db: Session = Depends(get_db),
    ) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not csrf_token or not cookie or not hmac.compare_digest(csrf_token, cookie):
            raise HTTPException(403, "missing or wrong CSRF token: reload the login page")
        user = db.scalar(select(User).where(User.username == username.strip()))
        db.commit()  # release the database before the (deliberately slow) password check
        if user is None or not admin.verify_password(user.password_hash, password):
            token = secrets.token_urlsafe(32)
            response = render(request, "login.html", status=401, login_csrf=token, error="wrong username or password")
            set_cookie(response, LOGIN_CSRF_COOKIE, token)
            return response
        token = secrets.token_urlsafe(32)
        db.add(LoginSession(token=token_digest(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32)))
        db.commit()
        response = RedirectResponse("/", status_code=303)
        set_cookie(response, SESSION_COOKIE, token)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    @app.post("/logout")
    def logout(login: Login = Depends(posted_login), db: Session = Depends(get_db)) -> Response:
        row = db.get(LoginSession, login.session.token)
        if row is not None:
            db.delete(row)
        db.commit()
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---- labelers ----------------------------------------------------------------------------------

    @app.get("/")
    def home(request: Request, login: Login = Depends(current_login), db: Session = Depends(get_db)) -> Response:
        projects = list(db.scalars(select(Project).order_by(Project.id)))
        db.commit()
        return render(request, "home.html", login, projects=projects)

    def show_task(request: Request, login: Login, db: Session, task: tasks.Task, project: Project, error: str | None = None, status: int = 200) -> Response:
        db.commit()
        return render(request, "task.html", login, status=status, task=task, project=project, error=error, axes=tasks.RATING_AXES)

    def own_assignment(db: Session, login: Login, assignment_id: int) -> Assignment:
        assignment = db.get(Assignment, assignment_id)
        if assignment is None:
            raise HTTPException(404, "no such task")
        if assignment.labeler_id != login.user.id:
            raise HTTPException(403, "this task belongs to another labeler")
        return assignment

    @app.get("/projects/{project_id}/task")
    def next_task(project_id: int, request: Request, login: Login = Depends(current_login), db: Session = Depends(get_db)) -> Response:
        project = db.get(Project, project_id)
        if project is None:
            raise HTTPException(404, "no such project")
        assignment = tasks.next_assignment(db, login.user, project)
        if assignment is None:
            return render(request, "done.html", login, project=project)
        return show_task(request, login, db, tasks.task_view(db, assignment), project)

    @app.get("/tasks/{assignment_id}")
    def view_task(assignment_id: int, request: Request, login: Login = Depends(current_login), db: Session = Depends(get_db)) -> Response:
        assignment = own_assignment(db, login, assignment_id)
        project = db.get(Project, assignment.project_id)
        if tasks.label_of(db, assignment.id) is not None:
            db.commit()
            return RedirectResponse(f"/projects/{project.id}/task", status_code=303)
        return show_task(request, login, db, tasks.task_view(db, assignment), project)

    @app.post("/tasks/{assignment_id}")
    def submit_task(
        assignment_id: int,
        request: Request,
        confidence: str = Form(""),
        note: str = Form(""),
        a_accuracy: str = Form(""), a_coverage: str = Form(""), a_coherence: str = Form(""), a_overall: str = Form(""),
        b_accuracy: str = Form(""), b_coverage: str = Form(""), b_coherence: str = Form(""), b_overall: str = Form(""),
        login: Login = Depends(posted_login),
        db: Session = Depends(get_db),
    ) -> Response:
        assignment = own_assignment(db, login, assignment_id)
        next_page = RedirectResponse(f"/projects/{assignment.project_id}/task", status_code=303)
        form = {
            "confidence": confidence, "note": note,
            "a_accuracy": a_accuracy, "a_coverage": a_coverage, "a_coherence": a_coherence, "a_overall": a_overall,
            "b_accuracy": b_accuracy, "b_coverage": b_coverage, "b_coherence": b_coherence, "b_overall": b_overall,
        }
        try:
            parsed = tasks.parse_label_form(form)
        except tasks.LabelError as e:
            if tasks.label_of(db, assignment.id) is not None:  # a retry of a stored label: acknowledge it again
                db.commit()
                return next_page
            project = db.get(Project, assignment.project_id)
            return show_task(request, login, db, tasks.task_view(db, assignment), project, error=str(e), status=400)
        tasks.submit_label(db, assignment, *parsed)  # a retry of a stored label returns it unchanged
        return next_page

    def label_json(label: Label) -> dict:
        return {
            "id": label.id, "assignment_id": label.assignment_id, "comparison_id": label.comparison_id, "project_id": label.project_id,
            "choice": label.choice, "confidence": label.confidence, "ratings": json.loads(label.ratings), "note": label.note,
            "seconds": label.seconds, "created_at": label.created_at.isoformat(),
        }

    @app.get("/api/labels")
    def my_labels(login: Login = Depends(current_login), db: Session = Depends(get_db)) -> JSONResponse:
        """The caller's own labels (never anyone else's, admins included: they use the exports)."""
        labels = list(db.scalars(select(Label).where(Label.labeler_id == login.user.id).order_by(Label.id)))
        db.commit()
        return JSONResponse([label_json(label) for label in labels])

    @app.get("/api/labels/{label_id}")
    def one_label(label_id: int, login: Login = Depends(current_login), db: Session = Depends(get_db)) -> JSONResponse:
        label = db.get(Label, label_id)
        db.commit()
        if label is None:
            raise HTTPException(404, "no such label")
        if label.labeler_id != login.user.id and not login.user.is_admin:
            raise HTTPException(403, "this label belongs to another labeler")
        return JSONResponse(label_json(label))

    # ---- admins ------------------------------------------------------------------------------------

    def admin_page(request: Request, login: Login, db: Session, message: str | None = None, status: int = 200) -> Response:
        projects = list(db.scalars(select(Project).order_by(Project.id)))
        users = list(db.scalars(select(User).order_by(User.username)))
        counts = {p.id: admin.project_counts(db, p) for p in projects}
        db.commit()
        return render(request, "admin.html", login, status=status, projects=projects, users=users, counts=counts, message=message)

    def project_of(db: Session, project_id: int) -> Project:
        project = db.get(Project, project_id)
        if project is None:
            raise HTTPException(404, "no such project")
        return project

    def project_page(request: Request, login: Login, db: Session, project: Project, message: str | None = None, status: int = 200) -> Response:
        counts = admin.project_counts(db, project)
        db.commit()
        return render(request, "project.html", login, status=status, project=project, counts=counts, message=message)

    @app.get("/admin")
    def admin_home(request: Request, login: Login = Depends(admin_login), db: Session = Depends(get_db)) -> Response:
        return admin_page(request, login, db)

    @app.post("/admin/users")
    def admin_create_user(
        request: Request, username: str = Form(""), password: str = Form(""), is_admin: str = Form(""),
        login: Login = Depends(posted_admin), db: Session = Depends(get_db),
    ) -> Response:
        try:
            admin.create_user(db, username, password, is_admin=bool(is_admin))
        except UserError as e:
            db.rollback()
            return admin_page(request, login, db, message=str(e), status=400)
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/projects")
    def admin_create_project(
        request: Request, name: str = Form(""), overlap: int = Form(1), gold_share: float = Form(0.0), drift_policies: str = Form(""),
        login: Login = Depends(posted_admin), db: Session = Depends(get_db),
    ) -> Response:
        try:
            project = admin.create_project(db, name, overlap, gold_share, drift_policies)
        except UserError as e:
            db.rollback()
            return admin_page(request, login, db, message=str(e), status=400)
        return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)

    @app.get("/admin/projects/{project_id}")
    def admin_project(project_id: int, request: Request, login: Login = Depends(admin_login), db: Session = Depends(get_db)) -> Response:
        return project_page(request, login, db, project_of(db, project_id))

    @app.post("/admin/projects/{project_id}/settings")
    def admin_settings(
        project_id: int, request: Request, overlap: int = Form(1), gold_share: float = Form(0.0), drift_policies: str = Form(""),
        login: Login = Depends(posted_admin), db: Session = Depends(get_db),
    ) -> Response:
        project = project_of(db, project_id)
        try:
            admin.update_project(db, project, overlap, gold_share, drift_policies)
        except UserError as e:
            db.rollback()
            return project_page(request, login, db, project, message=str(e), status=400)
        return RedirectResponse(f"/admin/projects/{project.id}", status_code=303)

    def posts_by_id() -> dict:
        if app.state.posts_cache is None:
            from fromfeedback.data import load_tldr

            app.state.posts_cache = {p.id: p for p in load_tldr(app.state.data_dir)} if app.state.data_dir and Path(app.state.data_dir, "tldr", "posts.jsonl").exists() else {}
        return app.state.posts_cache

    def uploaded(upload: UploadFile, folder: str) -> Path:
        name = Path(upload.filename or "upload.jsonl").name or "upload.jsonl"
        path = Path(folder) / name
        path.write_bytes(upload.file.read())
        return path

    @app.post("/admin/projects/{project_id}/samples")
    def admin_import_samples(
        project_id: int, request: Request, file: UploadFile = File(...), policies: str = Form(""), limit: str = Form(""),
        login: Login = Depends(posted_admin), db: Session = Depends(get_db),
    ) -> Response:
        from fromfeedback.data import load_samples

        project = project_of(db, project_id)
        try:
            with tempfile.TemporaryDirectory() as folder:
                samples = load_samples(uploaded(file, folder))
            wanted = [p.strip() for p in policies.split(",") if p.strip()] or None
            added = admin.import_samples(db, project, samples, posts_by_id(), wanted, int(limit) if limit.strip().isdigit() else None)
        except UserError as e:
            db.rollback()
            return project_page(request, login, db, project, message=str(e), status=400)
        return project_page(request, login, db, project, message=f"imported {added} comparisons")

    @app.post("/admin/projects/{project_id}/gold")
    def admin_import_gold(
        project_id: int, request: Request, file: UploadFile = File(...), limit: str = Form(""),
        login: Login = Depends(posted_admin), db: Session = Depends(get_db),
    ) -> Response:
        from fromfeedback.data import load_comparisons

        project = project_of(db, project_id)
        try:
            with tempfile.TemporaryDirectory() as folder:
                comparisons = load_comparisons(uploaded(file, folder))
            added = admin.import_gold(db, project, comparisons, int(limit) if limit.strip().isdigit() else None)
        except UserError as e:
            db.rollback()
            return project_page(request, login, db, project, message=str(e), status=400)
        return project_page(request, login, db, project, message=f"imported {added} gold comparisons")

    @app.get("/admin/projects/{project_id}/dashboard")
    def admin_dashboard(project_id: int, request: Request, login: Login = Depends(admin_login), db: Session = Depends(get_db)) -> Response:
        project = project_of(db, project_id)
        board = stats.dashboard(db, project)
        db.commit()
        return render(request, "dashboard.html", login, project=project, board=board)

    @app.get("/admin/projects/{project_id}/export/{kind}")
    def admin_export(project_id: int, kind: str, login: Login = Depends(admin_login), db: Session = Depends(get_db)) -> Response:
        project = project_of(db, project_id)
        if kind not in ("openai", "pairs"):
            raise HTTPException(404, "export formats: openai, pairs")
        rows = admin.export_openai(db, project) if kind == "openai" else admin.export_pairs(db, project)
        db.commit()
        body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        filename = f"project{project.id}-{kind}.jsonl"
        return Response(body, media_type="application/jsonl", headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    return app


def app_from_env() -> FastAPI:
    """For `uvicorn --factory fromfeedback.label.app:app_from_env`: the database from $FROMFEEDBACK_LABEL_DB,
    the data folder from $FROMFEEDBACK_DATA_DIR."""
    import os

    from fromfeedback.config import default_data_dir

    db_url = os.environ.get("FROMFEEDBACK_LABEL_DB")
    if not db_url:
        raise UserError("set $FROMFEEDBACK_LABEL_DB to the labeling database (SQLite path or URL)")
    return create_app(db_url, os.environ.get("FROMFEEDBACK_DATA_DIR") or default_data_dir())
