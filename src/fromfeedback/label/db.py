"""The labeling database: tables, engine (SQLite or PostgreSQL) and Alembic migrations.

Every label hangs off an assignment (one labeler, one comparison, the order shown); `labels.assignment_id`
is unique, so a retried submission can never store a label twice.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fromfeedback.files import UserError

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LoginSession(Base):
    """A logged-in browser: the cookie holds `token`; every form must echo `csrf_token`."""

    __tablename__ = "login_sessions"
    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    """How many labelers see each ordinary comparison."""
    gold_share: Mapped[float] = mapped_column(Float, default=0.0)
    """Share of a labeler's tasks that are gold comparisons (researcher-labeled, shown as ordinary tasks)."""
    drift_policies: Mapped[str] = mapped_column(String(400), default="")
    """`policy_a,policy_b`: the pair whose preference rate the dashboard follows over time ('' = most common pair)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PostRow(Base):
    __tablename__ = "posts"
    __table_args__ = (UniqueConstraint("project_id", "post_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    post_key: Mapped[str] = mapped_column(String(200))
    """The post's id in the data files (e.g. `t3_abc`)."""
    subreddit: Mapped[str] = mapped_column(Text, default="")
    title: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text)


class ComparisonRow(Base):
    """Two summaries of one post. Index 0/1 here is the canonical order every label and export uses."""

    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id"), index=True)
    text_0: Mapped[str] = mapped_column(Text)
    policy_0: Mapped[str] = mapped_column(String(200))
    text_1: Mapped[str] = mapped_column(Text)
    policy_1: Mapped[str] = mapped_column(String(200))
    group_key: Mapped[str] = mapped_column(String(200), default="")
    """Comparisons from one K-way ranking of a post share a group key."""
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_choice: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gold_confidence: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gold_worker: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Assignment(Base):
    """A comparison served to one labeler. `slot` (0..overlap-1, NULL for gold) caps the labelers per
    comparison through a unique constraint, so concurrent requests can never over-assign."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("comparison_id", "labeler_id"), UniqueConstraint("comparison_id", "slot"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    swapped: Mapped[bool] = mapped_column(Boolean)
    """True when the page shows summary 1 on the left (as "A"): the per-task random order, stored."""
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    served_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    choice: Mapped[int] = mapped_column(Integer)
    """Canonical index (0/1) of the preferred summary."""
    confidence: Mapped[int] = mapped_column(Integer)
    """Canonical 1–9: 1 = summary 0 definitely better, 9 = summary 1 definitely better (OpenAI's convention)."""
    ratings: Mapped[str] = mapped_column(Text, default="{}")
    """JSON {"0": {"accuracy": 1-7, ...}, "1": {...}}: optional Likert ratings per canonical summary."""
    note: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float] = mapped_column(Float)
    """From serving the task to storing the label."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def relaxed_commit(db: Session) -> None:
    """Ends the session's transaction; the next one commits without waiting for the disk (SQLite). For rows
    that are cheap to lose in a power cut (a served task is served again) but not worth an fsync each."""
    db.commit()
    db.connection(execution_options={"sqlite_synchronous": "NORMAL"})


def database_url(url: str) -> str:
    """A plain path means an SQLite file; `postgresql://` gets the psycopg 3 driver."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = database_url(url)
    try:
        parsed = make_url(url)
    except Exception as e:
        raise UserError(f"--db {url!r}: not a database URL or path ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        # One connection per process: SQLite has one writer at a time anyway, and threads queueing on the
        # pool wake up at once, where SQLite's own busy handler polls with growing sleeps (long tail latency).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=1, max_overflow=0, pool_timeout=120)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            # We open transactions ourselves (below) so that every one takes the write lock at BEGIN:
            # a deferred transaction upgrading to a writer fails at once in WAL mode instead of waiting.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:
            # synchronous=FULL: a commit is on disk (fsync) before the response goes out. `relaxed_commit`
            # lowers it to NORMAL (still safe from a killed process, not from a power cut) for one transaction.
            wanted = connection.get_execution_options().get("sqlite_synchronous", "FULL")
            if connection.info.get("synchronous") != wanted:
                connection.exec_driver_sql(f"PRAGMA synchronous={wanted}")  # only allowed outside a transaction
                connection.info["synchronous"] = wanted
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)
    raise UserError(f"--db {url!r}: only SQLite files and postgresql+psycopg:// URLs are supported")


def alembic_config(engine: Engine):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Brings the schema to the newest migration (creates it in an empty database)."""
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str) -> sessionmaker:
    """Engine + migrations + a session factory; `expire_on_commit=False` keeps rows readable after commit."""
    from sqlalchemy.exc import OperationalError

    engine = make_engine(url)
    try:
        migrate(engine)
    except OperationalError as e:
        raise UserError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: {e.orig}") from None
    return sessionmaker(engine, expire_on_commit=False)
