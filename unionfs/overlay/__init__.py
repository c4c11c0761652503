"""The merged view of a layer stack, one concept per module (see the README's architecture section).

This is the surface the rest of the package uses: ``MergedView`` (view.py),
the facade; ``ViewRouter`` (cuts.py), which view owns an inode; and the
values they hand out.
"""

from .attributes import AttrChange
from .cuts import ViewRouter
from .layers import Layer, layers_from_store
from .nodes import Attr, Child, Node
from .openfiles import InodeFds
from .upper import UpperLayer
from .view import MergedView

__all__ = ["Attr", "AttrChange", "Child", "InodeFds", "Layer", "MergedView", "Node", "UpperLayer", "ViewRouter",
           "layers_from_store"]
