"""What the API is given by the composition root, as plain data: no torch, no engine objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.api.deliveries import DeliveryLog
from tinkerd.api.dispatch import Dispatch
from tinkerd.api.notify import FutureNotifier
from tinkerd.api.run_cache import RunCache
from tinkerd.api.signing import UrlSigner
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.ops import LogprobDistribution
from tinkerd.domain.vision import VisionSpec
from tinkerd.store import Store
from tinkerd.store.storage import CheckpointStorage


@dataclass(frozen=True)
class ServedModelInfo:
    """Facts about one served base model, read from its config files by the composition root."""

    name: str  # what clients pass as base_model
    tokenizer_id: str | None  # what the SDK hands to AutoTokenizer.from_pretrained: a repo id or a local directory
    arch: str
    vocab_size: int
    max_context_length: int
    # Token ids that end a sequence when a sampling request leaves `stop` unset ("implicit EOS").
    eos_token_ids: tuple[int, ...] = ()
    trainable: bool = True
    sampleable: bool = True
    # A local directory with the model's tokenizer.json (and chat template), for front ends that take text (the
    # OpenAI API). None: text requests are refused for this model.
    tokenizer_dir: str | None = None
    # "packed" (tinkerd's own fast forward) or "generic" (the model's own forward): see domain.architectures
    engine_path: str = "packed"
    # How a vision-language model turns images into tokens; None: a text-only model (image chunks are refused).
    vision: VisionSpec | None = None


@dataclass(frozen=True)
class ApiSettings:
    # retrieve_future holds a request this long before answering try_again: under the SDK's 45 s read timeout,
    # and long enough that the SDK (which re-polls at once) does not spin.
    long_poll_s: float = 25.0
    # While waiting, the ledger is re-read this often even without a notification, so a worker in another process
    # (which cannot call our notifier) still wakes the poll.
    poll_interval_s: float = 1.0
    # API key -> owner. None: single-user mode, any key is accepted and everything belongs to DEFAULT_OWNER.
    api_keys: Mapping[str, str] | None = None
    # Largest request body accepted after zstd decompression (a zip bomb must not exhaust memory).
    max_body_bytes: int = 256 * 1024 * 1024
    # Per user: unfinished requests in the ledger (more get 429, which the SDK backs off from and retries), and
    # training runs in open sessions (more get a 429 the SDK does not retry). 0: no cap.
    max_queued_per_user: int = 1024
    max_runs_per_user: int = 64
    # Flags merged into the /client/config answer (e.g. {"use_pyqwest_transport": False}).
    client_config_overrides: Mapping[str, object] = field(default_factory=dict)
    # The data directory the worker writes checkpoint files into: downloads read it, deletes remove from it, and the
    # URL signing secret lives there. None: an API without files (checkpoint rows only; downloads answer 404).
    data_dir: Path | None = None
    # How long a signed download URL works. The official CLI re-signs 5 minutes before expiry, so keep it above that.
    download_url_ttl_s: float = 3600.0
    # The distribution sampled tokens' logprobs are reported under when a request's X-Tinkerd-Sample-Logprobs header
    # does not say (see domain.ops.LogprobDistribution).
    sample_logprobs: LogprobDistribution = "tempered"
    # Largest image (width x height) an image chunk may hold; checked from its header before it is decoded.
    max_image_pixels: int = 4096 * 4096
    # The directory image_asset_pointer chunks may read files under, resolved (None: they may hold data: URIs only).
    image_root: Path | None = None


@dataclass(frozen=True)
class ApiContext:
    """Everything a route needs, stored on ``app.state.ctx`` by ``create_app``."""

    store: Store
    models: Mapping[str, ServedModelInfo]
    dispatch: Dispatch  # how requests reach workers and results come back (in this process, or via the ledger)
    settings: ApiSettings
    deliveries: DeliveryLog
    files: CheckpointStorage | None = None  # set when settings.data_dir is
    signer: UrlSigner | None = None  # likewise
    runs: RunCache = field(default_factory=RunCache)  # the runs requests were submitted to

    @property
    def notifier(self) -> FutureNotifier:
        return self.dispatch.notifier

    def model(self, name: str) -> ServedModelInfo:
        try:
            return self.models[name]
        except KeyError:
            served = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(f"base model {name!r} is not served here; served models: {served}") from None

    def downloads(self) -> tuple[CheckpointStorage, UrlSigner]:
        """The checkpoint files and the URL signer, or NotFoundError when this API was started without a data dir."""
        if self.files is None or self.signer is None:
            raise NotFoundError("this server keeps no checkpoint files (its API runs without a data directory)")
        return self.files, self.signer
