"""tpr's model folder through ``huggingface_hub``: ``TPRModel.from_pretrained(folder)``.

:class:`TPRModel` is an ``nn.Module`` with ``huggingface_hub``'s ``PyTorchModelHubMixin``, so
``from_pretrained`` takes a model folder (or a Hub repository holding one) and
``save_pretrained`` / ``push_to_hub`` write one. Loading goes through
:func:`tpr_core.export.load_exported` (safetensors only, the weights' SHA-256 checked), not the
mixin's generic loader: a tpr folder's module is rebuilt from its ``config.yaml``, whose method
decides the architecture, and the mixin's non-strict ``load_state_dict`` would let a folder
that does not fit load silently. The tokenizer of the same folder loads with
``transformers.PreTrainedTokenizerFast.from_pretrained(folder)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from torch import Tensor, nn

from tpr_core.export import Exported, load_exported, save_exported

__all__ = ["TPRModel"]


class TPRModel(nn.Module, PyTorchModelHubMixin, library_name="tpr", tags=["text-based-person-retrieval"]):
    """A loaded tpr model folder: the method module, its tokenizer and config.

    Args:
        exported: what :func:`tpr_core.export.load_exported` returns.
    """

    def __init__(self, exported: Exported) -> None:
        super().__init__()
        self.method = exported.model
        self.tokenizer = exported.tokenizer
        self.cfg = exported.cfg
        self.info = exported.info
        self.metrics = exported.metrics
        self.clip_config = exported.clip_config

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, E) features (not normalised)."""
        return self.method.encode_image(images)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """(B, L) ids and mask -> (B, E) features (not normalised)."""
        return self.method.encode_text(text_ids, text_mask)

    def encode_captions(self, captions: list[str]) -> Tensor:
        """Captions -> (B, E) features, tokenized with the folder's tokenizer."""
        ids, mask = self.tokenizer.encode(captions)
        device = next(self.method.parameters()).device
        return self.encode_text(ids.to(device), mask.to(device))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The method's training forward (a dict of outputs)."""
        return self.method(batch)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_exported(
            save_directory, self.method.state_dict(), self.cfg, self.tokenizer, self.metrics,
            int(self.info["num_classes"]), extra=self.info.get("extra"), clip_config=self.clip_config,
        )  # fmt: skip

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **_: Any,
    ) -> TPRModel:
        folder = Path(model_id)
        if not folder.is_dir():
            folder = Path(
                snapshot_download(
                    repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                    local_files_only=local_files_only, token=token,
                )  # fmt: skip
            )
        return cls(load_exported(folder, device=map_location))
