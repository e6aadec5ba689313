# GPU image: CUDA runtime, flora_train and DeepSpeed with pinned dependencies.
# Build from the repository root:  docker build -f docker/gpu.Dockerfile -t flora-train:gpu .
# Run:  docker run --rm --gpus all -v $PWD/runs:/work/runs flora-train:gpu run recipes/llama-3.2-1b-flora-r1.yaml
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip git \
 && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/flora_train
COPY requirements/ requirements/
# The PyPI torch wheel for Linux x86_64 is the CUDA build; DeepSpeed compiles its ops on first use.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir -c requirements/constraints.txt -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY flora_train/ flora_train/
COPY recipes/ recipes/
RUN pip install --no-cache-dir -c requirements/constraints.txt --no-deps .
WORKDIR /work
RUN cp -r /opt/flora_train/recipes /work/recipes
ENTRYPOINT ["flora-train"]
