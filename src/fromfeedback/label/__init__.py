"""The human-feedback labeling app: a FastAPI + SQLAlchemy web service where labelers compare summaries.

`db` holds the schema and engine, `admin` the project operations (imports, accounts, exports), `stats` the
dashboard figures, `app` the web pages, `simulate` the simulated labelers, `cli` the `fromfeedback label`
commands.
"""
