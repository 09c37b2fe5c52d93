"""mcs: massively concurrent services on Trio.

Each request runs as its own nursery-scoped task graph (:func:`open_graph`); wherever many live
requests need the same downstream I/O, a batcher (:func:`open_batcher`) coalesces their calls
into one batched call, splits the results back, and enforces rate and in-flight limits.
"""

from ._autoscale import AutoscaleDecision as AutoscaleDecision
from ._autoscale import autoscale as autoscale
from ._batcher import Batcher as Batcher
from ._batcher import BatchFn as BatchFn
from ._exceptions import BatchResultError as BatchResultError
from ._exceptions import MCSError as MCSError
from ._exceptions import Overloaded as Overloaded
from ._graph import Graph as Graph
from ._graph import open_graph as open_graph
from ._histogram import BatcherHistograms as BatcherHistograms
from ._histogram import Histogram as Histogram
from ._limits import SharedInFlight as SharedInFlight
from ._limits import SharedRate as SharedRate
from ._node import Node as Node
from ._open_batcher import open_batcher as open_batcher
from ._rate import RateLimit as RateLimit
from ._stats import BatcherStatistics as BatcherStatistics
from ._stats import Percentiles as Percentiles
from ._trace import GraphTrace as GraphTrace
from ._trace import NodeTrace as NodeTrace
from ._util import public as _public

__version__ = "0.1.0.dev0"

__all__ = [
    "AutoscaleDecision",
    "BatchFn",
    "BatchResultError",
    "Batcher",
    "BatcherHistograms",
    "BatcherStatistics",
    "Graph",
    "GraphTrace",
    "Histogram",
    "MCSError",
    "Node",
    "NodeTrace",
    "Overloaded",
    "Percentiles",
    "RateLimit",
    "SharedInFlight",
    "SharedRate",
    "autoscale",
    "open_batcher",
    "open_graph",
]

# Reprs, tracebacks and docs show the public names as members of mcs, not of private modules.
_public(*(globals()[name] for name in __all__ if name != "BatchFn"))
