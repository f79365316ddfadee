# The ubc ledger service. Keys live in a volume at /data; the database defaults to
# SQLite in /data too (set UBC_DATABASE_URL=postgresql+psycopg://... for PostgreSQL).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UBC_DATA_DIR=/data \
    UBC_DATABASE_URL=sqlite:////data/ubc.db

WORKDIR /app
COPY pyproject.toml setup.py README.md alembic.ini ./
COPY requirements ./requirements
# The lock first (exact versions, hash-checked), then ubc itself without resolving.
RUN pip install --no-cache-dir -r requirements/main.txt
COPY ubc ./ubc
# The migrations: setup.py ships them inside the package (ubc/_alembic).
COPY alembic ./alembic
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --home-dir /data ubc \
    && mkdir -p /data && chown ubc /data

USER ubc
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
# `ubc init --keep-existing` creates the keys and a ledger origin unique to this
# installation (/data/origin; or UBC_ORIGIN if set) on first start and keeps them
# afterwards: `ubc serve` refuses the shared default origin on 0.0.0.0 (docs/origin.md).
CMD ["sh", "-c", "ubc init --keep-existing && exec ubc serve --host 0.0.0.0 --port 8000"]
