# kt's default pod image: Python 3.11 with kt (and its Kubernetes extra) installed, so a
# pod's command starts the supervisor at once instead of installing kt first.
#
#   docker build -t kt:0.1.0 .        then  kt.Compute(image=kt.Image(base="kt:0.1.0"))
#
# Installs kt's runtime and Kubernetes dependencies at the versions CI tested (the pins of
# requirements.lock, as constraints; the lock's hashes cover its CPU torch wheel, which
# only exists on the CI machines, so they are not checked here). torch is left out: add
# it with kt.Image().pip_install(["torch==2.13.0"]) or in a derived image.
# The pod runs as uid 1000 (kt's manifests set runAsUser 1000, runAsNonRoot).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/kt
COPY requirements.lock pyproject.toml README.md ./
COPY kt ./kt
RUN sed -n 's/^\([A-Za-z0-9_.-]*==[^ ;]*\).*/\1/p' requirements.lock > /tmp/pins.txt \
    && pip install -c /tmp/pins.txt ".[k8s]" \
    && rm /tmp/pins.txt \
    && useradd --uid 1000 --create-home kt

USER 1000
WORKDIR /home/kt
EXPOSE 7170 7171
CMD ["python", "-m", "kt.supervisor"]
