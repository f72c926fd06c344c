from setuptools import find_packages, setup

with open("requirements.txt") as f:
  requirements = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]

setup(
    name="llava-jax",
    version="0.1.0",
    description="LLaVA (visual instruction tuning) in JAX/Flax: models, HF conversion, two-stage training, inference",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    # lmms-eval's `llava_jax` model (llava_jax/eval/lmms.py). See README "lmms-eval": it needs its own venv.
    extras_require={"eval": ["lmms-eval==0.7.3"]},
    entry_points={"console_scripts": ["llava-jax = llava_jax.cli:main"],
                  "lmms_eval.models": ["llava_jax = llava_jax.eval.lmms:manifest"]},
)
