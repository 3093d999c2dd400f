"""Derive a Triton model repository from ours with some engine parameters or instance counts changed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from flover_backend.triton_env import PROJECT_ROOT

DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
_PARAMETER = 'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def derive_repository(dest: Path, models: list[str] | None = None, settings: dict[str, str] | None = None,
                      instance_counts: dict[str, int] | None = None, source: Path = DEFAULT_REPOSITORY,
                      variants: dict[str, tuple[str, dict[str, str]]] | None = None) -> Path:
    """Copy `models` (default: all) of `source` to `dest`, applying engine `settings` to every copied model.

    `variants` adds models under new names: {new name: (model of `source`, its own extra settings)}.
    """
    models = models or sorted(p.name for p in source.iterdir() if (p / "config.pbtxt").is_file())
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copies = {name: (name, {}) for name in models} | (variants or {})
    for name, (base, extra) in copies.items():
        if not (source / base / "config.pbtxt").is_file():
            raise FileNotFoundError(f"no model {base!r} in {source}")
        shutil.copytree(source / base, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        config_path = dest / name / "config.pbtxt"
        text = config_path.read_text()
        for key, value in ((settings or {}) | extra).items():
            text = set_parameter(text, key, str(value))
        if instance_counts and name in instance_counts:
            text = re.sub(r"count: \d+", f"count: {instance_counts[name]}", text)
        config_path.write_text(text)
    return dest


def set_parameter(config_text: str, key: str, value: str) -> str:
    """Set (or add) one `parameters` entry of a config.pbtxt text."""
    line = _PARAMETER.format(key=key, value=value)
    pattern = re.compile(r'^parameters: \{ key: "' + re.escape(key) + r'" .*$', re.MULTILINE)
    if pattern.search(config_text):
        return pattern.sub(line, config_text)
    return config_text.rstrip("\n") + "\n" + line + "\n"
