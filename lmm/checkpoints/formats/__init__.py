"""Released models in, lmm checkpoint directories out: one module per format, and the registry of
formats ``python -m lmm import --from FORMAT`` names.

- ``llava_hf``: transformers ``LlavaForConditionalGeneration`` folders (llava-hf/*, lmm exports);
- ``llava_onevision_hf``: transformers ``LlavaOnevisionForConditionalGeneration`` folders;
- ``llava``: the original LLaVA repository's checkpoints (``LlavaLlamaForCausalLM``);
- ``tinyllava``: TinyLLaVA_Factory checkpoints.

Every import writes the model's prompt conventions (``lmm.data.prompts``) with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmm.checkpoints.formats import llava, llava_hf, llava_onevision_hf, tinyllava
from lmm.checkpoints.formats.common import ImportedModel, ImportOptions, write_checkpoint
from lmm.errors import ImportFormatError
from lmm.registry import Registry

__all__ = ["IMPORT_FORMATS", "ImportFormat", "ImportOptions", "import_checkpoint"]


@dataclass(frozen=True)
class ImportFormat:
    """A registry entry: the reader and a one-line description for ``--help``."""

    read: Callable[[Path, ImportOptions], ImportedModel]
    description: str


IMPORT_FORMATS: Registry[ImportFormat] = Registry("import format")
IMPORT_FORMATS.add(
    "llava_hf",
    ImportFormat(
        llava_hf.read, "transformers LlavaForConditionalGeneration (llava-hf/*, lmm exports)"
    ),
)
IMPORT_FORMATS.add(
    "llava_onevision_hf",
    ImportFormat(llava_onevision_hf.read, "transformers LlavaOnevisionForConditionalGeneration"),
)
IMPORT_FORMATS.add(
    "llava",
    ImportFormat(llava.read, "original LLaVA repository checkpoints (LlavaLlamaForCausalLM)"),
)
IMPORT_FORMATS.add("tinyllava", ImportFormat(tinyllava.read, "TinyLLaVA_Factory checkpoints"))


def import_checkpoint(
    fmt: str, src: str | Path, out: str | Path, options: ImportOptions = ImportOptions()
) -> tuple[Path, list[str]]:
    """Read ``src`` as format ``fmt`` and write the lmm checkpoint directory ``out``; returns it
    and the notes the user should see."""
    entry = IMPORT_FORMATS.get(fmt, option="--from")
    src = Path(src)
    if not src.is_dir():
        raise ImportFormatError(f"{src}: no such directory")
    model = entry.read(src, options)
    return write_checkpoint(model, out, options), model.notes
