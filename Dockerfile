# `lifecycle serve` with the project's champion baked in.
#
#   make run                                   # a registry with a champion
#   docker build -t heart-scoring .
#   docker run -p 8000:8000 -e LIFECYCLE_API_TOKEN=… heart-scoring
#
# The server listens on 0.0.0.0 inside the container, so it requires the bearer token: clients send
# `Authorization: Bearer …` (16 characters or more). It answers to addresses in digits and `localhost`;
# a DNS name clients use for it goes in settings.ini, `[servers] allowed_hosts`. Set LIFECYCLE_LOG_URL to a
# postgresql:// URL to keep the prediction log outside the container (by default it is a SQLite file inside it, gone
# with the container), LIFECYCLE_ID_KEY to the key that pseudonymizes identifiers (by default the project keeps its
# own in .lifecycle/id.key, which is not copied into the image), and LIFECYCLE_WORKERS to the processes (default 1;
# `auto`: the cores). Replicas on one log: mount one registry folder at /app/project/registry in each
# (deploy/kubernetes.yaml; README, "Deployment").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The package, pinned as the lock file says.
COPY pyproject.toml requirements.lock README.md ./
COPY lifecycle ./lifecycle
COPY nbs ./nbs
RUN pip install --no-cache-dir -c requirements.lock . && useradd --create-home scoring

# The project: its settings and its registry. The server loads the `champion` alias, checking the
# model file's SHA-256 and loading only trusted types.
COPY --chown=scoring settings.ini ./project/settings.ini
COPY --chown=scoring registry ./project/registry
RUN test -f project/registry/aliases.json || (echo "no registry/aliases.json: run 'make run' before building" && exit 1)

USER scoring
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
# exec: uvicorn gets SIGTERM from `docker stop` and shuts down gracefully, writing every prediction.
CMD ["sh", "-c", "exec lifecycle serve --settings project/settings.ini --host 0.0.0.0 --port 8000 --log \"${LIFECYCLE_LOG_URL:-}\" --workers \"${LIFECYCLE_WORKERS:-1}\""]
