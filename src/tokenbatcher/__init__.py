"""tokenbatcher: cost- and token-budgeted batching for one expensive async function.

A drop-in replacement for the batching part of ``flyte.extras``::

    from tokenbatcher import TokenBatcher, Prompt
"""

from ._batcher import DynamicBatcher as DynamicBatcher
from ._decorator import batched as batched
from ._errors import BatchAbortedError as BatchAbortedError
from ._errors import BatcherStoppedError as BatcherStoppedError
from ._errors import OverloadedError as OverloadedError
from ._errors import QueueFullError as QueueFullError
from ._errors import StreamOverflowError as StreamOverflowError
from ._stats import BatchInfo as BatchInfo
from ._stats import BatchStats as BatchStats
from ._stats import DispatchReason as DispatchReason
from ._stats import Percentiles as Percentiles
from ._streams import END as END
from ._streams import End as End
from ._streams import Stream as Stream
from ._streams import StreamBatch as StreamBatch
from ._streams import StreamFn as StreamFn
from ._token import TokenBatcher as TokenBatcher
from ._types import BatchCost as BatchCost
from ._types import CostEstimator as CostEstimator
from ._types import CostEstimatorFn as CostEstimatorFn
from ._types import Dispatch as Dispatch
from ._types import Grouping as Grouping
from ._types import InferenceFn as InferenceFn
from ._types import OnBatchError as OnBatchError
from ._types import ProcessFn as ProcessFn
from ._types import Prompt as Prompt
from ._types import TokenEstimator as TokenEstimator
from ._types import TokenEstimatorFn as TokenEstimatorFn
from ._types import Tune as Tune

__version__ = "0.1.0"

__all__ = [
    "END",
    "BatchAbortedError",
    "BatchCost",
    "BatchInfo",
    "BatchStats",
    "BatcherStoppedError",
    "CostEstimator",
    "CostEstimatorFn",
    "Dispatch",
    "DispatchReason",
    "DynamicBatcher",
    "End",
    "Grouping",
    "InferenceFn",
    "OnBatchError",
    "OverloadedError",
    "Percentiles",
    "ProcessFn",
    "Prompt",
    "QueueFullError",
    "Stream",
    "StreamBatch",
    "StreamFn",
    "StreamOverflowError",
    "TokenBatcher",
    "TokenEstimator",
    "TokenEstimatorFn",
    "Tune",
    "batched",
]
