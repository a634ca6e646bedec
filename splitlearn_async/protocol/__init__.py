"""The trunk service's wire contract, shared by client and server.

- :mod:`.inference`: ``Session``, ``Forward`` and ``Info`` messages.
- :mod:`.training`: split-training messages.
- :mod:`.adapters`: loading and deleting LoRA adapters.
- :mod:`.checkpoints`: checkpoints in chunks (``TrainOpen``, ``LoadAdapter``, ``TrainSave``).
- :mod:`.replies`: plain replies (ids, counts, bytes).
- :mod:`.routing`: how a call names its model (metadata ``splitlearn-model``).
- :mod:`.status`: the one table between our exception tree and gRPC status codes.

Every body is one msgpack map (``docs/protocol.md``). ``from splitlearn_async import
protocol as proto`` gives every builder and parser as ``proto.<name>``.
"""

from __future__ import annotations

from .adapters import *  # noqa: F403
from .adapters import __all__ as _adapters_all
from .checkpoints import *  # noqa: F403
from .checkpoints import __all__ as _checkpoints_all
from .inference import *  # noqa: F403
from .inference import __all__ as _inference_all
from .replies import *  # noqa: F403
from .replies import __all__ as _replies_all
from .routing import *  # noqa: F403
from .routing import __all__ as _routing_all
from .training import *  # noqa: F403
from .training import __all__ as _training_all

__all__ = [*_inference_all, *_training_all, *_adapters_all, *_replies_all, *_routing_all, *_checkpoints_all]  # noqa: PLE0604 (each module lists its own names)
