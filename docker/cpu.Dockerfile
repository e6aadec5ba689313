# CPU image: flora_train with its pinned dependencies.
# Build from the repository root:  docker build -f docker/cpu.Dockerfile -t flora-train:cpu .
# Run the quickstart:              docker run --rm -v $PWD/runs:/work/runs flora-train:cpu run recipes/quickstart.yaml
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
WORKDIR /opt/flora_train
COPY requirements/ requirements/
# torch first and pinned, from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build),
# then everything else constrained to keep it (same steps as the Makefile).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -c requirements/constraints.txt -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY flora_train/ flora_train/
COPY recipes/ recipes/
RUN pip install --no-cache-dir -c requirements/constraints.txt --no-deps .
WORKDIR /work
RUN cp -r /opt/flora_train/recipes /work/recipes
ENTRYPOINT ["flora-train"]
