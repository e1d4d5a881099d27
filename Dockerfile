# nanojaxgpt for multi-GPU nodes: `docker build -t nanojaxgpt .`, then launch/gpu_node.sh.
# JAX's CUDA 13 wheels bring their own CUDA and cuDNN, so a slim Python base is enough
# (the host needs only the NVIDIA driver and the container toolkit).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92

WORKDIR /opt/nanojaxgpt
COPY pyproject.toml README.md ./
COPY nanojaxgpt ./nanojaxgpt
# One resolution: jax[cuda13] pins jaxlib and the CUDA plugin to the jax that pyproject allows.
RUN pip install -e ".[hub]" "jax[cuda13]" "datasets>=3"
COPY configs ./configs
COPY tools ./tools
COPY launch ./launch

ENTRYPOINT ["python", "-m", "nanojaxgpt.train"]
CMD ["configs/shakespeare_char.toml"]
