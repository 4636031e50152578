"""A few example captions at each validation, for TensorBoard and W&B: the run's progress in words.

The first `count` samples of the validation split are read once (the CPU loader, no workers)
and captioned greedily with the model as it stands, decoded with the run's copy of its tokenizer
(`RUN/tokenizer/`). It runs only on the main process, only when TensorBoard or W&B are there to
show it, and not under FSDP (a sharded model's forward needs every process). A run without a
tokenizer copy logs no examples and says so once; so does a run whose data store fails while the
examples are read (only the main process reads them: raising there would leave the other processes
waiting; the next batches the run reads through its StoreGuard stop every process).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from grr_data.format.layout import caption_word_ids
from grr_data.format.manifest import Manifest
from grr_data.infra.store import StoreError
from grr_data.loader import make_loader
from grr_train.infer.generate import DecodeOptions, generate
from grr_train.runs.tokenizer import load_tokenizer_checked, tokenizer_copy_in
from grr_train.runtime.precision import autocast_context

NUM_EXAMPLES = 4


class ExampleCaptions:
    def __init__(self, run_dir: Path, data: Manifest, split: str, device: torch.device,
                 autocast: torch.dtype | None, count: int = NUM_EXAMPLES, max_len: int = 30):
        self.run_dir, self.data, self.split, self.device, self.autocast = run_dir, data, split, device, autocast
        self.count, self.options = count, DecodeOptions(max_len=max_len)
        self._batch: dict | None = None
        self._tokenizer = None
        self.unavailable: str | None = None  # why no examples are logged

    def rows(self, model: torch.nn.Module) -> list[tuple[str, str, str]]:
        """(sample key, reference, generated) for the first samples of the split; [] when unavailable."""
        if self.unavailable is not None or not self._prepare():
            return []
        batch = self._batch
        # Compiled blocks run eagerly here: decoding's growing lengths would recompile them, and past
        # dynamo's recompile limit the training step itself would lose its compiled graphs.
        with torch.random.fork_rng(devices=[]), autocast_context(self.autocast, self.device), _eager():
            generated = generate(model, batch["images"].to(self.device), self.data.special, self.options)
        decode = self._tokenizer.decode_words
        special = self.data.special
        return [(key, decode(caption_word_ids(ids.tolist(), special)), decode(words))
                for key, ids, words in zip(batch["keys"], batch["ids"], generated, strict=True)]

    def _prepare(self) -> bool:
        if self._batch is not None:
            return True
        folder = tokenizer_copy_in(self.run_dir)
        if folder is None:
            self.unavailable = f"{self.run_dir} holds no copy of its tokenizer"
            return False
        self._tokenizer = load_tokenizer_checked(folder, None)
        try:
            loader = make_loader(self.data, split=self.split, batch_size=self.count, kind="cpu", shuffle=False,
                                 num_workers=0, with_keys=True)
            with torch.random.fork_rng(devices=[]):
                first = next(iter(loader))
        except StoreError as err:
            self.unavailable = f"the {self.split!r} samples could not be read ({err})"
            return False
        real = first["real"].nonzero()[:, 0].tolist()
        self._batch = {"images": first["images"][real], "ids": first["ids"][real],
                       "keys": [first["keys"][i] for i in real]}
        return True


def _eager():
    """torch.compile'd modules run as plain Python inside (torch 2.6 and later)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()
